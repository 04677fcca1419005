"""The HTTP portal end to end: a real portal (uvicorn on loopback) in front of a real engine server process.

The upstream is `matrixstack engine serve tiny-moe --random-weights` in a second process, started once for the
module. The portal runs on a background thread of this process (`PortalThread`) over a SQLite file; the test
client is the official `openai` package (admin routes and /metrics through httpx). The catalog:

    tiny (L0, engine backend)  ->  tiny-finance (L1)  ->  tiny-finance-brief (L2: defaults, ranges, stop)
                               ->  acme-notes (L2, private to tenant acme)
    deepseek-r1 (L0, third-party, an `upstream` backend with its own secret, pointing at the same engine)
"""

from __future__ import annotations

import json
import logging
import re
import time

import httpx
import openai
import pytest

from matrixstack.fabric.loader import load_fabric
from matrixstack.matrix.pools import create_pool
from matrixstack.matrix.simulate import resize_pod
from matrixstack.matrix.slices import alloc_slice
from matrixstack.matrix.spec import SliceRequest
from matrixstack.portal.catalog_service import add_entries
from matrixstack.portal.gateway import UNKNOWN_ENTRY
from matrixstack.portal.key_service import create_key, list_keys
from matrixstack.portal.metrics import METRIC_NAMES
from matrixstack.portal.server import PortalThread
from matrixstack.portal.spec import EntrySpec
from matrixstack.portal.store import open_portal_database
from matrixstack.portal.usage_service import UsageRecord, record_usage, usage_report

WAIT_S = 30.0  # deadline of the polls below: a failure guard, never a timing assertion
UPSTREAM_MODEL = "tiny-moe"
NO_EOS = {"ignore_eos": True}  # the engine's extension: generate exactly max_tokens tokens
L1_PROMPT = "You are a careful financial analyst."
L2_PROMPT = "Answer in one short sentence."
KNOWLEDGE = "The fiscal year ends in March."
# What reaches the backend for the L2 entry: L1 and L2 prompts joined root first, then the reference material.
RESOLVED_SYSTEM = f"{L1_PROMPT}\n\n{L2_PROMPT}\n\nReference material:\n{KNOWLEDGE}"
USER = [{"role": "user", "content": "How are we doing?"}]


# ---- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(engine_process):
    """Start `matrixstack engine serve tiny-moe` on a free port in a second process; yield its base URL."""
    return engine_process("--max-model-len", "256", "--num-kv-blocks", "96", "--max-num-seqs", "8")[1]


@pytest.fixture(scope="module")
def portal(upstream, tmp_path_factory):
    """Yield a running portal over a fresh database with the module's catalog and keys (`portal.keys`)."""
    db_url = f"sqlite:///{tmp_path_factory.mktemp('portal') / 'portal.db'}"
    with open_portal_database(db_url) as svc:
        keys = {
            "admin": svc.write(lambda session: create_key(session, "ops", name="admin", admin=True))[1],
            "acme": svc.write(lambda session: create_key(session, "acme"))[1],
            "globex": svc.write(lambda session: create_key(session, "globex"))[1],
        }
        svc.write(
            lambda session: add_entries(
                session,
                [
                    EntrySpec(name="tiny", level="L0", backend={"kind": "engine", "url": upstream}),
                    EntrySpec(
                        name="tiny-finance", level="L1", parent="tiny", system_prompt=L1_PROMPT, knowledge=[KNOWLEDGE]
                    ),
                    EntrySpec(
                        name="tiny-finance-brief",
                        level="L2",
                        parent="tiny-finance",
                        system_prompt=L2_PROMPT,
                        parameters={"max_tokens": 3, "temperature": 0.2},
                        parameter_ranges={"temperature": (0.0, 0.5), "max_tokens": (1, 8)},
                        stop=["\n\n\n"],
                    ),
                    EntrySpec(name="acme-notes", level="L2", parent="tiny", owner="acme", system_prompt="Take notes."),
                    EntrySpec(
                        name="deepseek-r1",
                        level="L0",
                        provider="third-party",
                        description="a hosted model behind its vendor's OpenAI API",
                        backend={
                            "kind": "upstream",
                            "url": upstream,
                            "model": UPSTREAM_MODEL,
                            "api_key": "vendor-secret",
                        },
                    ),
                ],
            )
        )
    server = PortalThread(db_url, usage_interval_s=0.05)
    server.keys = keys
    with server:
        yield server


