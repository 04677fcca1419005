"""Prometheus metrics of the portal, in a registry of its own (`GET /metrics`).

- `matrixstack_requests_total{entry,lane,deployment,status}`: /v1 completion requests by catalog entry and HTTP
  status;
- `matrixstack_tokens_total{entry,lane,deployment,kind}`: tokens by entry, `kind` = `prompt` or `completion`;
- `matrixstack_ttft_seconds{entry,lane,deployment}`: time to the first streamed token;
  `matrixstack_tpot_seconds{entry,lane,deployment}`: time per output token after the first (streamed requests: the
  spread of the stream over its tokens);
- `matrixstack_queue_depth`: requests in flight in this portal process;
- `matrixstack_matrix_utilisation{pool}`: allocated / healthy devices of each matrix pool, read from
  the matrix pool views (`matrix.pools`) at most every `UTILISATION_REFRESH_S` (the read runs in a worker thread when
  `/metrics` is scraped, never on the request path).

The request metrics carry where the entry's requests go: `lane` is its L0's backend kind (`engine` for the builtin
engine, `vllm`, `upstream`) and `deployment` the deployment that serves it ("" for a backend given by URL only, and
both "" for a request whose entry did not resolve), so `sum by (lane)` compares the lanes of one portal. Both follow
from the entry, so they add no series.

A registry per `PortalMetrics` keeps several portals in one process (tests) from sharing counters.
`render(named)` shows only the entries in `named` by name, the other entries' request series summed under entry and
deployment `(private)`: what a scraper without the scrape token or an admin key gets (`portal.scrape`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from sqlalchemy.orm import Session

from matrixstack.matrix.pools import list_pools, show_pool

UTILISATION_REFRESH_S = 5.0
# Latency buckets in seconds: a CPU engine's TTFT spans milliseconds to seconds, TPOT milliseconds to 100s of ms.
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ROUTE = ("entry", "lane", "deployment")  # the labels of every request metric: the entry and where it is served
PRIVATE = "(private)"  # the entry and deployment of the series a scraper may not see by name, summed
METRIC_NAMES = (
    "matrixstack_requests_total",
    "matrixstack_tokens_total",
    "matrixstack_ttft_seconds",
    "matrixstack_tpot_seconds",
    "matrixstack_queue_depth",
    "matrixstack_matrix_utilisation",
)


def pool_utilisation(session: Session) -> dict[str, float]:
    """Return allocated / healthy devices per matrix pool (0.0 for a pool with no healthy device)."""
    out = {}
    for summary in list_pools(session):
        stats = show_pool(session, summary["pool"]).stats
        healthy = stats["devices"] - stats["failed"]
        out[summary["pool"]] = stats["allocated"] / healthy if healthy > 0 else 0.0
    return out


class PortalMetrics:
    """The portal's counters, histograms and gauges (see the module docstring)."""

    def __init__(
        self,
        utilisation_fn: Callable[[], dict[str, float]] | None = None,
        refresh_s: float = UTILISATION_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        """`utilisation_fn()` returns allocated / healthy devices per pool (None: no pool gauge is filled)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "matrixstack_requests", "Completion requests by catalog entry and HTTP status", [*ROUTE, "status"],
            registry=self.registry,
        )  # fmt: skip
        self.tokens = Counter(
            "matrixstack_tokens", "Tokens by catalog entry and kind (prompt, completion)", [*ROUTE, "kind"],
            registry=self.registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "matrixstack_ttft_seconds", "Time to the first streamed token", ROUTE, buckets=TTFT_BUCKETS_S,
            registry=self.registry,
        )  # fmt: skip
        self.tpot = Histogram(
            "matrixstack_tpot_seconds", "Time per output token after the first", ROUTE, buckets=TPOT_BUCKETS_S,
            registry=self.registry,
        )  # fmt: skip
        self.queue_depth = Gauge("matrixstack_queue_depth", "Requests in flight in this portal", registry=self.registry)
        self.utilisation = Gauge(
            "matrixstack_matrix_utilisation", "Allocated / healthy devices of a matrix pool", ["pool"],
            registry=self.registry,
        )  # fmt: skip
        self._utilisation_fn = utilisation_fn
        self._refresh_s = refresh_s
        self._clock = clock
        self._refreshed_at: float | None = None
        self._refresh_lock = threading.Lock()
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}  # labelled series of the request metrics

    def observe(
        self,
        route: tuple[str, str, str],
        status: int,
        prompt_tokens: int,
        completion_tokens: int,
        ttft_s: float | None = None,
        tpot_s: float | None = None,
    ) -> None:
        """Count one finished request of `route` = (entry, lane, deployment) with its tokens and, when known, its TTFT
        and TPOT."""
        self._child(self.requests, *route, str(status)).inc()
        if prompt_tokens:
            self._child(self.tokens, *route, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self._child(self.tokens, *route, "completion").inc(completion_tokens)
        if ttft_s is not None:
            self._child(self.ttft, *route).observe(ttft_s)
        if tpot_s is not None:
            self._child(self.tpot, *route).observe(tpot_s)

    def _child(self, metric: Any, *labels: str) -> Any:
        """Return `metric.labels(*labels)`, kept after the first call (the lookup checks and hashes the labels
        each time, a third of what a request's metrics cost)."""
        key = (metric._name, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def refresh_utilisation(self) -> None:
        """Re-read pool utilisation when the last read is older than the refresh period (blocking: call it in a
        worker thread). A failed read keeps the last values."""
        if self._utilisation_fn is None:
            return
        with self._refresh_lock:
            now_s = self._clock()
            if self._refreshed_at is not None and now_s - self._refreshed_at < self._refresh_s:
                return
            self._refreshed_at = now_s
            values = self._utilisation_fn()
            for pool, value in values.items():
                self.utilisation.labels(pool).set(value)
            for labels in list(self.utilisation._metrics):  # pools removed since the last read
                if labels[0] not in values:
                    self.utilisation.remove(*labels)

    def render(self, named: Collection[str] | None = None) -> tuple[bytes, str]:
        """Return (Prometheus text exposition, its content type): every series, or with `named` the request series
        of entries not in it summed under entry and deployment `(private)`."""
        return generate_latest(self.registry if named is None else _Unnamed(self.registry, named)), CONTENT_TYPE_LATEST


class _Unnamed:
    """A view of a registry whose request series of entries not in `named` are summed under `PRIVATE`."""

    def __init__(self, registry: CollectorRegistry, named: Collection[str]):
        self._registry, self._named = registry, named

    def collect(self) -> Iterator[Metric]:
        """Yield the registry's metric families, the series of unnamed entries summed (`_created`: the earliest)."""
        for family in self._registry.collect():
            kept: list[Sample] = []
            summed: dict[tuple[str, tuple[tuple[str, str], ...]], Sample] = {}
            for sample in family.samples:
                if sample.labels.get("entry", "") in self._named or "entry" not in sample.labels:
                    kept.append(sample)
                    continue
                labels = {**sample.labels, "entry": PRIVATE, "deployment": PRIVATE}
                ident = (sample.name, tuple(labels.items()))
                seen = summed.get(ident)
                if seen is None:
                    value = sample.value
                elif sample.name.endswith("_created"):
                    value = min(seen.value, sample.value)
                else:
                    value = seen.value + sample.value
                summed[ident] = sample._replace(labels=labels, value=value, exemplar=None)
            family.samples = kept + list(summed.values())
            yield family
