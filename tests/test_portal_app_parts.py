"""The portal's hot-path parts on their own: key limits, the TTL cache, the usage batch writer, the metrics.

Clocks are plain counters the tests move, so nothing here waits on or asserts wall-clock time. The writer and the
utilisation gauge run against real databases (SQLite files).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from functools import partial

import pytest

from matrixstack.fabric.loader import load_fabric
from matrixstack.matrix.database import Database, open_database
from matrixstack.matrix.failures import fail_device
from matrixstack.matrix.pools import create_pool, show_pool
from matrixstack.matrix.simulate import resize_pod
from matrixstack.matrix.slices import alloc_slice
from matrixstack.matrix.spec import SliceRequest
from matrixstack.portal.cache import TtlCache
from matrixstack.portal.key_service import create_key
from matrixstack.portal.limits import INSUFFICIENT_QUOTA, QUOTA_RETRY_AFTER_S, RATE_LIMIT_EXCEEDED, KeyLimiter
from matrixstack.portal.metrics import PortalMetrics, pool_utilisation
from matrixstack.portal.store import open_portal_database
from matrixstack.portal.usage_service import UsageRecord, record_usage, usage_report
from matrixstack.portal.usage_writer import UsageWriter, written


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


@dataclass
class Key:
    id: int = 1
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    token_quota: int | None = None


# ---- limits -----------------------------------------------------------------------------------------------------


def test_requests_per_minute_slide_and_say_when_to_retry():
    clock = Clock()
    limiter, key = KeyLimiter(clock), Key(rpm_limit=2)
    assert limiter.admit(key) is None
    clock.now_s += 10
    assert limiter.admit(key) is None
    clock.now_s += 5
    refusal = limiter.admit(key)
    assert refusal.code == RATE_LIMIT_EXCEEDED and refusal.retry_after_s == 45  # the first leaves at t0 + 60
    clock.now_s += 44.5
    assert limiter.admit(key).retry_after_s == 1  # half a second left rounds up to a whole one
    clock.now_s += 0.5
    assert limiter.admit(key) is None  # the first request left the window
    assert limiter.admit(key).retry_after_s == 10  # now the second one blocks, 10 s later than the first


def test_tokens_per_minute_count_finished_requests():
    clock = Clock()
    limiter, key = KeyLimiter(clock), Key(tpm_limit=100)
    assert limiter.admit(key) is None
    limiter.settle(key.id, 0, 60)
    clock.now_s += 20
    assert limiter.admit(key) is None  # 60 < 100: in flight requests are not known yet
    limiter.settle(key.id, 0, 50)
    refusal = limiter.admit(key)
    assert refusal.code == RATE_LIMIT_EXCEEDED and refusal.retry_after_s == 40  # when the 60 leave, 50 remain
    clock.now_s += 40
    assert limiter.admit(key) is None


def test_reservations_hold_room_until_settled_so_a_burst_overshoots_by_one_request_at_most():
    clock = Clock()
    limiter, key = KeyLimiter(clock), Key(tpm_limit=100, token_quota=150)
    limiter.seed(key.id, 0)
    granted = []
    for _ in range(10):  # ten requests of at most 40 tokens each, all in flight at once
        reserved, refusal = limiter.reserve(key, 40)
        if refusal is None:
            granted.append(reserved)
        else:
            assert reserved == 0 and refusal.code == RATE_LIMIT_EXCEEDED and refusal.retry_after_s == 1
    assert granted == [40, 40, 40]  # 0, 40, 80 < 100: room left; at 120 there is none
    for reserved in granted:
        limiter.settle(key.id, reserved, 10)  # each used 10 of its 40
    assert limiter.used_tokens(key.id) == 30
    assert limiter.reserve(key, 40) == (40, None)  # the settled 30 left room again
    limiter.settle(key.id, 40, 0)  # failed: its reservation is released, nothing charged
    assert limiter.used_tokens(key.id) == 30 and limiter.admit(key) is None


def test_lifetime_quota_is_seeded_once_and_grows():
    limiter, key = KeyLimiter(Clock()), Key(token_quota=100)
    assert limiter.needs_seed(key.id)
    limiter.seed(key.id, 90)
    assert not limiter.needs_seed(key.id)
    limiter.seed(key.id, 0)  # a second read does not reset the live count
    assert limiter.admit(key) is None
    limiter.settle(key.id, 0, 15)
    assert limiter.used_tokens(key.id) == 105
    refusal = limiter.admit(key)
    assert refusal.code == INSUFFICIENT_QUOTA and refusal.retry_after_s == QUOTA_RETRY_AFTER_S
    assert "105 of 100" in refusal.message
    assert limiter.admit(Key(token_quota=200)) is None  # an admin raised it: the next request passes


def test_keys_without_limits_are_never_refused():
    limiter = KeyLimiter(Clock())
    for _ in range(1000):
        assert limiter.admit(Key()) is None
        limiter.settle(1, 0, 1000)


# ---- the TTL cache ----------------------------------------------------------------------------------------------


def test_cache_loads_once_for_concurrent_callers_and_expires():
    clock = Clock()
    cache = TtlCache(5.0, clock=clock)
    loads = []

    async def scenario() -> None:
        gate = asyncio.Event()

        async def loader() -> str:
            loads.append(1)
            await gate.wait()
            return "value"

        waiting = [asyncio.ensure_future(cache.get_or_load("k", loader)) for _ in range(5)]
        await asyncio.sleep(0)
        gate.set()
        assert await asyncio.gather(*waiting) == ["value"] * 5
        assert len(loads) == 1
        clock.now_s += 4.9
        assert await cache.get_or_load("k", loader) == "value" and len(loads) == 1
        clock.now_s += 0.2
        assert await cache.get_or_load("k", loader) == "value" and len(loads) == 2  # expired: loaded again
        cache.clear()
        assert len(cache) == 0
        assert await cache.get_or_load("k", loader) == "value" and len(loads) == 3
        cache.forget("k")
        cache.forget("never-cached")
        assert len(cache) == 0
        assert await cache.get_or_load("k", loader) == "value" and len(loads) == 4  # forgotten: loaded again

        async def failing() -> str:
            raise KeyError("boom")

        with pytest.raises(KeyError):
            await cache.get_or_load("bad", failing)
        assert len(cache) == 1  # a failed load is not cached

    asyncio.run(scenario())


def test_cache_clear_during_a_load_does_not_keep_the_stale_value():
    cache = TtlCache(60.0, clock=Clock())

    async def scenario() -> None:
        async def loader() -> str:
            cache.clear()  # the catalog changed while the old value was read
            return "stale"

        assert await cache.get_or_load("k", loader) == "stale"
        assert len(cache) == 0

    asyncio.run(scenario())


# ---- the usage writer ---------------------------------------------------------------------------------------------


@pytest.fixture
def database(tmp_path):
    with open_portal_database(f"sqlite:///{tmp_path / 'usage.db'}") as svc:
        yield svc


def _records(database: Database, n: int, entry: str = "tiny") -> list[UsageRecord]:
    info, _ = database.write(lambda session: create_key(session, "acme"))
    return [UsageRecord(info.tenant_id, info.id, entry, 10, i, 200, 5.0, 1.0) for i in range(n)]


def _record_fn(database: Database):
    """Return what the app gives its usage writer: write one batch in one unit of work."""
    return lambda batch: database.write(lambda session: record_usage(session, batch))


def test_writer_writes_batches_and_flush_waits_for_them(database):
    writer = UsageWriter(_record_fn(database), interval_s=0.05).start()
    records = _records(database, 50)
    for record in records[:30]:
        writer.submit(record)
    assert writer.flush()
    assert database.read(usage_report)[0]["requests"] == 30
    for record in records[30:]:
        writer.submit(record)
    writer.stop()
    total = database.read(usage_report)[0]
    assert total["requests"] == 50 and total["completion_tokens"] == sum(range(50)) and writer.written == 50


def test_writer_loses_nothing_on_a_clean_stop(database):
    writer = UsageWriter(_record_fn(database), interval_s=60.0).start()  # no round would come before the stop
    for record in _records(database, 20):
        writer.submit(record)
    writer.stop()
    writer.stop()  # twice is fine
    assert database.read(usage_report)[0]["requests"] == 20


def test_writer_keeps_a_failed_batch_and_writes_it_later(database):
    """A database that refuses one write (here: the first call fails as a dropped connection would)."""
    calls = []

    def flaky_write(batch: list[UsageRecord]) -> None:
        calls.append(len(batch))
        if len(calls) == 1:
            raise ConnectionError("database went away")
        database.write(lambda session: record_usage(session, batch))

    writer = UsageWriter(flaky_write, interval_s=0.01).start()
    for record in _records(database, 5):
        writer.submit(record)
    assert writer.flush()
    writer.stop()
    assert calls[0] == 5 and writer.failures == 1
    assert database.read(usage_report)[0]["requests"] == 5


def test_writer_commit_is_done_only_once_its_record_is_written(database):
    """A group commit: the futures of records committed together are done once their batch is in the database
    (a round every 60 s would never come: `commit` wakes the writer), not while the database refuses the write."""
    refuse = threading.Event()

    def write(batch: list[UsageRecord]) -> None:
        if refuse.is_set():
            raise ConnectionError("database went away")
        database.write(lambda session: record_usage(session, batch))

    writer = UsageWriter(write, interval_s=60.0).start()
    records = _records(database, 12)

    async def commit_all(part: list[UsageRecord]) -> list[int]:
        futures = [writer.commit(record) for record in part]
        await asyncio.gather(*futures)
        return [database.read(usage_report)[0]["requests"] for _ in futures]

    assert asyncio.run(commit_all(records[:10])) == [10] * 10
    refuse.set()

    async def refused() -> tuple[bool, bool]:
        future = writer.commit(records[10])
        return await written(future, timeout_s=0.5), future.done()

    assert asyncio.run(refused()) == (False, False)  # not written: the caller is not told it is
    refuse.clear()
    writer.stop()  # the kept batch is written at the stop
    assert database.read(usage_report)[0]["requests"] == 11


def test_writer_submit_from_many_threads(database):
    writer = UsageWriter(_record_fn(database), interval_s=0.01).start()
    records = _records(database, 200)
    threads = [threading.Thread(target=lambda part: [writer.submit(r) for r in part], args=(records[i::4],))
               for i in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.stop()
    assert database.read(usage_report)[0]["requests"] == 200


# ---- metrics ----------------------------------------------------------------------------------------------------


def test_pool_utilisation_is_allocated_over_healthy_devices_and_refreshes_at_most_every_5_s(tmp_path):
    with open_database(f"sqlite:///{tmp_path / 'matrix.db'}") as matrix:
        matrix.write(
            lambda session: create_pool(session, "p", [resize_pod(load_fabric("cloudmatrix384"), 2)])
        )  # 16 devices
        matrix.write(lambda session: alloc_slice(session, "p", "acme", SliceRequest(devices=4)))
        assert matrix.read(pool_utilisation) == {"p": 0.25}
        free = [
            d for d, owner in enumerate(matrix.read(lambda session: show_pool(session, "p")).owners[0]) if owner == 0
        ][:2]
        for device in free:
            matrix.write(partial(fail_device, pool="p", device=(0, device)))
        assert matrix.read(pool_utilisation) == {"p": 4 / 14}

        clock, reads = Clock(), []

        def read() -> dict[str, float]:
            reads.append(1)
            return matrix.read(pool_utilisation)

        metrics = PortalMetrics(read, clock=clock)
        metrics.refresh_utilisation()
        clock.now_s += 4.0
        metrics.refresh_utilisation()
        assert len(reads) == 1
        clock.now_s += 1.5
        metrics.refresh_utilisation()
        assert len(reads) == 2
        text = metrics.render()[0].decode()
        assert f'matrixstack_matrix_utilisation{{pool="p"}} {4 / 14}' in text


def test_metrics_count_requests_tokens_and_latencies_per_entry_and_lane():
    metrics = PortalMetrics()
    tiny = ("tiny", "engine", "tiny-moe")
    metrics.observe(tiny, 200, 10, 5, ttft_s=0.02, tpot_s=0.004)
    metrics.observe(tiny, 429, 0, 0)
    metrics.observe(("tiny-on-vllm", "vllm", "tiny-moe-vllm"), 200, 7, 3)
    metrics.queue_depth.inc()
    text, content_type = metrics.render()
    text = text.decode()
    assert content_type.startswith("text/plain")
    # Prometheus' text writes labels sorted by name
    assert 'matrixstack_requests_total{deployment="tiny-moe",entry="tiny",lane="engine",status="200"} 1.0' in text
    assert 'matrixstack_requests_total{deployment="tiny-moe",entry="tiny",lane="engine",status="429"} 1.0' in text
    assert 'matrixstack_tokens_total{deployment="tiny-moe",entry="tiny",kind="prompt",lane="engine"} 10.0' in text
    assert 'matrixstack_ttft_seconds_count{deployment="tiny-moe",entry="tiny",lane="engine"} 1.0' in text
    assert 'matrixstack_tpot_seconds_bucket{deployment="tiny-moe",entry="tiny",lane="engine",le="0.005"} 1.0' in text
    vllm = 'deployment="tiny-moe-vllm",entry="tiny-on-vllm",kind="completion",lane="vllm"'
    assert f"matrixstack_tokens_total{{{vllm}}} 3.0" in text
    assert "matrixstack_queue_depth 1.0" in text
    assert "matrixstack_requests_total{" not in PortalMetrics().render()[0].decode()  # a registry of its own