def client(portal, key: str) -> openai.OpenAI:
    """Return an OpenAI client of the portal for `key` (no retries: a 429 must reach the test)."""
    return openai.OpenAI(base_url=portal.base_url, api_key=key, max_retries=0)


def new_key(portal, tenant: str, **limits) -> tuple[int, str]:
    """Create a key straight in the database; return (its id, the plaintext)."""
    info, plaintext = portal.portal.db.write(lambda session: create_key(session, tenant, **limits))
    return info.id, plaintext


def admin(portal) -> httpx.Client:
    return httpx.Client(base_url=portal.url, headers={"Authorization": f"Bearer {portal.keys['admin']}"}, timeout=60)


def chat(c: openai.OpenAI, model: str, max_tokens: int | None = 4, **kw):
    extra = {"max_tokens": max_tokens} if max_tokens is not None else {}
    return c.chat.completions.create(model=model, messages=USER, extra_body=NO_EOS, **extra, **kw)


# ---- /v1 -------------------------------------------------------------------------------------------------------


def test_models_are_listed_per_tenant(portal):
    acme = {m.id: m for m in client(portal, portal.keys["acme"]).models.list()}
    globex = {m.id for m in client(portal, portal.keys["globex"]).models.list()}
    assert set(acme) == {"tiny", "tiny-finance", "tiny-finance-brief", "acme-notes", "deepseek-r1"}
    assert globex == set(acme) - {"acme-notes"}
    brief = acme["tiny-finance-brief"].model_extra
    assert brief["level"] == "L2" and brief["parent"] == "tiny-finance" and brief["provider"] == "first-party"
    assert acme["deepseek-r1"].model_extra["provider"] == "third-party"
    assert client(portal, portal.keys["acme"]).models.retrieve("acme-notes").id == "acme-notes"
    with pytest.raises(openai.NotFoundError):
        client(portal, portal.keys["globex"]).models.retrieve("acme-notes")


def test_chat_and_completions_streamed_and_not_carry_usage(portal):
    c = client(portal, portal.keys["acme"])
    reply = chat(c, "tiny")
    assert reply.model == "tiny" and reply.usage.completion_tokens == 4 and reply.usage.prompt_tokens > 0
    # The client does not ask for usage: the portal still ends the stream with a usage chunk, then [DONE].
    chunks = list(chat(c, "tiny", stream=True))
    assert {ch.model for ch in chunks} == {"tiny"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

    text = c.completions.create(model="tiny", prompt="Hello", max_tokens=5, extra_body=NO_EOS)
    assert text.model == "tiny" and text.usage.completion_tokens == 5 and text.object == "text_completion"
    pieces = list(c.completions.create(model="tiny", prompt="Hello", max_tokens=5, stream=True, extra_body=NO_EOS))
    assert pieces[-1].choices == [] and pieces[-1].usage.total_tokens == text.usage.total_tokens
    with httpx.stream(
        "POST",
        f"{portal.base_url}/completions",
        headers={"Authorization": f"Bearer {portal.keys['acme']}"},
        json={"model": "tiny", "prompt": "Hi", "max_tokens": 2, "stream": True},
        timeout=60,
    ) as raw:
        events = [line for line in raw.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][5:])["usage"]["total_tokens"] > 0


