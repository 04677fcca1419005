"""What the portal adds to a request: the same upstream called directly and through the portal, in one run.

Usage: `python bench/portal_overhead.py [--json] [--requests 2000] [--concurrency 32] [--warmup 200]
[--rounds 2] [--serial 200] [--no-stream] [--client raw|httpx] [--upstream-delay-ms 0] [--litellm auto|off|PATH]
[--no-plot] [--quiet] [--out FILE]`. Results go to bench/results/portal_overhead.json (`--out`), with --json the
last line printed is the same JSON object, and the latency distributions (CDF) of every path go to the PNG beside
it (bench/results/portal_overhead.png). A rich progress bar on stderr shows each phase while it runs.

The upstream is `bench/echo_upstream.py`, an OpenAI-compatible server that answers every request at once with
the same short completion and real usage counts (its docstring says why it is not the tiny-moe engine: the
engine's own compute per request would hide the portal's overhead). The paths, each a real HTTP server in its own
process, all in front of that one upstream process:

- `direct`: the client calls the upstream;
- `portal`: the client calls the MatrixStack portal (`portal_command`), which authenticates the key, resolves
  the catalog entry, forwards the request to the upstream and meters it. Its database is SQLite in a temporary
  directory, set up with the portal's services: one tenant, one key without limits, one L0 entry whose backend is the
  echo upstream (kind `upstream`);
- `relay`: the client calls `bench/tcp_relay.py`, a process that only copies bytes to and from the upstream: the
  floor, what one more hop and one more process on the shared cores cost without any work. The portal's distance
  from it is the portal's own work;
- `litellm` (optional): LiteLLM's proxy (`litellm --config config.yaml`) with one `model_list` entry pointing at
  the same upstream, as the peer. It is found on PATH, beside this Python, in $LITELLM_BIN or at `--litellm
  PATH`; when it is missing the run goes on without it and says why in the JSON (`litellm.reason`). Installing
  `litellm[proxy]` into the project's own environment downgrades rich, so a separate environment is the cleaner
  home for it: `python -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]'` and
  `--litellm /tmp/litellm-venv/bin/litellm`.

The load. The bench process is the client (`bench/http_load.py`): `--concurrency` workers, each with its own
keep-alive HTTP/1.1 connection, taking requests from one counter until `--requests` are done. The default client
(`raw`, HTTP/1.1 on asyncio streams) spends ~0.1 ms of CPU per request; `--client httpx` uses one
`httpx.AsyncClient` per worker instead (~1 ms, which on two shared cores makes the client the bottleneck of the
direct path). Every path gets the same request body (a non-streamed chat completion, `CHAT_BODY`; the `model` is
the name that path serves), first `--warmup` requests that are not timed, then `--requests` timed ones split into
`--rounds` rounds, the paths alternating round by round, so that a slow patch of a shared machine does not land
on one path only. A request counts as served when it answers 200 with a usage object (streamed: a usage chunk
and `[DONE]`). Latency is the client's time from sending the request to the whole response read; throughput is
the served requests over the timed wall time of that path's rounds. A streamed variant (the same body with
`stream: true` and `stream_options.include_usage`) runs the same way unless `--no-stream`, and reports the time to
first token (the first content chunk) as well. `--serial N` also sends N requests one at a time on each path:
the added latency without any queueing, the portal's own cost per request. `cpu_ms_per_request` says how much
CPU each process (the client, the upstream, the portal, LiteLLM) spent per request during a path's timed rounds
(read from /proc; absent elsewhere): where the time goes. `--upstream-delay-ms D` makes the upstream wait D ms
per request (without CPU), as a model would, to see the overhead when the upstream is not the faster side.

Targets (issue 6): p50 added latency (portal p50 - direct p50, non-streamed, at the given concurrency) <= 2 ms,
portal throughput >= 80% of direct. The machine has few cores (`cpu_count` in the JSON) and nothing is pinned: the
client, the portal, LiteLLM and the upstream share them, so every path but `direct` also pays for its server's
CPU with the client's and the upstream's share; this is what a portal on the same host costs. With an echo
upstream at concurrency 32 the two targets ask the same thing (Little's law: latency = concurrency / throughput):
that the portal spend about as little CPU per request as the echo server itself (~0.2 ms), since the direct path
is bound by it; `serial` shows the added latency without queueing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from http_load import CLIENTS, Sample, Target, connect, run_load

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
HOST = "127.0.0.1"
UPSTREAM_MODEL = "echo"  # the model id the echo upstream serves
ENTRY = "echo-l0"  # the portal's catalog entry (an L0 whose backend is the echo upstream)
LITELLM_MODEL = "echo-litellm"  # LiteLLM's model_name for the same upstream
TENANT = "bench"
LITELLM_MASTER_KEY = "sk-matrixstack-bench-litellm"  # LiteLLM refuses to start without one
LITELLM_HEADERS = {"Authorization": f"Bearer {LITELLM_MASTER_KEY}"}
START_TIMEOUT_S = 60.0  # a server process must answer its health check within this
LITELLM_START_TIMEOUT_S = 180.0  # LiteLLM's proxy imports a lot before it listens
STOP_TIMEOUT_S = 10.0
SERIAL_WARMUP = 20  # untimed requests before the serial run
LOG_TAIL_CHARS = 3000
TARGET_ADDED_P50_MS = 2.0
TARGET_THROUGHPUT_RATIO = 0.8
CHAT_BODY = {
    "messages": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Say something short about matrices, in one sentence please."},
    ],
    "max_tokens": 16,
    "temperature": 0.0,
}
PERCENTILES = (50, 90, 99)


# ---- processes --------------------------------------------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port on the loopback that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def upstream_command(port: int, delay_ms: float = 0.0) -> list[str]:
    """Return the command line that serves the echo upstream on `port`, answering after `delay_ms`."""
    script = str(BENCH_DIR / "echo_upstream.py")
    return [sys.executable, script, "--host", HOST, "--port", str(port), "--delay-ms", str(delay_ms)]


def relay_command(port: int, upstream_port: int) -> list[str]:
    """Return the command line of the do-nothing TCP relay on `port` in front of the upstream on `upstream_port`."""
    script = str(BENCH_DIR / "tcp_relay.py")
    return [sys.executable, script, "--host", HOST, "--port", str(port), "--upstream-port", str(upstream_port)]


def portal_command(db_url: str, port: int) -> list[str]:
    """Return the command line that serves the portal over `db_url` on `port` (the one place to change how the
    portal is started): `matrixstack portal serve`'s own code (`cli/portal_serve_cmd.py`, so the bench does not
    depend on the sub-command being wired into `cli/main.py`), else `create_portal_app` under plain uvicorn."""
    if importlib.util.find_spec("matrixstack.cli.portal_serve_cmd") is not None:
        launcher = "from matrixstack.cli.portal_serve_cmd import portal_app; portal_app()"
        serve = ["serve", "--db", db_url, "--host", HOST, "--port", str(port), "--log-level", "info"]
        return [sys.executable, "-c", launcher, *serve]
    code = (
        "import sys, uvicorn; from matrixstack.portal.app import create_portal_app; "
        "uvicorn.run(create_portal_app(sys.argv[1]), host=sys.argv[2], port=int(sys.argv[3]), "
        "log_level='warning', access_log=False)"
    )
    return [sys.executable, "-c", code, db_url, HOST, str(port)]


def litellm_command(executable: str, config: Path, port: int) -> list[str]:
    """Return the command line that serves LiteLLM's proxy with `config` on `port`."""
    return [executable, "--config", str(config), "--host", HOST, "--port", str(port), "--num_workers", "1"]


