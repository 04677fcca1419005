"""A client that hangs up while the portal waits for its backend: the backend request is aborted and metered 499.

The backend is a raw ASGI app under uvicorn that takes the request and then only waits for its own client (the
portal) to disconnect, so the test sees exactly when the portal gives the backend request up. The portal is a
real one on loopback; the client hangs up by timing out its read.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from matrixstack.matrix.tenants import create_tenant
from matrixstack.openai.server import ServerThread
from matrixstack.portal.catalog_service import add_entry
from matrixstack.portal.key_service import create_key
from matrixstack.portal.relay import CLIENT_CLOSED
from matrixstack.portal.server import PortalThread
from matrixstack.portal.spec import BackendSpec, EntrySpec
from matrixstack.portal.usage_service import usage_report

WAIT_S = 10.0


class HeldBackend:
    """An ASGI backend that never answers a completion; it notes when each request arrived and when it was left."""

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.abandoned = threading.Event()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        while (await receive()).get("more_body"):
            pass
        self.arrived.set()
        if (await receive())["type"] == "http.disconnect":  # uvicorn: the portal closed the connection
            self.abandoned.set()


@pytest.fixture
def held(tmp_path):
    backend = HeldBackend()
    with ServerThread(backend) as upstream:
        db_url = f"sqlite:///{tmp_path / 'portal.db'}"
        with PortalThread(db_url) as portal:
            database = portal.portal.db
            database.write(lambda session: create_tenant(session, "acme"))
            _, key = database.write(lambda session: create_key(session, "acme"))
            url = f"{upstream.url}/v1"
            database.write(
                lambda session: add_entry(
                    session, EntrySpec(name="held", level="L0", backend=BackendSpec(kind="upstream", url=url))
                )
            )
            yield portal, key, backend


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "streamed-before-first-chunk"])
def test_hanging_up_aborts_the_backend_request_and_meters_499(held, stream):
    portal, key, backend = held
    body = {"model": "held", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    headers = {"Authorization": f"Bearer {key}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{portal.base_url}/chat/completions", json=body, headers=headers, timeout=httpx.Timeout(30, read=0.5)
        )
    assert backend.arrived.is_set()
    assert backend.abandoned.wait(WAIT_S), "the portal kept the backend request after its client hung up"
    deadline = time.monotonic() + WAIT_S
    while not (rows := portal.portal.db.read(lambda session: usage_report(session, group_by=("tenant",)))):
        assert time.monotonic() < deadline, "the abandoned request was never metered"
        portal.portal.writer.flush()
        time.sleep(0.05)
    assert rows[0]["requests"] == 1 and rows[0]["errors"] == 1
    metrics = httpx.get(f"{portal.url}/metrics").text
    route = 'deployment="",entry="held",lane="upstream"'
    assert f'matrixstack_requests_total{{{route},status="{CLIENT_CLOSED}"}} 1.0' in metrics