def test_l2_entry_resolves_through_l1_to_l0(portal):
    c = client(portal, portal.keys["acme"])
    # The same conversation sent to the L0 with the resolved system prompt by hand costs the same prompt tokens:
    # the L2 request reached the backend with exactly the L1 + L2 prompts and the L1's reference material.
    manual = c.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": RESOLVED_SYSTEM}, *USER], max_tokens=1
    )
    brief = c.chat.completions.create(model="tiny-finance-brief", messages=USER, extra_body=NO_EOS)
    plain = chat(c, "tiny", max_tokens=1)
    assert brief.model == "tiny-finance-brief"
    assert brief.usage.prompt_tokens == manual.usage.prompt_tokens > plain.usage.prompt_tokens
    assert brief.usage.completion_tokens == 3  # the L2's max_tokens default caps the output
    assert chat(c, "tiny-finance-brief", max_tokens=5).usage.completion_tokens == 5  # a request's own value wins
    # completions: the system prompt becomes a prefix of the prompt
    prefixed = c.completions.create(model="tiny", prompt=f"{RESOLVED_SYSTEM}\n\nHello", max_tokens=1)
    scenario = c.completions.create(model="tiny-finance-brief", prompt="Hello", extra_body=NO_EOS)
    assert scenario.usage.prompt_tokens == prefixed.usage.prompt_tokens and scenario.usage.completion_tokens == 3
    # outside the L2's allowed ranges: 400 naming the param, before anything reaches the backend
    with pytest.raises(openai.BadRequestError) as err:
        chat(c, "tiny-finance-brief", temperature=0.9)
    assert err.value.body["param"] == "temperature" and "0.9" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="tiny-finance-brief", prompt="x", max_tokens=50)
    assert err.value.body["param"] == "max_tokens"
    streamed = list(chat(c, "tiny-finance-brief", max_tokens=None, stream=True))
    assert streamed[-1].model == "tiny-finance-brief" and streamed[-1].usage.completion_tokens == 3


def test_third_party_upstream_entry_works_like_a_first_party_one(portal):
    c = client(portal, portal.keys["globex"])
    reply = chat(c, "deepseek-r1", max_tokens=3)
    assert reply.model == "deepseek-r1" and reply.usage.completion_tokens == 3
    chunks = list(chat(c, "deepseek-r1", max_tokens=3, stream=True))
    assert chunks[-1].model == "deepseek-r1" and chunks[-1].usage.completion_tokens == 3
    text = c.completions.create(model="deepseek-r1", prompt="Hi", max_tokens=2, extra_body=NO_EOS)
    assert text.usage.completion_tokens == 2
    with admin(portal) as http:  # the vendor's secret is stored, never shown
        assert http.get("/admin/catalog/deepseek-r1").json()["backend"]["api_key"] == "set"


def test_backend_errors_pass_through_in_openai_format(portal):
    c = client(portal, portal.keys["acme"])
    with pytest.raises(openai.BadRequestError) as err:  # the engine refuses n=2 and says which param
        chat(c, "tiny", n=2)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:  # also when streamed: refused before the stream starts
        chat(c, "tiny", n=2, stream=True)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:  # the portal's own validation, same format
        chat(c, "tiny", temperature=5)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:  # a system prompt cannot prefix token ids
        c.completions.create(model="tiny-finance", prompt=[1, 2, 3], max_tokens=1)
    assert err.value.body["param"] == "prompt"


def test_auth_and_visibility_errors(portal):
    bare = httpx.post(f"{portal.base_url}/chat/completions", json={"model": "tiny", "messages": USER})
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"  # (the client needs a key)
    with pytest.raises(openai.AuthenticationError) as err:
        chat(client(portal, "sk-not-a-key"), "tiny")
    assert err.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as err:  # another tenant's private entry does not exist for globex
        chat(client(portal, portal.keys["globex"]), "acme-notes")
    assert err.value.code == "model_not_found" and err.value.body["param"] == "model"
    assert chat(client(portal, portal.keys["acme"]), "acme-notes").model == "acme-notes"
    with pytest.raises(openai.NotFoundError) as err:
        chat(client(portal, portal.keys["acme"]), "no-such-model")
    assert err.value.code == "model_not_found"
    # admin routes: no key 401, a tenant's key 403, the admin key 200
    assert httpx.get(f"{portal.url}/admin/catalog").status_code == 401
    denied = httpx.get(f"{portal.url}/admin/catalog", headers={"Authorization": f"Bearer {portal.keys['acme']}"})
    assert denied.status_code == 403 and set(denied.json()["error"]) == {"message", "type", "param", "code"}
    with admin(portal) as http:
        assert http.get("/admin/catalog").status_code == 200