@dataclass
class Server:
    """A server process this bench started: its name, base URL (with /v1), command and log file."""

    name: str
    base_url: str
    command: list[str]
    log_path: Path
    process: subprocess.Popen | None = None

    def log_tail(self) -> str:
        """Return the end of the process's output (for error messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""


def process_cpu_s(pid: int) -> float | None:
    """Return the CPU seconds (user + system) process `pid` has used so far (None where /proc cannot tell)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_probe(servers: list[Server]) -> Callable[[], dict[str, float | None]]:
    """Return a function that reads the CPU seconds used so far by this process (`client`) and every server."""

    def probe() -> dict[str, float | None]:
        cpu = {"client": time.process_time()}
        for server in servers:
            cpu[server.name] = process_cpu_s(server.process.pid) if server.process else None
        return cpu

    return probe


def start_server(server: Server, health_path: str, timeout_s: float, env: dict[str, str] | None = None) -> Server:
    """Start `server.command` (output to its log file) and return `server` once `health_path` answers 200; raise
    RuntimeError with the log's tail when the process exits or does not answer within `timeout_s`."""
    log = server.log_path.open("wb")
    server.process = subprocess.Popen(server.command, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    root = server.base_url.removesuffix("/v1")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(root + health_path, timeout=2.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"{server.name} did not answer {health_path} within {timeout_s:.0f} s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    """Stop the server's process (SIGTERM, then SIGKILL after STOP_TIMEOUT_S)."""
    process = server.process
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---- the portal's database --------------------------------------------------------------------------------------


def setup_portal_db(db_url: str, upstream_base_url: str) -> str:
    """Create the portal's tenant, an unlimited key and the L0 entry for the echo upstream in `db_url`; return the
    key's plaintext."""
    from matrixstack.matrix.tenants import create_tenant
    from matrixstack.portal.catalog_service import add_entry
    from matrixstack.portal.key_service import create_key
    from matrixstack.portal.spec import BackendSpec, EntrySpec
    from matrixstack.portal.store import open_portal_database

    entry = EntrySpec(
        name=ENTRY,
        level="L0",
        description="bench: the echo upstream",
        backend=BackendSpec(kind="upstream", url=upstream_base_url, model=UPSTREAM_MODEL),
    )

    def setup(session) -> str:
        create_tenant(session, TENANT)
        _info, key = create_key(session, TENANT, name="bench")
        add_entry(session, entry)
        return key

    with open_portal_database(db_url) as database:
        return database.write(setup)


def metered_requests(db_url: str) -> int | None:
    """Return how many requests the portal metered in `db_url` (None when the report cannot be read)."""
    try:
        from matrixstack.portal.store import open_portal_database
        from matrixstack.portal.usage_service import usage_report

        with open_portal_database(db_url) as database:
            rows = database.read(lambda session: usage_report(session, group_by=("tenant",)))
        return sum(int(row.get("requests", 0)) for row in rows)
    except Exception as exc:  # the count is a check in the report, not a reason to lose the run
        print(f"warning: could not read the portal's usage: {exc}", file=sys.stderr)
        return None


# ---- LiteLLM --------------------------------------------------------------------------------------------------


def find_litellm(choice: str) -> tuple[str | None, str]:
    """Return (the `litellm` executable or None, why not / where found) for `--litellm` = auto, off or a path."""
    if choice == "off":
        return None, "disabled with --litellm off"
    if choice != "auto":
        return (choice, "given with --litellm") if Path(choice).exists() else (None, f"--litellm {choice}: no file")
    candidates = [os.environ.get("LITELLM_BIN"), shutil.which("litellm"), str(Path(sys.executable).parent / "litellm")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate, "found"
    return None, (
        "litellm is not installed (no `litellm` on PATH, beside this Python or in $LITELLM_BIN); install it with "
        "`pip install 'litellm[proxy]'` (a separate venv keeps the project's own packages as they are) and pass "
        "--litellm PATH"
    )


def litellm_version(executable: str) -> str | None:
    """Return the LiteLLM version installed beside `executable` (None when it cannot be read)."""
    python = Path(executable).parent / "python"
    if not python.exists():
        return None
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    return result.stdout.strip() or None if result.returncode == 0 else None


def write_litellm_config(directory: Path, upstream_base_url: str) -> Path:
    """Write LiteLLM's config.yaml (one model, the echo upstream, as an OpenAI-compatible backend); return it."""
    config = directory / "litellm_config.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {LITELLM_MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{UPSTREAM_MODEL}\n"
        f"      api_base: {upstream_base_url}\n"
        "      api_key: not-needed\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_MASTER_KEY}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  set_verbose: false\n"
        "  drop_params: true\n"
    )
    return config


def litellm_env() -> dict[str, str]:
    """Return the environment LiteLLM runs in: no network look-ups (the local cost map), quiet logs."""
    return {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "DISABLE_ADMIN_UI": "True",
    }


# ---- the load -------------------------------------------------------------------------------------------------


def split(total: int, parts: int) -> list[int]:
    """Return `total` split into `parts` near-equal positive counts (fewer parts when total is small)."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@dataclass
class PathRun:
    """What one path did in one kind of run: the timed samples, their summed wall time, the warm-up served."""

    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    warmup_served: int = 0
    cpu_s: dict[str, float | None] = field(default_factory=dict)  # CPU seconds per process over the timed rounds


async def measure(
    targets: list[Target],
    client: str,
    requests: int,
    concurrency: int,
    warmup: int,
    rounds: int,
    stream: bool,
    progress: Callable[[str, int], Callable[[], None]],
    cpu: Callable[[], dict[str, float | None]] = dict,
) -> dict[str, PathRun]:
    """Warm every path up, then time them round by round, the order alternating; return each path's run (with
    the CPU time `cpu()` says each process spent during that path's rounds)."""
    connections = {t.name: [connect(client, t, CHAT_BODY, stream) for _ in range(concurrency)] for t in targets}
    runs = {t.name: PathRun() for t in targets}
    label = "stream" if stream else ("chat" if concurrency > 1 else "serial")
    try:
        for t in targets:
            if warmup:
                samples, _ = await run_load(connections[t.name], warmup, progress(f"warm-up {label} {t.name}", warmup))
                runs[t.name].warmup_served = sum(s.ok for s in samples)
        advances = {t.name: progress(f"{label} {t.name}", requests) for t in targets}
        for i, count in enumerate(split(requests, rounds)):
            for t in targets if i % 2 == 0 else targets[::-1]:
                before = cpu()
                samples, wall_s = await run_load(connections[t.name], count, advances[t.name])
                after = cpu()
                run = runs[t.name]
                run.samples += samples
                run.wall_s += wall_s
                for name, used_s in after.items():
                    spent = None if used_s is None or before.get(name) is None else used_s - before[name]
                    run.cpu_s[name] = None if spent is None else run.cpu_s.get(name, 0.0) + spent
    finally:
        for connection in itertools.chain.from_iterable(connections.values()):
            await connection.aclose()
    return runs


# ---- figures --------------------------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Return the q-th percentile (0..100) of ascending `sorted_values`, linearly interpolated."""
    if not sorted_values:
        return float("nan")
    position = (len(sorted_values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def latency_figures(seconds: list[float]) -> dict[str, float]:
    """Return p50/p90/p99, mean, min and max of `seconds`, in milliseconds."""
    ms = sorted(s * 1000 for s in seconds)
    figures = {f"p{q}": round(percentile(ms, q), 3) for q in PERCENTILES}
    if ms:
        figures.update(mean=round(statistics.fmean(ms), 3), min=round(ms[0], 3), max=round(ms[-1], 3))
    return figures


def summarize(run: PathRun) -> dict:
    """Return one path's figures: requests, served, errors (a few, with reasons), latency, TTFT, throughput."""
    samples, wall_s = run.samples, run.wall_s
    served = [s for s in samples if s.ok]
    errors = [s.error for s in samples if not s.ok]
    summary = {
        "requests": len(samples),
        "served": len(served),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "latency_ms": latency_figures([s.latency_s for s in served]),
        "throughput_rps": round(len(served) / wall_s, 1) if wall_s > 0 else 0.0,
        "wall_s": round(wall_s, 3),
    }
    if run.cpu_s and samples:
        per_request = {name: None if used is None else used * 1000 / len(samples) for name, used in run.cpu_s.items()}
        summary["cpu_ms_per_request"] = {name: None if ms is None else round(ms, 3) for name, ms in per_request.items()}
    ttfts = [s.ttft_s for s in served if s.ttft_s is not None]
    if ttfts:
        summary["ttft_ms"] = latency_figures(ttfts)
    return summary


def compare(paths: dict[str, dict], against: str) -> dict:
    """Return `against` relative to `direct`: p50 (and p90/p99) added latency in ms and the throughput ratio."""
    direct, other = paths["direct"], paths[against]
    figures = {
        f"added_latency_{p}_ms": round(other["latency_ms"][p] - direct["latency_ms"][p], 3)
        for p in ("p50", "p90", "p99")
    }
    ratio = other["throughput_rps"] / direct["throughput_rps"] if direct["throughput_rps"] else 0.0
    figures["throughput_ratio"] = round(ratio, 3)
    return figures


def check_targets(overhead: dict) -> dict:
    """Return the issue's targets and whether `overhead` (portal vs direct, non-streamed) meets them."""
    latency_met = overhead["added_latency_p50_ms"] <= TARGET_ADDED_P50_MS
    throughput_met = overhead["throughput_ratio"] >= TARGET_THROUGHPUT_RATIO
    return {
        "added_latency_p50_ms_max": TARGET_ADDED_P50_MS,
        "throughput_ratio_min": TARGET_THROUGHPUT_RATIO,
        "added_latency_met": latency_met,
        "throughput_met": throughput_met,
        "met": latency_met and throughput_met,
    }


def plot(runs: dict[str, dict[str, list[float]]], path: Path, title: str) -> None:
    """Draw the latency CDF of every path, one panel per run kind (`runs[kind][path]` = latencies in ms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"direct": "#1f77b4", "relay": "#7f7f7f", "portal": "#d62728", "litellm": "#2ca02c"}
    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.5), squeeze=False)
    for ax, (kind, by_path) in zip(axes[0], runs.items(), strict=True):
        for name, values in by_path.items():
            if not values:
                continue
            xs = sorted(values)
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            p50 = percentile(xs, 50)
            ax.step(xs, ys, where="post", color=colours.get(name), label=f"{name} (p50 {p50:.1f} ms)")
        ax.axhline(0.5, color="grey", linewidth=0.6, linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(kind)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the run --------------------------------------------------------------------------------------------------


class _progress:
    """Rich progress bars on stderr, one per phase (no-ops when disabled); call it as `progress(label, total)` to
    get an `advance()` for that phase."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar = None

    def __enter__(self) -> Callable[[str, int], Callable[[], None]]:
        if not self.enabled:
            return lambda label, total: lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self._bar = Progress(*columns, console=Console(stderr=True), transient=True)
        self._bar.start()

        def phase(label: str, total: int) -> Callable[[], None]:
            task = self._bar.add_task(label, total=total)
            return lambda: self._bar.advance(task, 1)

        return phase

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


@contextlib.contextmanager
def servers(
    directory: Path, litellm_choice: str, upstream_delay_ms: float = 0.0
) -> Iterator[tuple[list[Target], dict, dict, Callable]]:
    """Start the upstream, the relay, the portal and (when found) LiteLLM; yield the paths to measure, the LiteLLM
    report, the setup report (with the portal's database URL) and a CPU probe of every process; stop every process
    on the way out."""
    started: list[Server] = []

    def start(name: str, command: Callable[[int], list[str]], health: str, timeout_s: float, env=None) -> Server:
        port = free_port()
        server = Server(name, f"http://{HOST}:{port}/v1", command(port), directory / f"{name}.log")
        started.append(server)
        return start_server(server, health, timeout_s, env)

    try:
        upstream_cmd = lambda port: upstream_command(port, upstream_delay_ms)  # noqa: E731
        upstream = start("upstream", upstream_cmd, "/health", START_TIMEOUT_S)
        upstream_port = int(upstream.base_url.rsplit(":", 1)[1].removesuffix("/v1"))
        relay = start("relay", lambda port: relay_command(port, upstream_port), "/health", START_TIMEOUT_S)
        db_url = f"sqlite:///{directory / 'portal.db'}"
        key = setup_portal_db(db_url, upstream.base_url)
        portal = start("portal", lambda port: portal_command(db_url, port), "/health", START_TIMEOUT_S)
        targets = [
            Target("direct", upstream.base_url, UPSTREAM_MODEL),
            Target("relay", relay.base_url, UPSTREAM_MODEL),
            Target("portal", portal.base_url, ENTRY, {"Authorization": f"Bearer {key}"}),
        ]
        setup = {
            "db_url": db_url,
            "upstream_command": _shown(upstream.command),
            "relay_command": _shown(relay.command),
            "portal_command": _shown(portal.command),
        }
        executable, reason = find_litellm(litellm_choice)
        litellm: dict = {"available": False, "reason": reason}
        if executable:
            litellm.update(executable=executable, version=litellm_version(executable))
            config = write_litellm_config(directory, upstream.base_url)
            try:
                command = lambda port: litellm_command(executable, config, port)  # noqa: E731
                server = start("litellm", command, "/health/liveliness", LITELLM_START_TIMEOUT_S, litellm_env())
            except RuntimeError as exc:
                litellm["reason"] = f"LiteLLM's proxy did not start: {str(exc)[-800:]}"
            else:
                targets.append(Target("litellm", server.base_url, LITELLM_MODEL, LITELLM_HEADERS))
                litellm.update(available=True, reason="ran", command=_shown(server.command))
        yield targets, litellm, setup, cpu_probe(started)
    finally:
        for server in reversed(started):
            stop_server(server)


def code_version() -> dict:
    """Return the repository commit this run measured and whether the portal's code (its own and the openai floor's)
    had uncommitted changes."""
    root = BENCH_DIR.parent

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    changed = git("status", "--porcelain", "--", "src/matrixstack/portal", "src/matrixstack/openai")
    return {"commit": git("rev-parse", "--short", "HEAD"), "portal_uncommitted_changes": bool(changed)}


def _shown(command: list[str]) -> str:
    """Return a command line as one string, the interpreter shown as `python`."""
    return " ".join("python" if part == sys.executable else part for part in command)


def _vs_direct(figures: dict[str, dict]) -> None:
    """Add `vs_direct` (added latency, throughput ratio) to every path of one run kind but `direct`."""
    for name in figures:
        if name != "direct":
            figures[name]["vs_direct"] = compare(figures, name)


@dataclass
class Measured:
    """What a run measured, before any figure is made of it: each kind's runs per path with the load it ran at,
    the setup and LiteLLM reports, and how many requests the portal metered (read after it stopped)."""

    runs: dict[str, dict[str, PathRun]]  # kind ("chat", "stream", "serial") -> path name -> its run
    loads: dict[str, tuple[int, int]]  # kind -> (timed requests, concurrency)
    setup: dict
    litellm: dict
    metered: int | None


def run_bench(args: argparse.Namespace) -> dict:
    """Run the whole bench as `args` says and return the report (see the module docstring)."""
    header = report_header(args)  # before the servers start: the load average is the machine's own
    measured = measure_paths(args)
    report = build_report(header, measured)
    if not args.no_plot:
        png = Path(args.out).with_suffix(".png")
        title = f"chat completions (stream: streamed) through each path, {os.cpu_count()} cores shared"
        plot(latency_cdfs(measured), png, title)
        report["plot"] = str(png.relative_to(BENCH_DIR.parent)) if png.is_relative_to(BENCH_DIR.parent) else str(png)
    return report


def report_header(args: argparse.Namespace) -> dict:
    """Return the report's opening: the options, the code measured, the request and the machine as it is now."""
    return {
        "bench": "portal_overhead",
        "requests": args.requests,
        "concurrency": args.concurrency,
        "warmup_requests": args.warmup,
        "rounds": args.rounds,
        "serial_requests": args.serial,
        "client": args.client,
        "upstream_delay_ms": args.upstream_delay_ms,
        "code": code_version(),
        "request": {"endpoint": "/v1/chat/completions", "body": CHAT_BODY},
        "upstream": "bench/echo_upstream.py (fixed short completion, usage counted in words)",
        "machine": {
            "cpu_count": os.cpu_count(),
            "cores_shared": "the client (this process), the upstream, the relay, the portal and LiteLLM share every "
            "core; nothing is pinned",
            "load_average_before": [round(x, 2) for x in os.getloadavg()],  # other work on the machine
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }


def measure_paths(args: argparse.Namespace) -> Measured:
    """Start the servers, run every kind of load `args` asks for on every path, stop them; return what was
    measured."""
    kinds = [("chat", False, args.concurrency, args.requests, args.warmup, args.rounds)]
    if not args.no_stream:
        kinds.append(("stream", True, args.concurrency, args.requests, args.warmup, args.rounds))
    if args.serial:
        kinds.append(("serial", False, 1, args.serial, min(args.warmup, SERIAL_WARMUP), 1))
    runs: dict[str, dict[str, PathRun]] = {}
    with tempfile.TemporaryDirectory(prefix="matrixstack-portal-bench-") as tmp:
        with servers(Path(tmp), args.litellm, args.upstream_delay_ms) as (targets, litellm, setup, cpu):
            with _progress(not args.quiet) as progress:
                for kind, stream, concurrency, requests, warmup, rounds in kinds:
                    runs[kind] = asyncio.run(
                        measure(targets, args.client, requests, concurrency, warmup, rounds, stream, progress, cpu)
                    )
        # read after the portal stopped: its usage writer writes what it still holds on the way out
        metered = metered_requests(setup["db_url"])
    loads = {kind: (requests, concurrency) for kind, _, concurrency, requests, _, _ in kinds}
    return Measured(runs, loads, setup, litellm, metered)


def build_report(header: dict, measured: Measured) -> dict:
    """Return the report: `header`, then each kind's figures per path (each against `direct`), what the portal
    served and metered, the portal's overhead against the targets, and LiteLLM's (when it ran)."""
    report = {**header, "setup": measured.setup, "litellm": dict(measured.litellm)}
    portal_served = 0
    for kind, runs in measured.runs.items():
        report[kind] = {name: summarize(run) for name, run in runs.items()}
        _vs_direct(report[kind])
        portal_served += runs["portal"].warmup_served + report[kind]["portal"]["served"]
    report["portal_metering"] = {"requests_served": portal_served, "requests_metered": measured.metered}
    overhead = report["chat"]["portal"]["vs_direct"]
    report["added_latency_p50_ms"] = overhead["added_latency_p50_ms"]
    report["throughput_ratio"] = overhead["throughput_ratio"]
    report["targets"] = check_targets(overhead)
    if report["litellm"]["available"]:
        report["litellm"].update(report["chat"]["litellm"]["vs_direct"])
    return report


def latency_cdfs(measured: Measured) -> dict[str, dict[str, list[float]]]:
    """Return the served requests' latencies in ms, per CDF panel (one per kind, titled with its load) and path."""
    cdfs = {}
    for kind, runs in measured.runs.items():
        requests, concurrency = measured.loads[kind]
        panel = f"{kind}: {requests} requests at concurrency {concurrency}"
        cdfs[panel] = {name: [s.latency_s * 1e3 for s in run.samples if s.ok] for name, run in runs.items()}
    return cdfs


def print_summary(report: dict) -> None:
    """Print the figures as a short table on stderr."""
    lines = [f"portal overhead: {report['requests']} requests at concurrency {report['concurrency']}"]
    for kind in ("chat", "stream", "serial"):
        if kind not in report:
            continue
        for name, fig in report[kind].items():
            lat = fig["latency_ms"]
            extra = ""
            if "vs_direct" in fig:
                vs = fig["vs_direct"]
                extra = f"  {vs['added_latency_p50_ms']:+.2f} ms p50, {vs['throughput_ratio']:.0%} of direct"
            cpu = fig.get("cpu_ms_per_request", {}).get("upstream" if name == "direct" else name)
            cpu_text = f"  cpu {cpu:.2f} ms/req" if cpu is not None else ""
            lines.append(
                f"  {kind:<6} {name:<8} p50 {lat.get('p50', 0):7.2f}  p90 {lat.get('p90', 0):7.2f}  p99 "
                f"{lat.get('p99', 0):7.2f} ms  {fig['throughput_rps']:7.1f} req/s  served {fig['served']}/"
                f"{fig['requests']}{cpu_text}{extra}"
            )
    t = report["targets"]
    lines.append(
        f"  targets: added p50 <= {t['added_latency_p50_ms_max']} ms: {'met' if t['added_latency_met'] else 'MISSED'}"
        f"; throughput >= {t['throughput_ratio_min']:.0%}: {'met' if t['throughput_met'] else 'MISSED'}"
    )
    if not report["litellm"]["available"]:
        lines.append(f"  litellm: skipped ({report['litellm']['reason']})")
    print("\n".join(lines), file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Return the command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per path (and per kind)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent client workers")
    parser.add_argument("--warmup", type=int, default=200, help="untimed requests per path first")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per path, the paths alternating")
    parser.add_argument("--serial", type=int, default=200, help="also time N requests one at a time (0: skip)")
    parser.add_argument("--no-stream", action="store_true", help="skip the streamed variant")
    parser.add_argument(
        "--upstream-delay-ms", type=float, default=0.0, help="the echo upstream waits this long per request"
    )
    parser.add_argument("--client", choices=CLIENTS, default="raw", help="the load generator's HTTP client")
    parser.add_argument("--litellm", default="auto", help="auto (find it), off, or the litellm executable")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the report as JSON, as the last line")
    parser.add_argument("--out", default=str(RESULTS / "portal_overhead.json"), help="the JSON report's path")
    args = parser.parse_args(argv)
    for name in ("requests", "concurrency", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    for name in ("warmup", "serial", "upstream_delay_ms"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the bench, write the report (and the PNG), print the summary; return the exit code."""
    args = parse_args(argv)
    report = run_bench(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_summary(report)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
