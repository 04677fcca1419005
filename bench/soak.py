"""Soak: mixed streamed and non-streamed load through the portal of `matrixstack up` while an EP worker (or the
engine) is killed every minute; what failed, how fast the rest was, and whether memory grew.

Usage: `python bench/soak.py [--minutes 3] [--clients 4] [--kill-every-s 60] [--kill worker|engine]
[--max-tokens 16] [--json PATH] [--quiet]`. The report goes to bench/results/soak.json (`--json PATH`) and a
summary to stderr; a rich progress bar on stderr counts the seconds while it runs.

What runs: `matrixstack up` of the embedded default shape (tiny-moe served with expert parallelism: one engine
process and two EP workers, on the machine's CPU cores) in a subprocess, its data directory and SQLite database in
a temporary folder, the portal on a free loopback port. `--clients` threads, each with the official `openai`
client (no retries), send chat completions to the L0 entry back to back, every other one streamed, each asking
for `--max-tokens` tokens (`ignore_eos`), until the time is up. Every `--kill-every-s` seconds (the first kill
after one period) a killer sends SIGKILL to one EP worker of the engine (`--kill worker`, the workers taken in
turn) or to the engine's main process (`--kill engine`).

What it reports: requests sent, completed (a full answer, or a stream that ended with its usage) and failed, the
failures by cause (`HTTP 502 upstream_error`, `stream error: ...`, `connection: ReadError` ...), latency p50 /
p99 / max of the completed requests (send to last byte), per kind and together, each kill with the time until
the next completed request after it (`recovered_after_s`), and the resident memory (VmRSS from /proc) of the
portal (`up`'s own process) and of the engine (its main process and its workers, summed), sampled every
RSS_SAMPLE_S: at the start (after one warm-up request), at the end, the largest, and the growth end - start.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

from matrixstack.stack.up import READY_LINE

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
ENTRY = "tiny-moe"  # the default shape's L0, on the EP deployment
KEY_LINE = re.compile(r"new key for tenant default \(default\): (sk-\S+)")
PORTAL_LINE = re.compile(r"portal: (http://127\.0\.0\.1:\d+/v1)")
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 60.0
RSS_SAMPLE_S = 5.0
PAUSE_AFTER_ERROR_S = 0.2  # a client that got an error waits this long, so a dead engine is not hammered
CAUSE_CHARS = 80  # of an error message without a code, numbers (pids, ports) made N so that causes group
PROMPT = [{"role": "user", "content": "Tell me about the matrix."}]


# ---- processes --------------------------------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[int, int, str] | None:
    """Return (parent pid, process group, state) of `pid` from /proc, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
    return int(ppid), int(pgrp), state


def live_pids() -> list[int]:
    """Return every process id in /proc."""
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def rss_mib(pid: int) -> float:
    """Return the resident memory of `pid` in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Up:
    """`matrixstack up` of the default shape in a subprocess: its portal URL, the default key and its processes."""

    def __init__(self, home: Path):
        cmd = [sys.executable, "-c", "from matrixstack.cli.main import app; app()", "up", "--port", "0"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MATRIXSTACK_HOME": str(home)}
        env.pop("MATRIXSTACK_DB", None)
        self.log_path = home / "up.stderr"
        with open(self.log_path, "wb") as stderr:
            self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        lines: list[str] = []
        deadline = time.monotonic() + START_TIMEOUT_S
        while READY_LINE not in lines:
            line = self.process.stdout.readline()
            if (not line and self.process.poll() is not None) or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"matrixstack up did not get ready:\n{''.join(lines)}{self.log_path.read_text()}")
            lines.append(line.rstrip("\n"))
        threading.Thread(target=lambda: [None for _ in self.process.stdout], daemon=True).start()  # the request log
        self.key = next(m.group(1) for m in map(KEY_LINE.search, lines) if m)
        self.base_url = next(m.group(1) for m in map(PORTAL_LINE.search, lines) if m)

    def engine(self) -> int | None:
        """Return the engine's pid (its process group), None while there is none."""
        for pid in live_pids():
            stat = proc_stat(pid)
            if stat and stat[0] == self.process.pid and stat[1] == pid and stat[2] != "Z":
                return pid
        return None

    def engine_group(self) -> list[int]:
        """Return the live processes of the engine's group (main process, forkserver, workers)."""
        engine = self.engine()
        if engine is None:
            return []
        return [pid for pid in live_pids() if (s := proc_stat(pid)) and s[1] == engine and s[2] != "Z"]

    def workers(self) -> list[int]:
        """Return the EP workers: the engine's group less the engine and its own children (the forkserver)."""
        engine = self.engine()
        return sorted(p for p in self.engine_group() if p != engine and (proc_stat(p) or (0,))[0] != engine)

    def stop(self) -> None:
        """Ctrl-C `up` (it stops its engines) and wait for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ---- the load ---------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request: when it started (s since the run began), streamed or not, its latency and what went wrong."""

    start_s: float
    stream: bool
    latency_s: float
    error: str | None  # None: completed


