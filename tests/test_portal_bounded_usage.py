"""No client can grow the portal's database, log or dashboard without bound: every authenticated request counts
against its key's limits whatever its outcome, client strings are bounded before they are stored or logged, usage is
stored by catalog entry (one "unknown" bucket for names that resolve to nothing), and the usage report and the
dashboard's usage are aggregated in SQL and come in bounded pages.

A real engine server process behind a real portal on loopback, over SQLite and over PostgreSQL; the client is the
official `openai` package (raw bodies through httpx where the client would refuse to send them).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import httpx
import openai
import pytest

from matrixstack.portal.catalog_service import add_entry
from matrixstack.portal.dashboard import USAGE_ENTRIES, dashboard_state
from matrixstack.portal.gateway import UNKNOWN_ENTRY
from matrixstack.portal.key_service import create_key
from matrixstack.portal.server import PortalThread
from matrixstack.portal.spec import EntrySpec
from matrixstack.portal.usage_service import MAX_PAGE, UsageRecord, record_usage, usage_report

USER = [{"role": "user", "content": "How are we doing?"}]
MIB = 2**20
LOG_LINE_MAX = 4096  # bytes: a request's log line, whatever the client sent


@pytest.fixture(scope="module")
def upstream(engine_process):
    """Start `matrixstack engine serve tiny-moe` on a free port in a second process; return its base URL."""
    return engine_process("--max-model-len", "256", "--num-kv-blocks", "32", "--max-num-seqs", "4")[1]


@pytest.fixture
def portal(upstream, db_url):
    """Yield a running portal over a fresh database (SQLite or PostgreSQL) with one L0 entry and an admin key."""
    with PortalThread(db_url, usage_interval_s=0.05) as server:
        database = server.portal.db
        spec = EntrySpec(name="tiny", level="L0", backend={"kind": "engine", "url": upstream})
        database.write(lambda session: add_entry(session, spec))
        server.admin_key = database.write(lambda session: create_key(session, "ops", admin=True))[1]
        yield server


def post(portal: PortalThread, key: str, body: dict) -> httpx.Response:
    """POST `body` to the portal's chat route with `key`."""
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{portal.base_url}/chat/completions", json=body, headers=headers, timeout=60)


def test_every_authenticated_request_counts_against_rpm_whatever_its_outcome(portal):
    _, key = portal.portal.db.write(lambda session: create_key(session, "counted", rpm_limit=2))
    c = openai.OpenAI(base_url=portal.base_url, api_key=key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-model", messages=USER, max_tokens=1)
    assert post(portal, key, {"model": "tiny"}).status_code == 400  # no messages
    with pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(model="tiny", messages=USER, max_tokens=1)
    assert err.value.code == "rate_limit_exceeded" and int(err.value.response.headers["Retry-After"]) >= 1


def test_huge_client_strings_are_refused_or_bounded_in_the_database_and_the_log(portal, caplog):
    caplog.set_level(logging.INFO, logger="matrixstack.portal")
    database = portal.portal.db
    _, key = database.write(lambda session: create_key(session, "flooder"))
    c = openai.OpenAI(base_url=portal.base_url, api_key=key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="m" * MIB, messages=USER, max_tokens=1)
    assert err.value.param == "model" and err.value.code == "string_above_max_length"
    for n in range(3):  # unknown names within the bound: 404, stored in the one unknown bucket
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model=f"{n}" * 200, messages=USER, max_tokens=1)
    assert post(portal, key, {"model": "tiny", "messages": USER, "max_tokens": "x" * MIB}).status_code == 400
    assert c.chat.completions.create(model="tiny", messages=USER, max_tokens=1).model == "tiny"

    assert portal.portal.writer.flush()
    rows = database.read(lambda session: usage_report(session, ("tenant", "entry")))
    mine = {r["entry"]: r["requests"] for r in rows if r["tenant"] == "flooder"}
    assert mine == {UNKNOWN_ENTRY: 4, "tiny": 1}
    lines = [r.getMessage() for r in caplog.records if r.name == "matrixstack.portal"]
    assert len(lines) >= 6 and all(len(line.encode()) <= LOG_LINE_MAX for line in lines)
    assert {json.loads(line)["status"] for line in lines} >= {400, 404, 200}


def many_entries_of_usage(portal: PortalThread, entries: int) -> None:
    """Write one usage record for each of `entries` entry names, the i-th with i + 1 completion tokens."""
    info, _ = portal.portal.db.write(lambda session: create_key(session, "busy"))
    now = datetime.now(UTC)
    records = [UsageRecord(info.tenant_id, info.id, f"e{i:03}", 1, i + 1, 200, 5.0, created_at=now)
               for i in range(entries)]  # fmt: skip
    portal.portal.db.write(lambda session: record_usage(session, records))


def test_dashboard_usage_is_aggregated_and_bounded(portal):
    many_entries_of_usage(portal, USAGE_ENTRIES + 10)
    usage = portal.portal.db.read(dashboard_state)["usage"]
    n = USAGE_ENTRIES + 10
    assert usage["requests"] == n and usage["completion_tokens"] == n * (n + 1) // 2  # every entry counted
    assert len(usage["by_entry"]) == USAGE_ENTRIES and usage["entries"] == n  # the busiest shown
    assert usage["by_entry"][0] == {"entry": f"e{n - 1:03}", "requests": 1, "total_tokens": n + 1}


def test_admin_usage_comes_in_bounded_pages(portal):
    many_entries_of_usage(portal, 25)
    with httpx.Client(base_url=portal.url, headers={"Authorization": f"Bearer {portal.admin_key}"}) as http:
        pages = [http.get("/admin/usage", params={"group_by": "entry", "limit": 10, "offset": o}) for o in (0, 10, 20)]
        assert [len(p.json()) for p in pages] == [10, 10, 5]
        assert sorted(r["entry"] for p in pages for r in p.json()) == [f"e{i:03}" for i in range(25)]
        assert len(http.get("/admin/usage", params={"group_by": "entry"}).json()) == 25
        too_big = http.get("/admin/usage", params={"limit": MAX_PAGE + 1})
        assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "query.limit"
