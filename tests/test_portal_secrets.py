"""Secrets of the portal as an attacker or an unlucky operator would find them (issue 15, points 6, 7, 8, 9's revoke).

A real loopback upstream (FastAPI on a uvicorn thread) checks the portal's key and, when asked, echoes every header
it got — the portal's own `Authorization: Bearer` secret — in its error bodies (401, 429, 400, 500, and an error
event in the middle of a stream). A real `matrixstack portal serve` in a second process, its data directory a
temporary one, writes its log into that directory; the secrets are planted through the admin API, the CLI (a real
subprocess) and an `env:` reference. Then:
- every byte of every file under the data directory (the SQLite database, its WAL, the log) holds no secret, the
  directory is 0700 and the database files and key file 0600; an old database with a key in clear is sealed when
  it is opened, and requests through the upstream still authenticate;
- the tenant's answers to failed upstream requests carry the portal's own error, never the upstream's body;
- `/metrics` names no private entry without a scrape token or an admin key, and asks for one when configured;
- a key revoked by the CLI is refused by a running portal within a second of the CLI's return.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from matrixstack.openai.server import ServerThread
from matrixstack.portal.catalog_service import add_entries, get_entry
from matrixstack.portal.key_service import create_key
from matrixstack.portal.server import PortalThread
from matrixstack.portal.spec import EntrySpec
from matrixstack.portal.store import CatalogEntryRow, open_portal_database
from matrixstack.stack.local_site import LocalSite, engine_log_dir
from matrixstack.stack.spec import SiteShape

WAIT_S = 60.0  # a failure guard for start-ups, never a timing assertion
REVOKE_DEADLINE_S = 1.0  # the bound: a key revoked anywhere is refused within a second
GOOD_KEY = "sk-planted-" + secrets.token_hex(16)  # the upstream's real key: what must never be found in clear
WRONG_KEY = "wrongly-" + secrets.token_hex(16)  # a key the upstream refuses (echoed in its 401); not sk-shaped
UPSTREAM_ENV = "FAKE_VENDOR_KEY"
SECRETS = (GOOD_KEY.encode(), WRONG_KEY.encode())
USER = [{"role": "user", "content": "hi"}]
CLI = [sys.executable, "-c", "from matrixstack.cli.main import app; app()"]


# ---- the upstream -------------------------------------------------------------------------------------------------


def echo(request: Request) -> str:
    """Return every header of `request`, the secret the portal sent included, as a careless vendor would."""
    return "you sent " + ", ".join(f"{k}: {v}" for k, v in request.headers.items())


def upstream_app() -> FastAPI:
    """An OpenAI-like vendor that checks the key and, by model id, fails in one way or another, echoing headers."""
    app = FastAPI()

    def failure(status: int, request: Request, code: str) -> JSONResponse:
        body = {"error": {"message": echo(request), "type": "invalid_request_error", "param": None, "code": code}}
        return JSONResponse(body, status_code=status)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {GOOD_KEY}":
            return failure(401, request, "invalid_api_key")
        body = await request.json()
        model = body["model"]
        fails = {"boom": 500, "busy": 429, "refuse": 400, "forbid": 403}
        if model in fails:
            return failure(fails[model], request, model)
        if body.get("stream"):
            return StreamingResponse(_stream(model, echo(request)), media_type="text/event-stream")
        return JSONResponse(
            {"id": "c1", "object": "chat.completion", "created": 1, "model": model,
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
        )  # fmt: skip

    return app


async def _stream(model: str, echoed: str):
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model,
             "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]}  # fmt: skip
    yield f"data: {json.dumps(chunk)}\n\n"
    if model == "cut":  # an error in the middle of the stream, echoing the headers
        yield f"data: {json.dumps({'error': {'message': echoed, 'type': 'server_error', 'code': 500}})}\n\n"
        return
    yield "data: [DONE]\n\n"


@pytest.fixture(scope="module")
def upstream():
    """Return the base URL (…/v1) of the test vendor on a uvicorn thread."""
    with ServerThread(upstream_app()) as server:
        yield f"{server.url}/v1"


def vendor(name: str, url: str, model: str, api_key: str | None = GOOD_KEY, kind: str = "upstream", **kw) -> dict:
    """Return an L0 entry (as JSON) whose backend is the test vendor asked for `model`."""
    backend = {"kind": kind, "url": url, "model": model, "api_key": api_key}
    return {"name": name, "level": "L0", "provider": "third-party", "backend": backend, **kw}


# ---- a portal in a second process, its data directory a temporary one ------------------------------------------


class Served:
    """A `matrixstack portal serve` process with MATRIXSTACK_HOME at `home` and its log in `home/logs/portal.log`."""

    def __init__(self, home: Path, env: dict[str, str], db_args: list[str]):
        self.home, self.env, self.db_args = home, env, db_args
        self.log_path = home / "logs" / "portal.log"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run `matrixstack ARGS` as a user would (a new process on the same data directory and database)."""
        done = subprocess.run([*CLI, *args, *self.db_args], env=self.env, capture_output=True, text=True, timeout=120)
        assert not check or done.returncode == 0, done.stdout + done.stderr
        return done

    def start(self, *serve_args: str) -> Served:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = self.log_path.open("w")
        cmd = [*CLI, "portal", "serve", "--port", "0", "--log-level", "warning", *self.db_args, *serve_args]
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + WAIT_S
        while not (found := re.search(r"(http://127\.0\.0\.1:\d+)/v1", self.log_path.read_text())):
            assert self.process.poll() is None, "portal serve exited:\n" + self.log_path.read_text()
            assert time.monotonic() < deadline, "portal serve did not start:\n" + self.log_path.read_text()
            time.sleep(0.1)
        self.url = found.group(1)
        while True:
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert self.process.poll() is None and time.monotonic() < deadline, "portal serve did not come up"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MATRIXSTACK_SECRET_KEY"}
    return env | {"MATRIXSTACK_HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="module")
def served(tmp_path_factory, upstream):
    """A portal process on the default database of a fresh data directory, an admin key and a tenant key, and the
    vendor's entries: the key planted through the admin API, the CLI and an environment variable."""
    home = tmp_path_factory.mktemp("secrets") / "home"
    portal = Served(home, _env(home, **{UPSTREAM_ENV: GOOD_KEY}), [])
    portal.keys = {
        "admin": json.loads(portal.cli("key", "create", "--tenant", "ops", "--admin", "--json").stdout)["key"],
        "acme": json.loads(portal.cli("key", "create", "--tenant", "acme", "--json").stdout)["key"],
    }
    entry_file = home.parent / "vendor-cli.json"  # outside the data directory: the operator's own file
    entry_file.write_text(json.dumps(vendor("vendor-cli", upstream, "ok")))
    portal.cli("catalog", "add", str(entry_file))
    portal.start()
    entries = [
        vendor("vendor", upstream, "ok"),
        vendor("vendor-env", upstream, "ok", f"env:{UPSTREAM_ENV}"),
        vendor("vendor-wrong", upstream, "ok", WRONG_KEY),
        *(vendor(f"vendor-{m}", upstream, m) for m in ("boom", "busy", "refuse", "forbid", "cut")),
        vendor("ours-refuse", upstream, "refuse", kind="engine"),  # a deployment the portal runs, refusing
        vendor("ours-boom", upstream, "boom", kind="engine"),
    ]
    with httpx.Client(base_url=portal.url, headers={"Authorization": f"Bearer {portal.keys['admin']}"}) as http:
        added = http.post("/admin/catalog", json={"entries": entries})
        assert added.status_code == 200, added.text
    try:
        yield portal
    finally:
        portal.stop()


def tenant(portal, key: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{portal.url}/v1", api_key=portal.keys[key], max_retries=0)


def found_secrets(folder: Path) -> list[str]:
    """Return 'FILE: SECRET' for each planted secret found in the bytes of any file under `folder`."""
    hits = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        hits += [f"{path}: {s.decode()[:14]}..." for s in SECRETS if s in data]
    return hits


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- point 6: secrets at rest ---------------------------------------------------------------------------------


def test_no_secret_in_clear_under_the_data_directory(served):
    c = tenant(served)
    for entry in ("vendor", "vendor-cli", "vendor-env"):  # the upstream checks the key: each still authenticates
        assert c.chat.completions.create(model=entry, messages=USER).choices[0].message.content == "ok"
        streamed = list(c.chat.completions.create(model=entry, messages=USER, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == "ok"
    with pytest.raises(openai.APIStatusError):  # an upstream that echoes the secret it refused, into the log
        c.chat.completions.create(model="vendor-wrong", messages=USER)
    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {served.keys['admin']}"}) as http:
        shown = http.get("/admin/catalog").text + http.get("/admin/catalog/vendor").text
    shown += served.cli("catalog", "list", "--json").stdout + served.cli("catalog", "show", "vendor-cli").stdout
    assert all(s.decode() not in shown for s in SECRETS)  # the admin API and the CLI mask it
    entries = {e["name"]: e for e in json.loads(served.cli("catalog", "list", "--json").stdout)}
    assert entries["vendor"]["backend"]["api_key"] == "set"
    assert entries["vendor-env"]["backend"]["api_key"] == f"env:{UPSTREAM_ENV}"  # a reference: never resolved here

    time.sleep(0.5)  # the portal's log writer writes every 100 ms
    assert found_secrets(served.home) == []  # while it runs: the database, its -wal and -shm, the log
    db = served.home / "matrixstack.db"
    assert {p.name for p in served.home.glob("matrixstack.db*")} >= {"matrixstack.db", "matrixstack.db-wal"}
    assert mode(served.home) == 0o700
    for path in [*served.home.glob("matrixstack.db*"), served.home / "secret.key"]:
        assert mode(path) == 0o600, path
    with sqlite3.connect(db) as conn:  # what is stored is sealed
        (spec,) = conn.execute("SELECT spec FROM catalog_entries WHERE name = 'vendor'").fetchone()
    assert json.loads(spec)["backend"]["api_key"].startswith("enc:v1:")


def test_an_old_database_with_a_key_in_clear_is_sealed_when_opened(tmp_path, monkeypatch, upstream):
    home = tmp_path / "home"
    monkeypatch.setenv("MATRIXSTACK_HOME", str(home))
    monkeypatch.delenv("MATRIXSTACK_SECRET_KEY", raising=False)
    with open_portal_database() as db:  # rows as an earlier version wrote them: the key in clear
        old = CatalogEntryRow(name="old", level="L0", spec=vendor("old", upstream, "ok"))
        db.write(lambda session: session.add(old))
        _, key = db.write(lambda session: create_key(session, "acme"))
    home.chmod(0o755)
    for path in home.glob("matrixstack.db*"):
        path.chmod(0o644)
    assert found_secrets(home) != []  # the precondition: the old version left it in clear

    with open_portal_database() as db:  # the upgrade: the first open seals it
        stored = db.read(lambda session: get_entry(session, "old")).backend.api_key
    assert stored.startswith("enc:v1:") and found_secrets(home) == []
    assert mode(home) == 0o700 and all(mode(p) == 0o600 for p in home.glob("matrixstack.db*"))
    with PortalThread(None) as portal:  # and the portal still authenticates to the upstream with it
        c = openai.OpenAI(base_url=portal.base_url, api_key=key, max_retries=0)
        assert c.chat.completions.create(model="old", messages=USER).choices[0].message.content == "ok"


def test_the_cli_and_the_local_site_keep_what_they_write_private(tmp_path, monkeypatch, cli):
    monkeypatch.setenv("MATRIXSTACK_HOME", str(tmp_path / "home"))
    previous = os.umask(0o022)  # a usual umask: files 0644, folders 0755
    try:
        assert cli("fabric", "list").exit_code == 0
        assert os.umask(previous) == 0o077  # what a command creates (engine logs, exported weights) is 0600 / 0700
    finally:
        os.umask(previous)
    LocalSite(SiteShape()).start([])  # no engine: only the folder of the engine logs
    assert mode(engine_log_dir()) == 0o700


# ---- point 8: upstream errors --------------------------------------------------------------------------------


def test_upstream_failures_become_the_portals_own_errors(served):
    c = tenant(served)
    expected = {  # entry: (status, code) the tenant gets
        "vendor-wrong": (502, "upstream_auth_failed"),
        "vendor-forbid": (502, "upstream_auth_failed"),
        "vendor-boom": (502, "upstream_error"),
        "vendor-busy": (503, "upstream_busy"),
        "vendor-refuse": (400, "upstream_refused"),
        "ours-boom": (502, "upstream_error"),
    }
    for entry, (status, code) in expected.items():
        for stream in (False, True):
            answer = httpx.post(
                f"{served.url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {served.keys['acme']}"},
                json={"model": entry, "messages": USER, "stream": stream},
            )
            assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), (entry, answer.text)
            assert "you sent" not in answer.text and "authorization" not in answer.text.lower(), answer.text
    with pytest.raises(openai.BadRequestError) as err:  # a deployment's client-fault message reaches the client,
        c.chat.completions.create(model="ours-refuse", messages=USER)  # scrubbed of secrets
    assert "you sent" in err.value.message and GOOD_KEY not in err.value.message
    events = httpx.post(  # an error in the middle of a stream: the portal's own error event
        f"{served.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {served.keys['acme']}"},
        json={"model": "vendor-cut", "messages": USER, "stream": True},
    ).text
    assert '"code":"upstream_error"' in events.replace(" ", "") and "you sent" not in events
    probe = httpx.post(  # a backend key in a log line by another way (the model name is logged as sent)
        f"{served.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {served.keys['acme']}"},
        json={"model": f"probe-{WRONG_KEY}", "messages": USER},
    )
    assert probe.status_code == 404
    time.sleep(0.5)  # the portal's log writer writes every 100 ms
    log = served.log_path.read_text()
    assert "vendor-wrong" in log and "probe-[redacted]" in log and all(s.decode() not in log for s in SECRETS)