def test_rate_and_token_limits_answer_429_with_retry_after(portal):
    _, rpm_key = new_key(portal, "limited", rpm_limit=2)
    c = client(portal, rpm_key)
    chat(c, "tiny", max_tokens=1)
    chat(c, "tiny", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as err:
        chat(c, "tiny", max_tokens=1)
    assert err.value.code == "rate_limit_exceeded"
    assert 1 <= int(err.value.response.headers["Retry-After"]) <= 60

    _, tpm_key = new_key(portal, "limited", tpm_limit=5)
    c = client(portal, tpm_key)
    assert chat(c, "tiny", max_tokens=2).usage.total_tokens > 5
    with pytest.raises(openai.RateLimitError) as err:
        chat(c, "tiny", max_tokens=1)
    assert err.value.code == "rate_limit_exceeded" and int(err.value.response.headers["Retry-After"]) >= 1

    _, quota_key = new_key(portal, "limited", token_quota=10)
    c = client(portal, quota_key)
    assert chat(c, "tiny", max_tokens=2).usage.total_tokens > 10
    with pytest.raises(openai.RateLimitError) as err:
        c.completions.create(model="tiny", prompt="x", max_tokens=1)
    assert err.value.code == "insufficient_quota" and int(err.value.response.headers["Retry-After"]) >= 1


def test_token_quota_counts_usage_already_in_the_database(portal):
    key_id, plaintext = new_key(portal, "veteran", token_quota=100)
    database = portal.portal.db
    tenant_id = next(k.tenant_id for k in database.read(lambda session: list_keys(session, "veteran")))
    database.write(
        lambda session: record_usage(session, [UsageRecord(tenant_id, key_id, "tiny", 60, 40, 200, 10.0)])
    )  # spent before this portal
    with pytest.raises(openai.RateLimitError) as err:
        chat(client(portal, plaintext), "tiny")
    assert err.value.code == "insufficient_quota"


def test_usage_rows_land_in_the_database_per_tenant_key_and_entry(portal):
    _, plaintext = new_key(portal, "initech")
    c = client(portal, plaintext)
    a = chat(c, "tiny", max_tokens=2)
    b = list(chat(c, "tiny-finance", max_tokens=3, stream=True))[-1]
    with pytest.raises(openai.NotFoundError):
        chat(c, "acme-notes")
    assert portal.portal.writer.flush()
    rows = portal.portal.db.read(lambda session: usage_report(session, group_by=("tenant", "key", "entry")))
    mine = {r["entry"]: r for r in rows if r["tenant"] == "initech"}
    assert set(mine) == {"tiny", "tiny-finance", UNKNOWN_ENTRY}  # another tenant's private entry: not for initech
    assert {r["key"] for r in mine.values()} == {plaintext[:12]}
    assert mine["tiny"]["prompt_tokens"] == a.usage.prompt_tokens and mine["tiny"]["completion_tokens"] == 2
    assert mine["tiny-finance"]["total_tokens"] == b.usage.total_tokens and mine["tiny-finance"]["errors"] == 0
    assert mine[UNKNOWN_ENTRY]["errors"] == 1 and mine[UNKNOWN_ENTRY]["total_tokens"] == 0


def test_metrics_carry_the_names_and_the_entry_label(portal):

    chat(client(portal, portal.keys["acme"]), "tiny-finance", max_tokens=2, stream=True).close()
    list(chat(client(portal, portal.keys["acme"]), "tiny-finance", max_tokens=2, stream=True))
    fabric = resize_pod(load_fabric("cloudmatrix384"), 2)  # 16 devices
    portal.portal.db.write(lambda session: create_pool(session, "metered", [fabric]))
    portal.portal.db.write(lambda session: alloc_slice(session, "metered", "acme", SliceRequest(devices=4)))
    text = httpx.get(f"{portal.url}/metrics").text
    for name in METRIC_NAMES:
        assert f"# TYPE {name}" in text, name
    # the L1 entry, served by its L0's engine backend given by URL (no deployment); labels sorted by name
    route = 'deployment="",entry="tiny-finance"'
    assert f'matrixstack_requests_total{{{route},lane="engine",status="200"}}' in text
    assert f'matrixstack_tokens_total{{{route},kind="completion",lane="engine"}}' in text
    assert f'matrixstack_ttft_seconds_count{{{route},lane="engine"}}' in text
    assert f'matrixstack_tpot_seconds_count{{{route},lane="engine"}}' in text
    assert 'matrixstack_matrix_utilisation{pool="metered"} 0.25' in text
    assert re.search(r"^matrixstack_queue_depth \d", text, re.M)


def test_one_json_log_line_per_request(portal, caplog):
    caplog.set_level(logging.INFO, logger="matrixstack.portal")
    reply = chat(client(portal, portal.keys["globex"]), "tiny", max_tokens=2)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "matrixstack.portal"]
    assert len(lines) == 1
    line = lines[0]
    assert line["tenant"] == "globex" and line["key"] == portal.keys["globex"][:12] and line["entry"] == "tiny"
    assert line["status"] == 200 and line["completion_tokens"] == 2
    assert line["prompt_tokens"] == reply.usage.prompt_tokens
    assert {"ts", "request_id", "latency_ms", "ttft_ms"} <= set(line)