def cause(exc: Exception) -> str:
    """Return the failure cause of a request's exception: HTTP status and error code, a stream's error event (its
    code, else its message with numbers as N), or the connection error."""
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code} {exc.code or ''}".strip()
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return f"connection: {type(exc.__cause__).__name__ if exc.__cause__ else 'APIConnectionError'}"
    if isinstance(exc, openai.APIError):  # the error event of a stream
        return f"stream error: {exc.code or re.sub(r'[0-9]+', 'N', exc.message)[:CAUSE_CHARS]}"
    return f"client: {type(exc).__name__}"


def one_request(client: openai.OpenAI, stream: bool, max_tokens: int) -> str | None:
    """Send one chat completion; return None when it completed whole, else why not."""
    body = {"model": ENTRY, "messages": PROMPT, "max_tokens": max_tokens, "extra_body": {"ignore_eos": True}}
    try:
        if stream:
            chunks = list(client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}))
            if not chunks or chunks[-1].usage is None or chunks[-1].usage.completion_tokens != max_tokens:
                return "stream ended short"
        else:
            reply = client.chat.completions.create(**body)
            if reply.usage is None or reply.usage.completion_tokens != max_tokens:
                return "answer short"
    except (openai.APIError, httpx.HTTPError) as exc:
        return cause(exc)
    return None


def client_loop(base_url: str, key: str, index: int, max_tokens: int, t0: float, end: float, out: list) -> None:
    """Send requests until `end` (monotonic), every other one streamed; append an Outcome for each to `out`."""
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=REQUEST_TIMEOUT_S)
    n = index
    while time.monotonic() < end:
        stream = n % 2 == 0
        n += 1
        started = time.monotonic()
        error = one_request(client, stream, max_tokens)
        out.append(Outcome(started - t0, stream, time.monotonic() - started, error))
        if error is not None:
            time.sleep(PAUSE_AFTER_ERROR_S)


@dataclass
class Kill:
    """One SIGKILL: when (s since the run began), what and which pid."""

    at_s: float
    what: str
    pid: int | None


@dataclass
class RssSamples:
    """Resident memory over the run, MiB."""

    portal: list[float] = field(default_factory=list)
    engine: list[float] = field(default_factory=list)

    def sample(self, up: Up) -> None:
        self.portal.append(rss_mib(up.process.pid))
        group = up.engine_group()
        if group:  # between an engine's death and its restart there is nothing to measure
            self.engine.append(sum(rss_mib(pid) for pid in group))


def killer(up: Up, what: str, every_s: float, t0: float, end: float, kills: list[Kill], stop: threading.Event) -> None:
    """Every `every_s` until `end`, SIGKILL one EP worker (in turn) or the engine; append each to `kills`."""
    turn = 0
    while not stop.wait(max(0.0, t0 + every_s * (len(kills) + 1) - time.monotonic())):
        if time.monotonic() >= end:
            return
        targets = up.workers() if what == "worker" else [up.engine()]
        targets = [p for p in targets if p is not None]
        pid = targets[turn % len(targets)] if targets else None
        turn += 1
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pid = None
        kills.append(Kill(time.monotonic() - t0, what, pid))


# ---- the report -------------------------------------------------------------------------------------------------


def percentiles_ms(latencies_s: list[float]) -> dict[str, float]:
    """Return p50, p99 and max of `latencies_s` in ms ({} when empty)."""
    if not latencies_s:
        return {}
    ordered = sorted(latencies_s)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {
        "p50": round(statistics.median(ordered) * 1000, 1),
        "p99": round(p99 * 1000, 1),
        "max": round(ordered[-1] * 1000, 1),
    }


def rss_report(samples: list[float]) -> dict[str, float]:
    """Return start, end, max and growth (end - start) of RSS samples in MiB."""
    if not samples:
        return {}
    return {
        "start_mib": round(samples[0], 1),
        "end_mib": round(samples[-1], 1),
        "max_mib": round(max(samples), 1),
        "growth_mib": round(samples[-1] - samples[0], 1),
    }


