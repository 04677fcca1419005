"""Does a large request move a small one's latency? A 2-token request timed alone and beside a large one, on the
engine and through the portal, in one run (issue 15 point 2: a 20 MiB chat body took 27.5 s to refuse and held
a concurrent 2-token request of another tenant for 26.5 s instead of 0.08 s; the target is within ~10%).

Usage: `python bench/request_isolation.py [--rounds 20] [--kinds KIND,...] [--json] [--out FILE]`. Results go
to bench/results/request_isolation.json (`--out`); with --json the last line printed is the same JSON object. The
servers run the `matrixstack` that Python imports: put another checkout's `src` first on PYTHONPATH to measure it
(e.g. the code before the fix, with `--rounds 1 --kinds body_20mib --out bench/results/request_isolation_before.json`).

Two real server processes: `matrixstack engine serve tiny-moe --random-weights` and `matrixstack portal serve` over
a fresh SQLite database with one key and one L0 entry on that engine. For each path (`engine`: the engine
called directly; `portal`: through the portal) and each kind of large request, `--rounds` rounds alternate:

- `alone`: the small request (a chat completion of exactly 2 tokens) by itself;
- `<kind>_sending`, `<kind>_sent`: the large request is sent first, from a process of its own (another tenant's
  client: it shares no interpreter lock with the timed one), and the small one as soon as the large one's first
  bytes are out (`sending`: the server is still receiving it), or once its whole body is out (`sent`: the server
  is parsing, checking or tokenising it, which is when the issue saw the stall); the small one is timed, the
  large one's status noted.

Large kinds: `body_20mib` (a 20 MiB chat body, refused 413 by the body limit), `prompt_3mib` (a 3 MiB chat
prompt under the body limit, refused 400 by the prompt-length check without tokenising) and `prompt_fits` (the
longest prompt the engine takes, ~max_model_len tokens, served: its prefill shares the engine's steps with the
small request, so this one measures the model's own contention, not a stall). Latency is the client's time from
sending the small request to its whole response; each figure is the median and p90 over the rounds, and
`ratio` is beside / alone of the medians. `rss_mib` is each server's resident memory once it answers and at
the end (the issue saw the engine grow 1.16 -> 1.69 GB and stay there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from portal_overhead import HOST, Server, free_port, portal_command, start_server, stop_server

import matrixstack

RESULTS = Path(__file__).parent / "results" / "request_isolation.json"
KINDS = ("body_20mib", "prompt_3mib", "prompt_fits")
ENGINE_START_S = 300.0
MIB = 1024 * 1024
SMALL = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "ignore_eos": True}
MAX_MODEL_LEN = 2048  # the engine's default
FITTING_TOKENS = MAX_MODEL_LEN - 64  # the prompt_fits kind's prompt: about this many tokens, room for the output


def fitting_prompt() -> str:
    """Return a prompt of about FITTING_TOKENS tokens of tiny-moe's tokenizer."""
    from matrixstack.engine import PACKAGED_WEIGHTS
    from matrixstack.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(PACKAGED_WEIGHTS["tiny-moe"] / "tokenizer.json")
    words = "the cat sat on the mat and looked at the door " * (FITTING_TOKENS // 4)
    return tokenizer.decode(tokenizer.encode(words)[:FITTING_TOKENS])


def large_bodies(model: str) -> dict[str, bytes]:
    """Return the large request bodies by kind."""

    def chat(content: str, **extra) -> bytes:
        return json.dumps({"model": model, "messages": [{"role": "user", "content": content}], **extra}).encode()

    return {
        "body_20mib": chat("x" * (20 * MIB)),
        "prompt_3mib": chat("word " * (3 * MIB // 5)),
        "prompt_fits": chat(fitting_prompt(), max_tokens=2),
    }


def timed_small(client: httpx.Client, url: str, model: str) -> float:
    """Return the seconds the small request took (raise when it was not served with 2 tokens)."""
    started = time.perf_counter()
    answer = client.post(url, json={"model": model, **SMALL})
    elapsed = time.perf_counter() - started
    answer.raise_for_status()
    assert answer.json()["usage"]["completion_tokens"] == 2, answer.text
    return elapsed


def sender_main(url: str, headers_json: str) -> None:
    """The large requests' own process (another tenant's client; it shares no GIL with the timed one): for each
    body length read from stdin it prints `sending`, sends a prepared body of that kind, then prints the status."""
    headers = {"content-type": "application/json", **json.loads(headers_json)}
    model = json.loads(sys.stdin.readline())
    bodies = large_bodies(model)

    def pieces(body: bytes):
        print("sending", flush=True)
        for start in range(0, len(body), MIB):
            yield body[start : start + MIB]
        print("sent", flush=True)

    with httpx.Client(headers=headers, timeout=600) as client:
        for line in sys.stdin:
            body = bodies[line.strip()]
            declared = {"content-length": str(len(body))}
            print(client.post(url, content=pieces(body), headers=declared).status_code, flush=True)


class Sender:
    """The large-request process: `send(kind)` starts a large request and returns once it is being sent;
    `status()` waits for its answer."""

    def __init__(self, url: str, model: str, headers: dict[str, str]):
        command = [sys.executable, __file__, "--sender", url, json.dumps(headers)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._write(json.dumps(model))

    def _write(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def send(self, kind: str, until: str) -> None:
        """Send the large request of `kind`; return once it is `sending` (its first bytes are out) or `sent` (its
        whole body is out: the server is reading the last of it, or working on it)."""
        self._write(kind)
        self._lines = [self.process.stdout.readline().strip()]
        while self._lines[-1] != until and not self._lines[-1].isdigit():
            self._lines.append(self.process.stdout.readline().strip())

    def status(self) -> int:
        """Return the large request's HTTP status."""
        while not self._lines[-1].isdigit():
            self._lines.append(self.process.stdout.readline().strip())
        return int(self._lines[-1])

    def close(self) -> None:
        """End the process."""
        self.process.stdin.close()
        self.process.wait(60)


def measure_path(url: str, model: str, headers: dict[str, str], rounds: int, kinds: list[str]) -> dict:
    """Return the figures of one path: small latency alone and beside each large kind, the large statuses."""
    overlaps = [(kind, until) for kind in kinds for until in ("sending", "sent")]
    seconds: dict[str, list[float]] = {"alone": [], **{f"{kind}_{until}": [] for kind, until in overlaps}}
    statuses: dict[str, list[int]] = {k: [] for k in kinds}
    sender = Sender(url, model, headers)
    try:
        with httpx.Client(headers=headers, timeout=600) as client:
            for _ in range(3):
                timed_small(client, url, model)  # warm-up
            for _ in range(rounds):
                seconds["alone"].append(timed_small(client, url, model))
                for kind, until in overlaps:
                    sender.send(kind, until)
                    seconds[f"{kind}_{until}"].append(timed_small(client, url, model))
                    statuses[kind].append(sender.status())
    finally:
        sender.close()
    alone = statistics.median(seconds["alone"])
    figures = {
        name: {
            "median_ms": round(statistics.median(values) * 1000, 2),
            "p90_ms": round(sorted(values)[int(0.9 * (len(values) - 1))] * 1000, 2),
            "ratio": round(statistics.median(values) / alone, 3),
        }
        for name, values in seconds.items()
    }
    figures["large_status"] = {kind: sorted(set(codes)) for kind, codes in statuses.items()}
    return figures


def rss_mib(pid: int) -> float | None:
    """Return the resident memory of process `pid` in MiB (None where /proc cannot tell)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def setup_portal(db_url: str, engine_url: str) -> str:
    """Create a tenant, a key and an L0 entry `tiny` on the engine in `db_url`; return the key."""
    from matrixstack.matrix.tenants import create_tenant
    from matrixstack.portal.catalog_service import add_entry
    from matrixstack.portal.key_service import create_key
    from matrixstack.portal.spec import EntrySpec
    from matrixstack.portal.store import open_portal_database

    def setup(session) -> str:
        create_tenant(session, "bench")
        key = create_key(session, "bench", name="bench")[1]
        add_entry(session, EntrySpec(name="tiny", level="L0", backend={"kind": "engine", "url": engine_url}))
        return key

    with open_portal_database(db_url) as database:
        return database.write(setup)


def run(rounds: int, kinds: list[str]) -> dict:
    """Start the engine and the portal, measure both paths, stop them; return the report."""
    with tempfile.TemporaryDirectory() as tmp:
        engine_port, portal_port = free_port(), free_port()
        engine = Server(
            "engine",
            f"http://{HOST}:{engine_port}/v1",
            [sys.executable, "-c", "from matrixstack.cli.main import app; app()", "engine", "serve", "tiny-moe",
             "--random-weights", "--host", HOST, "--port", str(engine_port), "--log-level", "warning"],
            Path(tmp) / "engine.log",
        )  # fmt: skip
        db_url = f"sqlite:///{tmp}/portal.db"
        portal = Server("portal", f"http://{HOST}:{portal_port}/v1", portal_command(db_url, portal_port),
                        Path(tmp) / "portal.log")  # fmt: skip
        try:
            start_server(engine, "/health", ENGINE_START_S)
            key = setup_portal(db_url, engine.base_url)
            start_server(portal, "/health", 60)
            servers = (engine, portal)
            rss_before = {server.name: rss_mib(server.process.pid) for server in servers}
            paths = {
                "engine": measure_path(f"{engine.base_url}/chat/completions", "tiny-moe", {}, rounds, kinds),
                "portal": measure_path(
                    f"{portal.base_url}/chat/completions", "tiny", {"Authorization": f"Bearer {key}"}, rounds, kinds
                ),
            }
            rss = {s.name: {"start": rss_before[s.name], "end": rss_mib(s.process.pid)} for s in servers}
        finally:
            stop_server(portal)
            stop_server(engine)
    return {
        "bench": "request_isolation",
        "rounds": rounds,
        "code": str(Path(matrixstack.__file__).parent),
        "cpu_count": os.cpu_count(),
        "small_request": "chat, 2 tokens",
        "target": "ratio <= 1.10 beside body_20mib and prompt_3mib",
        "paths": paths,
        "rss_mib": rss,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the bench; write the JSON report and print a summary (or the JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"large kinds, of {', '.join(KINDS)}")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (last line)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--sender", nargs=2, metavar=("URL", "HEADERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sender:
        sender_main(*args.sender)
        return 0
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(KINDS):
        parser.error(f"--kinds takes some of {', '.join(KINDS)}")
    report = run(args.rounds, kinds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report))
    else:
        for path, figures in report["paths"].items():
            for name, values in figures.items():
                print(f"{path:7s} {name:20s} {values}")
        print(f"rss_mib {report['rss_mib']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
