"""The web dashboard: its state from real matrix pools, catalog and usage, and the page drawn by headless Chromium.

One SQLite database per module holds a real world: a pool over two 16-device copies of `ascend910c-8x-roce`
(two 8-device servers each) with three slices, one failed device, two deployments on two of the slices, a small
L0/L1/L2 catalog and a few usage records. `dashboard_state` is checked against it directly; the page is served
by the real portal (`create_portal_app`) on loopback and opened in headless Chromium, whose dumped DOM must show
every device and every catalog entry. The browser tests skip only when no Chromium binary is installed.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session

from matrixstack.fabric.loader import load_fabric
from matrixstack.matrix.failures import fail_device
from matrixstack.matrix.pools import create_pool, show_pool
from matrixstack.matrix.simulate import resize_pod
from matrixstack.matrix.slices import alloc_slice
from matrixstack.matrix.spec import SliceRequest
from matrixstack.matrix.tenants import create_tenant
from matrixstack.openai.server import ServerThread
from matrixstack.portal.app import create_portal_app
from matrixstack.portal.catalog_service import add_entry, catalog_tree
from matrixstack.portal.dashboard import DEPLOYMENT_COLOURS, USAGE_ENTRIES, dashboard_state
from matrixstack.portal.deployment_service import register_deployment
from matrixstack.portal.key_service import create_key
from matrixstack.portal.spec import BackendSpec, EntrySpec
from matrixstack.portal.store import open_portal_database
from matrixstack.portal.usage_service import UsageRecord, record_usage

FABRIC = resize_pod(load_fabric("ascend910c-8x-roce"), 2)  # two 8-NPU servers, scale-up inside a server only
POOL = "lab"
DEVICES = 2 * FABRIC.device_count  # two copies of the fabric in the pool
CHROMIUM = next(
    (
        shutil.which(n)
        for n in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
        if shutil.which(n)
    ),
    None,
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (CI installs Debian's chromium)"
)
ENTRIES = {  # name -> level
    "base-moe": "L0",
    "upstream-gpt": "L0",
    "finance-moe": "L1",
    "legal-moe": "L1",
    "report-writer": "L2",
    "quick-answer": "L2",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Build the module's world in a fresh SQLite file; return what the tests check against."""
    url = f"sqlite:///{tmp_path_factory.mktemp('dashboard') / 'portal.db'}"
    now = datetime.now(UTC)

    def build(session: Session) -> dict:
        create_pool(session, POOL, [FABRIC, FABRIC])
        serving = alloc_slice(session, POOL, "acme", SliceRequest(devices=6))
        small = alloc_slice(session, POOL, "acme", SliceRequest(devices=4))
        failed = (serving.fabric_index, serving.devices[0])
        failure = fail_device(session, POOL, failed, reason="HBM ECC errors")
        assert failure["action"] == "replaced"  # a free device of the same server took its place
        idle = alloc_slice(session, POOL, "globex", SliceRequest(devices=2))  # a slice nothing is deployed on
        slices = {s.id: s for s in show_pool(session, POOL).slices}
        create_tenant(session, "acme")
        _, admin_key = create_key(session, "acme", name="ops", admin=True)
        user, user_key = create_key(session, "acme", name="app")
        register_deployment(
            session, "moe-a", "engine", "http://127.0.0.1:9001/v1", arch="tiny-moe", pool=POOL, slice_id=serving.id
        )
        register_deployment(
            session, "moe-b", "vllm", "http://127.0.0.1:9002/v1", pool=POOL, slice_id=small.id, status="restarting"
        )
        add_entry(
            session,
            EntrySpec(
                name="base-moe",
                level="L0",
                backend=BackendSpec(kind="engine", url="http://127.0.0.1:9001/v1", deployment="moe-a"),
            ),
        )
        add_entry(
            session,
            EntrySpec(
                name="upstream-gpt",
                level="L0",
                provider="third-party",
                backend=BackendSpec(kind="upstream", url="https://api.example.com/v1", api_key="sk-upstream"),
            ),
        )
        add_entry(session, EntrySpec(name="finance-moe", level="L1", parent="base-moe", system_prompt="Finance."))
        add_entry(session, EntrySpec(name="legal-moe", level="L1", parent="base-moe", system_prompt="Law."))
        add_entry(session, EntrySpec(name="report-writer", level="L2", parent="finance-moe", stop=["END"]))
        add_entry(session, EntrySpec(name="quick-answer", level="L2", parent="base-moe", parameters={"max_tokens": 64}))
        record = functools.partial(usage, user, now)
        record_usage(
            session,
            [
                record("finance-moe", 100, 200, 5),
                record("finance-moe", 50, 150, 20),
                record("base-moe", 30, 70, 40),
                record("report-writer", 10, 0, 50, status=502),
                record("base-moe", 1000, 1000, 600),  # ten minutes ago: outside the 60-s window
            ],
        )
        return {
            "url": url,
            "now": now,
            "admin_key": admin_key,
            "user_key": user_key,
            "slices": slices,
            "serving": serving.id,
            "small": small.id,
            "idle": idle.id,
            "failed": failed,
            "user": user,
        }

    with open_portal_database(url) as database:
        return database.write(build)