# ---- point 7: /metrics -----------------------------------------------------------------------------------------


@pytest.fixture
def metered(tmp_path, upstream):
    """Return a function starting a portal (PortalThread) with `app_options` over a catalog with acme's private
    entry `acme-secret-project` and the public `vendor`, both called once."""
    url = f"sqlite:///{tmp_path / 'portal.db'}"
    with open_portal_database(url) as db:
        keys = {
            "admin": db.write(lambda session: create_key(session, "ops", admin=True))[1],
            "acme": db.write(lambda session: create_key(session, "acme"))[1],
        }
        entries = [vendor("vendor", upstream, "ok"), vendor("acme-secret-project", upstream, "ok", owner="acme")]
        db.write(lambda session: add_entries(session, [EntrySpec.model_validate(e) for e in entries]))
    started = []

    def start(**app_options) -> PortalThread:
        portal = PortalThread(url, **app_options).start()
        started.append(portal)
        portal.keys = keys
        c = openai.OpenAI(base_url=portal.base_url, api_key=keys["acme"], max_retries=0)
        for entry in ("vendor", "acme-secret-project"):
            c.chat.completions.create(model=entry, messages=USER)
        return portal

    yield start
    for portal in started:
        portal.stop()


def _scrape(portal, token: str | None = None) -> httpx.Response:
    return httpx.get(f"{portal.url}/metrics", headers={"Authorization": f"Bearer {token}"} if token else {})