def build_report(args: argparse.Namespace, outcomes: list[Outcome], kills: list[Kill], rss: RssSamples,
                 wall_s: float) -> dict:  # fmt: skip
    """Return the JSON report (see the module docstring)."""
    done = [o for o in outcomes if o.error is None]
    kills_report = []
    for k in kills:
        after = [o.start_s + o.latency_s for o in done if o.start_s >= k.at_s]
        kills_report.append(
            {"at_s": round(k.at_s, 1), "what": k.what, "pid": k.pid,
             "recovered_after_s": round(min(after) - k.at_s, 2) if after else None}
        )  # fmt: skip
    return {
        "bench": "soak",
        "minutes": args.minutes,
        "wall_s": round(wall_s, 1),
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "kill": args.kill,
        "kill_every_s": args.kill_every_s,
        "shape": "the embedded default: tiny-moe, EP over 2 workers on CPU cores (matrixstack up)",
        "requests": len(outcomes),
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "errors_by_cause": dict(Counter(o.error for o in outcomes if o.error is not None).most_common()),
        "latency_ms": {
            "all": percentiles_ms([o.latency_s for o in done]),
            "streamed": percentiles_ms([o.latency_s for o in done if o.stream]),
            "non_streamed": percentiles_ms([o.latency_s for o in done if not o.stream]),
        },
        "kills": kills_report,
        "rss": {"portal": rss_report(rss.portal), "engine": rss_report(rss.engine), "sample_s": RSS_SAMPLE_S},
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in args.load_before],
            "python": platform.python_version(),
        },
    }


def print_summary(report: dict) -> None:
    """Print the figures in a few lines on stderr."""
    lat = report["latency_ms"]["all"]
    lines = [
        f"soak: {report['wall_s']} s, {report['clients']} clients, {len(report['kills'])} kills ({report['kill']})",
        f"  requests {report['requests']}, completed {report['completed']}, failed {report['failed']}",
        f"  latency p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms",
    ]
    lines += [f"  error {cause}: {n}" for cause, n in report["errors_by_cause"].items()]
    for name, figures in report["rss"].items():
        if isinstance(figures, dict) and figures:
            lines.append(
                f"  rss {name}: {figures['start_mib']} -> {figures['end_mib']} MiB ({figures['growth_mib']:+})"
            )
    print("\n".join(lines), file=sys.stderr)


# ---- the run ----------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    """Start `up`, run the load and the killer for `args.minutes`, stop `up`; return the report."""
    with tempfile.TemporaryDirectory(prefix="matrixstack-soak-") as home:
        up = Up(Path(home))
        try:
            warm = openai.OpenAI(base_url=up.base_url, api_key=up.key, max_retries=0, timeout=REQUEST_TIMEOUT_S)
            one_request(warm, False, args.max_tokens)
            rss = RssSamples()
            rss.sample(up)
            outcomes: list[Outcome] = []
            kills: list[Kill] = []
            t0 = time.monotonic()
            end = t0 + args.minutes * 60
            stop = threading.Event()
            threads = [
                threading.Thread(target=client_loop, args=(up.base_url, up.key, i, args.max_tokens, t0, end, outcomes))
                for i in range(args.clients)
            ]
            threads.append(
                threading.Thread(target=killer, args=(up, args.kill, args.kill_every_s, t0, end, kills, stop))
            )
            for t in threads:
                t.start()
            with progress(not args.quiet, args.minutes * 60) as advance:
                while time.monotonic() < end:
                    time.sleep(min(RSS_SAMPLE_S, max(0.0, end - time.monotonic())))
                    rss.sample(up)
                    advance(time.monotonic() - t0, len(outcomes), sum(o.error is not None for o in outcomes))
            stop.set()
            for t in threads:
                t.join()
            wall_s = time.monotonic() - t0
            rss.sample(up)
        finally:
            up.stop()
    return build_report(args, outcomes, kills, rss, wall_s)


class progress:
    """A rich progress bar over the run's seconds on stderr (nothing when disabled); the context gives an
    `advance(elapsed_s, requests, failed)`."""

    def __init__(self, enabled: bool, total_s: float):
        self.enabled, self.total_s, self._bar = enabled, total_s, None

    def __enter__(self):
        if not self.enabled:
            return lambda *_: None
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("soak {task.fields[counts]:<28}"), BarColumn(), TimeElapsedColumn())
        self._bar = Progress(*columns, console=Console(stderr=True), transient=True)
        self._bar.start()
        task = self._bar.add_task("soak", total=self.total_s, counts="")

        def advance(elapsed_s: float, requests: int, failed: int) -> None:
            self._bar.update(task, completed=elapsed_s, counts=f"{requests} requests, {failed} failed")

        return advance

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Return the options (see the module docstring); exit 2 on a bad one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long the load runs")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--kill-every-s", type=float, default=60.0, help="seconds between kills")
    parser.add_argument("--kill", choices=("worker", "engine"), default="worker", help="what each kill hits")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens each request asks for")
    parser.add_argument("--json", default=str(RESULTS / "soak.json"), help="the JSON report's path")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("minutes", "clients", "kill_every_s", "max_tokens"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be more than 0")
    args.load_before = os.getloadavg()  # other work on the machine before this run
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the soak, write the JSON report, print the summary; return the exit code."""
    args = parse_args(argv)
    report = run(args)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_summary(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