def usage(key, now: datetime, entry: str, prompt: int, completion: int, age_s: float, status: int = 200):
    """Return the usage record of one request by `key` to `entry`, made `age_s` seconds before `now`."""
    return UsageRecord(
        tenant_id=key.tenant_id,
        key_id=key.id,
        entry=entry,
        prompt_tokens=prompt,
        completion_tokens=completion,
        status_code=status,
        latency_ms=120.0,
        ttft_ms=30.0,
        created_at=now - timedelta(seconds=age_s),
    )


def state_of(world: dict, after_s: float = 1.0) -> dict:
    """Return dashboard_state over the world `after_s` seconds after its usage records were written."""
    now = world["now"] + timedelta(seconds=after_s)
    with open_portal_database(world["url"]) as database:
        return database.read(lambda session: dashboard_state(session, now=now))


def devices_of(state: dict) -> dict[tuple[int, int], dict]:
    """Return every device of the state's one pool by (fabric index, device id)."""
    (pool,) = state["pools"]
    return {
        (fabric["index"], device["device"]): device | {"node": node["node"]}
        for fabric in pool["fabrics"]
        for node in fabric["nodes"]
        for device in node["devices"]
    }


# --- the state JSON --------------------------------------------------------------------------------------------


def test_state_draws_every_device_of_the_pool_by_fabric_and_node(world):
    state = state_of(world)
    assert set(state) == {"pools", "deployments", "catalog", "usage", "generated_at"}
    (pool,) = state["pools"]
    assert pool["name"] == POOL
    assert [f["index"] for f in pool["fabrics"]] == [0, 1]
    assert {f["name"] for f in pool["fabrics"]} == {FABRIC.name}
    per_node = FABRIC.device.devices_per_node
    for fabric in pool["fabrics"]:
        assert [n["node"] for n in fabric["nodes"]] == list(range(FABRIC.node_count))
        for node in fabric["nodes"]:
            assert [d["device"] for d in node["devices"]] == list(
                range(node["node"] * per_node, (node["node"] + 1) * per_node)
            )
    assert len(devices_of(state)) == DEVICES


def test_state_maps_each_slice_to_its_deployment_and_marks_the_failed_device(world):
    devices = devices_of(state_of(world))
    slices = world["slices"]
    held = {(s.fabric_index, d): s.id for s in slices.values() for d in s.devices}
    deployment_of = {world["serving"]: "moe-a", world["small"]: "moe-b", world["idle"]: None}
    assert devices[world["failed"]] == {
        "device": world["failed"][1],
        "state": "failed",
        "deployment": None,
        "slice": None,
        "node": world["failed"][1] // FABRIC.device.devices_per_node,
    }
    for where, device in devices.items():
        if where == world["failed"]:
            continue
        if where in held:
            assert device["state"] == "allocated"
            assert device["slice"] == held[where]
            assert device["deployment"] == deployment_of[held[where]]
        else:
            assert (device["state"], device["deployment"], device["slice"]) == ("free", None, None)
    states = [d["state"] for d in devices.values()]
    assert states.count("failed") == 1
    assert states.count("allocated") == 6 + 4 + 2  # the failed device's slice got a replacement
    assert states.count("free") == DEVICES - 13
    assert sum(d["deployment"] == "moe-a" for d in devices.values()) == 6
    assert sum(d["deployment"] == "moe-b" for d in devices.values()) == 4


def test_state_lists_deployments_with_distinct_palette_colours(world):
    deployments = state_of(world)["deployments"]
    assert [(d["name"], d["kind"], d["pool"], d["slice_id"], d["status"]) for d in deployments] == [
        ("moe-a", "engine", POOL, world["serving"], "running"),
        ("moe-b", "vllm", POOL, world["small"], "restarting"),  # its engine crashed; the site starts it again
    ]
    assert deployments[0]["url"] == "http://127.0.0.1:9001/v1"
    colours = [d["colour"] for d in deployments]
    assert len(set(colours)) == 2 and set(colours) <= set(DEPLOYMENT_COLOURS)
    assert "#d62728" not in DEPLOYMENT_COLOURS  # red means failed on the page