def test_client_disconnect_is_metered_and_frees_the_request(portal):
    _, plaintext = new_key(portal, "quitter")
    stream = chat(client(portal, plaintext), "tiny", max_tokens=200, stream=True)
    next(iter(stream))
    stream.close()  # hang up after the first chunk
    database = portal.portal.db
    deadline = time.monotonic() + WAIT_S
    while True:
        portal.portal.writer.flush()
        rows = [
            r
            for r in database.read(lambda session: usage_report(session, group_by=("tenant",)))
            if r["tenant"] == "quitter"
        ]
        if rows:
            break
        assert time.monotonic() < deadline, "the cut stream was never metered"
        time.sleep(0.05)
    assert rows[0]["errors"] == 1 and rows[0]["completion_tokens"] < 200


# ---- admin API --------------------------------------------------------------------------------------------------


def test_admin_catalog_round_trip_is_visible_to_v1_at_once(portal):
    c = client(portal, portal.keys["globex"])
    entry = {"name": "tiny-legal", "level": "L1", "parent": "tiny", "system_prompt": "You are a lawyer."}
    with admin(portal) as http:
        added = http.post("/admin/catalog", json=entry)
        assert added.status_code == 200 and added.json()[0]["name"] == "tiny-legal"
        assert http.post("/admin/catalog", json=entry).status_code == 400  # exists already
        assert "tiny-legal" in {m.id for m in c.models.list()}
        assert chat(c, "tiny-legal", max_tokens=1).model == "tiny-legal"
        changed = http.patch("/admin/catalog/tiny-legal", json={"parameters": {"max_tokens": 2}})
        assert changed.status_code == 200 and changed.json()["parameters"] == {"max_tokens": 2}
        assert chat(c, "tiny-legal", max_tokens=None).usage.completion_tokens == 2
        assert http.get("/admin/catalog/tiny-legal").json()["system_prompt"] == "You are a lawyer."
        tree = {n["name"]: n for n in http.get("/admin/catalog-tree").json()}
        assert "tiny-legal" in {child["name"] for child in tree["tiny"]["children"]}
        assert http.patch("/admin/catalog/tiny-legal", json={"level": "L7"}).status_code == 400
        refused = http.delete("/admin/catalog/tiny")  # has children
        assert refused.status_code == 400 and "tiny-finance" in refused.json()["error"]["message"]
        assert http.delete("/admin/catalog/tiny-legal").status_code == 200
        assert http.get("/admin/catalog/tiny-legal").status_code == 404
        many = {"entries": [{"name": "tiny-a", "level": "L1", "parent": "tiny"}, {"name": "tiny-b", "level": "L2",
                                                                                   "parent": "tiny-a"}]}  # fmt: skip
        assert [e["name"] for e in http.post("/admin/catalog", json=many).json()] == ["tiny-a", "tiny-b"]
    with pytest.raises(openai.NotFoundError):
        chat(c, "tiny-legal")
    assert chat(c, "tiny-b", max_tokens=1).model == "tiny-b"