def test_metrics_without_a_scrape_token_name_no_private_entry(metered):
    portal = metered()
    public = _scrape(portal)
    assert public.status_code == 200
    assert "acme-secret-project" not in public.text
    assert 'entry="vendor"' in public.text and 'entry="(private)"' in public.text  # counted, not named
    assert re.search(r'matrixstack_requests_total\{[^}]*entry="\(private\)"[^}]*status="200"\} 1\.0', public.text)
    assert "acme-secret-project" not in _scrape(portal, portal.keys["acme"]).text  # a tenant's key sees no more
    assert 'entry="acme-secret-project"' in _scrape(portal, portal.keys["admin"]).text  # an admin key sees all


def test_metrics_with_a_scrape_token_ask_for_it(metered):
    portal = metered(metrics_token="scrape-token-123")
    for refused in (_scrape(portal), _scrape(portal, "not-the-token")):
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert "acme-secret-project" not in refused.text
    assert _scrape(portal, portal.keys["acme"]).status_code == 403
    for allowed in ("scrape-token-123", portal.keys["admin"]):  # as Prometheus' `authorization` sends it
        text = _scrape(portal, allowed).text
        assert 'entry="acme-secret-project"' in text and "# TYPE matrixstack_requests_total" in text


# ---- point 9: a key revoked by the CLI -------------------------------------------------------------------------


@pytest.fixture
def revoking(tmp_path, db_url):
    home = tmp_path / "home"
    portal = Served(home, _env(home), ["--db", db_url])
    portal.keys = {"acme": json.loads(portal.cli("key", "create", "--tenant", "acme", "--json").stdout)["key"]}
    portal.start()
    try:
        yield portal
    finally:
        portal.stop()


def test_a_key_revoked_by_the_cli_is_refused_within_a_second(revoking):
    key = revoking.keys["acme"]
    models = httpx.Client(base_url=revoking.url, headers={"Authorization": f"Bearer {key}"})
    assert models.get("/v1/models").status_code == 200  # the portal holds the key in its cache now
    revoking.cli("key", "revoke", key[:12])
    deadline = time.monotonic() + REVOKE_DEADLINE_S
    while (status := models.get("/v1/models").status_code) == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status == 401