def test_state_catalog_is_the_portal_tree(world):
    state = state_of(world)
    with open_portal_database(world["url"]) as portal:
        assert state["catalog"] == portal.read(catalog_tree)
    seen = {}

    def walk(nodes, parent):
        for node in nodes:
            seen[node["name"]] = (node["level"], parent, node["provider"])
            walk(node["children"], node["name"])

    walk(state["catalog"], None)
    assert seen == {
        "base-moe": ("L0", None, "first-party"),
        "upstream-gpt": ("L0", None, "third-party"),
        "finance-moe": ("L1", "base-moe", "first-party"),
        "legal-moe": ("L1", "base-moe", "first-party"),
        "report-writer": ("L2", "finance-moe", "first-party"),
        "quick-answer": ("L2", "base-moe", "first-party"),
    }
    assert {name: level for name, (level, _, _) in seen.items()} == ENTRIES


def test_state_usage_sums_the_last_minute(world):
    usage = state_of(world)["usage"]
    prompt, completion = 100 + 50 + 30 + 10, 200 + 150 + 70 + 0
    assert usage == {
        "window_s": 60.0,
        "requests": 4,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "tokens_per_s": round((prompt + completion) / 60.0, 3),
        "entries": 3,
        "by_entry": [
            {"entry": "finance-moe", "requests": 2, "total_tokens": 500},
            {"entry": "base-moe", "requests": 1, "total_tokens": 100},
            {"entry": "report-writer", "requests": 1, "total_tokens": 10},
        ],
    }


def test_state_usage_window_ends_at_now(world):
    usage = state_of(world, after_s=-30.0)["usage"]  # the minute from 90 s to 30 s before the records' moment
    assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (2, 40, 70)
    assert [e["entry"] for e in usage["by_entry"]] == ["base-moe", "report-writer"]
    assert state_of(world, after_s=3600.0)["usage"]["by_entry"] == []


