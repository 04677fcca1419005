"""What the portal says about its lanes: a real portal (uvicorn on loopback, `PortalThread`) over a SQLite file whose
deployments are registered as `up` registers them, called with the official `openai` client and httpx.

A request to a deployment that is restarting (or whose engine cannot be reached: it just died and its site has not
recorded it yet) is a 503 in OpenAI's error format with Retry-After; one that failed (its supervisor gave up) is a
503 without. `/health` names each deployment's status: 200 `ok` while all run, 200 `degraded` while some cannot
serve, 503 `unavailable` when nothing can (every deployment down and no upstream entry)."""

from __future__ import annotations

import httpx
import openai
import pytest

from matrixstack.portal.catalog_service import add_entries
from matrixstack.portal.deployment_service import register_deployment
from matrixstack.portal.key_service import create_key
from matrixstack.portal.server import PortalThread
from matrixstack.portal.spec import EntrySpec
from matrixstack.portal.store import open_portal_database
from matrixstack.stack.supervise import free_port

DEPLOYMENTS = ("up-one", "restarting-one", "failed-one", "dead-one")


def set_status(portal: PortalThread, name: str, status: str, url: str = "http://127.0.0.1:9/v1") -> None:
    portal.portal.db.write(lambda session: register_deployment(session, name, "engine", url, status=status))


@pytest.fixture
def portal(tmp_path, monkeypatch):
    monkeypatch.setenv("MATRIXSTACK_HOME", str(tmp_path))  # the data key the deployments' secrets derive from
    db_url = f"sqlite:///{tmp_path / 'portal.db'}"
    dead_url = f"http://127.0.0.1:{free_port('127.0.0.1')}/v1"  # nothing listens there
    with open_portal_database(db_url) as svc:
        key = svc.write(lambda session: create_key(session, "acme"))[1]
        entries = [
            EntrySpec(name=d, level="L0", backend={"kind": "engine", "url": "http://127.0.0.1:9/v1", "deployment": d})
            for d in DEPLOYMENTS
        ]
        svc.write(lambda session: add_entries(session, entries))
        for name, status, url in [
            ("up-one", "running", "http://127.0.0.1:9/v1"),
            ("restarting-one", "restarting", "http://127.0.0.1:9/v1"),
            ("failed-one", "failed", "http://127.0.0.1:9/v1"),
            ("dead-one", "running", dead_url),
        ]:
            svc.write(lambda session, n=name, s=status, u=url: register_deployment(session, n, "engine", u, status=s))
    server = PortalThread(db_url, cache_ttl_s=0.0)
    server.key = key
    with server:
        yield server


def call(portal, model: str):
    client = openai.OpenAI(base_url=portal.base_url, api_key=portal.key, max_retries=0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)


@pytest.mark.parametrize("model", ["restarting-one", "dead-one"])
def test_a_restarting_or_unreachable_lane_answers_503_with_retry_after(portal, model):
    with pytest.raises(openai.InternalServerError) as caught:
        call(portal, model)
    answer = caught.value.response
    assert answer.status_code == 503
    assert int(answer.headers["retry-after"]) >= 1
    error = answer.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("server_error", "deployment_not_running", None)
    assert model in error["message"]


def test_a_failed_lane_answers_503_without_retry_after(portal):
    with pytest.raises(openai.InternalServerError) as caught:
        call(portal, "failed-one")
    assert caught.value.response.status_code == 503 and "retry-after" not in caught.value.response.headers
    assert "failed" in caught.value.response.json()["error"]["message"]


def test_health_reports_each_deployment_and_503_only_when_nothing_can_serve(portal):
    answer = httpx.get(f"{portal.url}/health")
    assert answer.status_code == 200
    assert answer.json() == {
        "status": "degraded",
        "deployments": {"dead-one": "running", "failed-one": "failed", "restarting-one": "restarting",
                        "up-one": "running"},
    }  # fmt: skip
    for name in ("failed-one", "restarting-one"):
        set_status(portal, name, "running")
    assert httpx.get(f"{portal.url}/health").json()["status"] == "ok"
    for name in DEPLOYMENTS:
        set_status(portal, name, "restarting")
    down = httpx.get(f"{portal.url}/health")
    assert down.status_code == 503 and down.json()["status"] == "unavailable"
    portal.portal.db.write(
        lambda session: add_entries(
            session, [EntrySpec(name="hosted", level="L0", backend={"kind": "upstream", "url": "http://h/v1"})]
        )
    )
    assert httpx.get(f"{portal.url}/health").status_code == 200  # an upstream lane can still serve
