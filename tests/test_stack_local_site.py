"""The local site: a real engine child process (`python -m matrixstack.engine.launch`) bound to CPU core 0, served
through the `openai` client, then stopped with nothing of its process group left; launches it cannot run are refused
before any process starts, and an engine that dies while starting is reported with the end of its log. An engine
killed while running comes back on its own (restarting -> running told to the site's callback), and stop() after
that leaves nothing of either process group. (vLLM on the local site: tests/test_stack_local_vllm.py.)"""

from __future__ import annotations

import os
import queue
import signal
from pathlib import Path

import openai
import pytest

from matrixstack.engine.launch import parse_launch
from matrixstack.errors import UserError
from matrixstack.portal.deployment_service import engine_secret
from matrixstack.stack.local_site import LocalSite, engine_command
from matrixstack.stack.site import STATUS_RESTARTING, STATUS_RUNNING, Launch
from matrixstack.stack.spec import EngineArgs, SiteShape
from matrixstack.stack.supervise import Backoff, group_alive

RESTART_TIMEOUT_S = 120.0  # the killed engine's restart: a fresh process loading tiny-moe on a loaded machine

SMALL = EngineArgs(max_model_len=256, num_kv_blocks=64, max_num_seqs=8)


def launch(**fields) -> Launch:
    values = dict(
        name="tiny",
        arch="tiny-moe",
        weights="random",
        engine="matrixstack",
        workers=1,
        device_kind="cpu",
        devices=(0,),
        strategy="STRICT_PACK",
        engine_args=SMALL,
    )
    return Launch(**(values | fields))


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("home")
        mp.setenv("MATRIXSTACK_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def running(home):
    site = LocalSite(SiteShape())
    started = site.start([launch()])
    yield site, started
    site.stop()


def test_engine_runs_on_its_core_and_serves(running, home):
    site, started = running
    assert [s.name for s in started] == ["tiny"]
    pid = site.pids["tiny"]
    assert os.getpgid(pid) == pid  # a session and process group of its own
    assert os.sched_getaffinity(pid) == {0}
    assert started[0].url.startswith("http://127.0.0.1:") and started[0].url.endswith("/v1")
    client = openai.OpenAI(base_url=started[0].url, api_key=engine_secret(started[0].name), max_retries=0)
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
    )
    assert reply.model == "tiny" and reply.usage.completion_tokens > 0
    log = Path(home) / "logs" / "tiny.log"
    assert "http://127.0.0.1:" in log.read_text()


def test_stop_leaves_no_process_of_its_group(running):
    site, _ = running
    pid = site.pids["tiny"]
    assert group_alive(pid)
    site.stop()
    assert not group_alive(pid)
    site.stop()  # idempotent
    assert site.pids == {}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"device_kind": "npu"}, "deployment tiny asks for npu devices; a local site runs cpu or cuda slices"),
        ({"engine": "vllm"}, "deployment tiny: weights: random is for the builtin engine's smoke tests"),
        ({"devices": (0, 4096)}, r"CPU cores \[4096\]"),
    ],
)
def test_launches_this_machine_cannot_run_are_refused(home, fields, message):
    site = LocalSite(SiteShape())
    with pytest.raises(UserError, match=message):
        site.start([launch(**fields)])
    assert site.pids == {}


@pytest.mark.slow
def test_engine_that_exits_while_starting_is_reported_with_its_log(home):
    site = LocalSite(SiteShape())
    with pytest.raises(UserError, match=r"(?s)deployment broken exited with code 2.*no-such-arch"):
        site.start([launch(name="broken", arch="no-such-arch")])
    assert site.pids == {}


def test_engine_command_is_the_launch_entry_point_with_the_spec_as_data():
    argv = engine_command(launch(devices=(3, 1), weights="/w", engine_args=EngineArgs(dtype="bfloat16")), 8123)
    assert argv[1:3] == ["-m", "matrixstack.engine.launch"] and len(argv) == 4
    spec = parse_launch(argv[3])
    assert (spec.arch, spec.weights, spec.random_weights, spec.model_id) == ("tiny-moe", "/w", False, "tiny")
    assert (spec.host, spec.port, spec.device, spec.dtype, spec.log_level) == (
        "127.0.0.1",
        8123,
        "cpu",
        "bfloat16",
        "warning",
    )
    assert spec.cpus == ([1, 3] if hasattr(os, "sched_setaffinity") else None)
    random = parse_launch(engine_command(launch(device_kind="cuda"), 8124)[3])
    assert (random.weights, random.random_weights, random.cpus, random.max_model_len) == (None, True, None, 256)


@pytest.mark.slow
def test_a_killed_engine_comes_back_on_its_own_and_stop_leaves_nothing(home):
    told: queue.Queue[tuple[str, str, str]] = queue.Queue()
    site = LocalSite(SiteShape(), backoff=Backoff(first_s=0.2, max_s=1.0))
    try:
        (started,) = site.start([launch(name="crashy")], on_status=lambda *change: told.put(change))
        first = site.pids["crashy"]
        os.killpg(first, signal.SIGKILL)  # the engine and every process of its group, as the OOM killer might
        assert told.get(timeout=RESTART_TIMEOUT_S) == ("crashy", STATUS_RESTARTING, started.url)
        name, status, url = told.get(timeout=RESTART_TIMEOUT_S)
        assert (name, status) == ("crashy", STATUS_RUNNING)
        second = site.pids["crashy"]
        assert second != first and not group_alive(first)
        assert os.getpgid(second) == second and os.sched_getaffinity(second) == {0}
        client = openai.OpenAI(base_url=url, api_key=engine_secret(name), max_retries=0)
        reply = client.chat.completions.create(
            model="crashy", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
        )
        assert reply.usage.completion_tokens > 0
        log = (Path(home) / "logs" / "crashy.log").read_text()
        assert f"the engine of deployment crashy exited with code {-signal.SIGKILL}; starting it again in 0.2 s" in log
    finally:
        site.stop()
    assert not group_alive(second) and site.pids == {}
    assert told.empty()  # stopping is not a crash: nothing restarts it


def test_a_bad_launch_spec_names_the_field():
    with pytest.raises(UserError, match=r"(?s)engine launch spec.*workerz: Extra inputs"):
        parse_launch('{"arch": "tiny-moe", "workerz": 2}')