def test_admin_tenants_keys_usage_and_deployments(portal):
    with admin(portal) as http:
        assert http.post("/admin/tenants", json={"name": "umbrella"}).json() == {"name": "umbrella"}
        assert "umbrella" in {t["name"] for t in http.get("/admin/tenants").json()}
        assert http.post("/admin/tenants", json={"name": "bad name!"}).status_code == 400
        created = http.post("/admin/keys", json={"tenant": "umbrella", "name": "ci", "rpm_limit": 100}).json()
        plaintext = created["key"]
        assert plaintext.startswith("sk-") and created["prefix"] == plaintext[:12] and created["rpm_limit"] == 100
        c = client(portal, plaintext)
        assert chat(c, "tiny", max_tokens=1).model == "tiny"
        listed = http.get("/admin/keys", params={"tenant": "umbrella"}).json()
        assert [k["prefix"] for k in listed] == [plaintext[:12]] and "key" not in listed[0]
        limits = http.patch(f"/admin/keys/{created['prefix']}", json={"rpm_limit": None, "token_quota": 1})
        assert limits.json()["rpm_limit"] is None and limits.json()["token_quota"] == 1
        with pytest.raises(openai.RateLimitError):  # the new quota applies at once (the key cache is dropped)
            chat(c, "tiny", max_tokens=1)
        assert http.delete(f"/admin/keys/{created['prefix']}").json()["revoked"] is True
        with pytest.raises(openai.AuthenticationError):  # revoked through the admin API: at once
            chat(c, "tiny", max_tokens=1)

        portal.portal.writer.flush()
        usage = http.get("/admin/usage", params={"group_by": "tenant,entry"}).json()
        assert {"tenant": "umbrella", "entry": "tiny"}.items() <= next(
            r for r in usage if r["tenant"] == "umbrella"
        ).items()
        later = http.get("/admin/usage", params={"group_by": "tenant", "since": "2999-01-01T00:00:00Z"}).json()
        assert later == []
        bad = http.get("/admin/usage", params={"group_by": "colour"})
        assert bad.status_code == 400 and "colour" in bad.json()["error"]["message"]
        assert http.get("/admin/usage", params={"since": "yesterday"}).json()["error"]["param"] == "since"

        dep = {"name": "tiny-dep", "kind": "engine", "url": portal.base_url, "arch": "tiny-moe"}
        assert http.post("/admin/deployments", json=dep).json()["name"] == "tiny-dep"
        assert [d["name"] for d in http.get("/admin/deployments").json()] == ["tiny-dep"]
        assert http.delete("/admin/deployments/tiny-dep").status_code == 200
        assert http.get("/admin/deployments").json() == []


def test_openapi_schema_lists_the_routes(portal):
    schema = httpx.get(f"{portal.url}/openapi.json").json()
    paths = schema["paths"]
    for path in ("/v1/models", "/v1/chat/completions", "/v1/completions", "/admin/catalog", "/admin/catalog/{name}",
                 "/admin/catalog-tree", "/admin/tenants", "/admin/keys", "/admin/keys/{prefix}", "/admin/usage",
                 "/admin/deployments", "/metrics", "/health"):  # fmt: skip
        assert path in paths, path
    assert set(paths["/admin/catalog/{name}"]) == {"get", "patch", "delete"}
    assert "ChatCompletionRequest" in schema["components"]["schemas"]
    assert httpx.get(f"{portal.url}/health").json() == {"status": "ok", "deployments": {}}