def test_state_of_an_empty_portal_is_empty_but_complete(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    with open_portal_database(url) as database:
        state = database.read(dashboard_state)
    assert state["pools"] == [] and state["deployments"] == [] and state["catalog"] == []
    assert state["usage"]["requests"] == 0 and state["usage"]["by_entry"] == []
    assert datetime.fromisoformat(state["generated_at"]).tzinfo is not None


# --- the page, served on loopback and drawn by headless Chromium ----------------------------------------------


class Dom(HTMLParser):
    """The elements of a dumped DOM: each start tag's attributes, and the text inside each element with an id."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, html: str):
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: dict[str, str] = {}
        self._open: list[str | None] = []  # the id of each open element (None when it has none)
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attributes = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attributes))
        if tag not in self.VOID:
            self._open.append(attributes.get("id"))
            if attributes.get("id"):
                self.text.setdefault(attributes["id"], "")

    def handle_endtag(self, tag):
        if tag not in self.VOID and self._open:
            self._open.pop()

    def handle_data(self, data):
        for element_id in {i for i in self._open if i}:
            self.text[element_id] += data

    def with_class(self, name: str) -> list[dict[str, str]]:
        """Return the attributes of every element whose class list has `name`."""
        return [a for _, a in self.elements if name in a.get("class", "").split()]

    def hidden(self, element_id: str) -> bool:
        """Return whether the element with this id carries the `hidden` attribute."""
        return next("hidden" in a for _, a in self.elements if a.get("id") == element_id)


def chromium(url: str, profile: Path, *extra: str) -> str:
    """Open `url` in headless Chromium with 5 s of virtual time (two polls) and return its stdout (the DOM)."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *extra,
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def portal_url(world):
    """Serve the world's portal on a loopback port for the module; return its root URL."""
    with ServerThread(create_portal_app(world["url"], log_json=True)) as server:
        yield server.url


def test_state_endpoint_wants_an_admin_key(world, portal_url):
    state_url = f"{portal_url}/dashboard/state"
    assert httpx.get(state_url).status_code == 401
    assert httpx.get(state_url, headers={"Authorization": "Bearer sk-not-a-key"}).status_code == 401
    assert httpx.get(state_url, headers={"Authorization": f"Bearer {world['user_key']}"}).status_code == 403
    answer = httpx.get(state_url, headers={"Authorization": f"Bearer {world['admin_key']}"})
    assert answer.status_code == 200
    assert answer.headers["cache-control"] == "no-store"
    state = answer.json()
    assert set(state) == {"pools", "deployments", "catalog", "usage", "generated_at"}
    assert len(devices_of(state)) == DEVICES


def test_page_and_static_files_need_no_outside_origin(portal_url):
    page = httpx.get(f"{portal_url}/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'src="/dashboard/static/dashboard.js"' in page.text
    assert 'href="/dashboard/static/dashboard.css"' in page.text
    assert "http://" not in page.text and "https://" not in page.text
    script = httpx.get(f"{portal_url}/dashboard/static/dashboard.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in script.text  # names from the server go in as text
    style = httpx.get(f"{portal_url}/dashboard/static/dashboard.css")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    assert httpx.get(f"{portal_url}/dashboard/static/dashboard.html").status_code == 404
    assert httpx.get(f"{portal_url}/dashboard/static/..%2Fapp.py").status_code == 404


@needs_chromium
def test_chromium_draws_the_matrix_catalog_and_usage(world, portal_url, tmp_path):
    with open_portal_database(world["url"]) as portal:  # two requests just now: in the portal's last minute for sure
        now = datetime.now(UTC)
        portal.write(
            lambda session: record_usage(
                session,
                [usage(world["user"], now, "legal-moe", 7, 9, 0), usage(world["user"], now, "quick-answer", 3, 4, 0)]
                + [usage(world["user"], now, f"quiet-{i:02}", 1, 0, 0) for i in range(USAGE_ENTRIES)],  # beyond the top
            )
        )
    dom = Dom(chromium(f"{portal_url}/dashboard#key={world['admin_key']}", tmp_path / "profile", "--dump-dom"))
    assert dom.hidden("error") and dom.hidden("key-form") and not dom.hidden("content")
    devices = dom.with_class("device")
    assert len(devices) == DEVICES
    assert all("data-state" in d and "data-deployment" in d for d in devices)
    assert [f["data-fabric"] for f in dom.with_class("fabric")] == ["0", "1"]
    assert len(dom.with_class("node")) == 2 * FABRIC.node_count
    failed = [d for d in devices if d["data-state"] == "failed"]
    assert len(failed) == 1 and failed[0]["data-device"] == str(world["failed"][1])
    held = {world["serving"]: "moe-a", world["small"]: "moe-b", world["idle"]: ""}
    allocated = [d for d in devices if d["data-state"] == "allocated"]
    assert len(allocated) == 12
    for device in allocated:
        assert device["data-deployment"] == held[int(device["data-slice"])]
        if device["data-deployment"]:
            assert "background" in device["style"]
    assert sum(d["data-state"] == "free" and d["data-deployment"] == "" for d in devices) == DEVICES - 13
    legend = {a["data-deployment"]: a["data-status"] for a in dom.with_class("legend-item") if "data-deployment" in a}
    assert legend == {"moe-a": "running", "moe-b": "restarting"}

    entries = {a["data-name"]: a["data-level"] for a in dom.with_class("entry")}
    assert entries == ENTRIES
    assert "third-party" in dom.text["catalog"]

    shown = {a["data-entry"] for a in dom.with_class("usage-entry")}
    assert {"legal-moe", "quick-answer"} <= shown and len(shown) == USAGE_ENTRIES  # the busiest only
    assert re.fullmatch(r"and \d+ more entries with fewer tokens", dom.text["usage-more"])
    assert int(dom.text["usage-requests"].replace(",", "")) >= 2
    assert int(dom.text["usage-tokens"].replace(",", "")) >= 7 + 9 + 3 + 4
    assert float(dom.text["usage-tokens_per_s"].replace(",", "")) > 0
    assert "live" in dom.text["status-text"]


@needs_chromium
def test_chromium_shows_a_clear_message_for_a_refused_key(world, portal_url, tmp_path):
    dom = Dom(chromium(f"{portal_url}/dashboard#key=sk-wrong", tmp_path / "profile", "--dump-dom"))
    assert not dom.hidden("error") and "refused this key (401)" in dom.text["error"]
    assert not dom.hidden("key-form") and dom.hidden("content")
    assert dom.with_class("device") == []

    dom = Dom(chromium(f"{portal_url}/dashboard#key={world['user_key']}", tmp_path / "profile2", "--dump-dom"))
    assert "not an admin key (403)" in dom.text["error"]
    assert dom.hidden("content")


@needs_chromium
def test_chromium_without_a_key_asks_for_one(portal_url, tmp_path):
    dom = Dom(chromium(f"{portal_url}/dashboard", tmp_path / "profile", "--dump-dom"))
    assert not dom.hidden("key-form") and dom.hidden("content") and dom.hidden("error")
    assert "waiting for a key" in dom.text["status-text"]
