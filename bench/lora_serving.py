"""What batched LoRA costs the builtin engine: output tokens/s with 1, 4 and 16 adapters mixed uniformly over the
concurrent requests, against the base model alone, in one run (issue 14 point 6: goal >= 80% of the base with 16).

Usage: `python bench/lora_serving.py [--json] [--requests 64] [--concurrency 32] [--repeats 3] [--rank 8]
[--targets q_proj,k_proj,v_proj,o_proj] [--adapters 1,4,16] [--threads N] [--device cpu|cuda] [--dtype float32]
[--out FILE]`. `--threads` sets torch's intra-op threads (default: torch's, every core; on a machine other
processes share, 1 thread gives steadier figures: a multi-threaded op waits for its slowest thread). Results go to
bench/results/lora_serving.json (`--out` elsewhere); with --json the last line printed is the same JSON object.

The engine: tiny-moe's packaged weights in an in-process `LLMEngine` over a `ModelRunner` (what `matrixstack engine
serve` runs, without the HTTP layer, so the figure is the engine's own), `--max-loras` = the most adapters asked for
(every adapter gets a slot: no eviction during a run), rank limit = `--rank`. The adapters: random PEFT LoRA
adapters of rank `--rank` (alpha = 2 x rank) on `--targets` (PEFT short names), written with `write_peft` to a
temporary folder and loaded by name on first use, in a warm-up before any timing. The workload: the seeded request
set of `matrixstack engine bench` (`tools.bench.make_requests`: prompts of 16-256 random token ids, outputs of 16-128
tokens, greedy, `ignore_eos`), in a closed loop of `--concurrency` requests in flight (the next starts when one
finishes). Conditions: `base` (every request on the base model) and `N adapters` (request i through adapter
i mod N); each run of a condition is followed by the others, `--repeats` rounds (the machine is shared and noisy),
and each condition's best run is reported with every run listed.

The figures: output tokens/s = the requests' output tokens (each checked to be exactly what it asked for) / the
wall time from the first request added to the last token; `cpu_tokens_per_s` = the same tokens / the CPU time this
process spent meanwhile (`time.process_time`): with one thread it is the work itself, steady while other processes
take turns on the cores, which the wall-clock figure is not; `vs_base` and `cpu_vs_base` = a condition's / the
base's (same run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from matrixstack.arch import load_arch
from matrixstack.engine.config import EngineConfig, SamplingParams
from matrixstack.engine.llm_engine import LLMEngine
from matrixstack.engine.loading import load_model
from matrixstack.engine.lora_adapter import LoraAdapter, lora_modules, write_peft
from matrixstack.engine.model_runner import ModelRunner
from matrixstack.tools.bench import BenchRequest, make_requests

RESULTS = Path(__file__).parent / "results" / "lora_serving.json"
ARCH = "tiny-moe"
ADAPTER_STD = 0.05  # A and B entries: large enough to change the outputs, small enough to keep them sensible
BLOCK_SIZE = 16
GOAL_VS_BASE = 0.8  # the goal with 16 adapters


def make_adapter(name: str, rank: int, targets: list[str], seed: int) -> LoraAdapter:
    """Return a random adapter of `rank` (alpha 2 x rank) on every tiny-moe module whose short name is in
    `targets` (routed experts excepted: the engine serves no LoRA there)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {
        path: (
            torch.randn(rank, fan_in, generator=generator) * ADAPTER_STD,
            torch.randn(fan_out, rank, generator=generator) * ADAPTER_STD,
        )
        for path, (fan_in, fan_out) in lora_modules(load_arch(ARCH)).items()
        if path.rsplit(".", 1)[-1] in targets and ".experts." not in path
    }
    return LoraAdapter(name, rank, 2.0 * rank, targets, weights)


def build_engine(args: argparse.Namespace, adapters_dir: Path, requests: list[BenchRequest]) -> LLMEngine:
    """Return an engine whose KV cache holds `--concurrency` of the longest requests at once."""
    longest = max(len(r.prompt_token_ids) + r.output_tokens for r in requests)
    blocks = args.concurrency * -(-longest // BLOCK_SIZE) + 1
    config = EngineConfig(
        block_size=BLOCK_SIZE,
        num_kv_blocks=blocks,
        max_num_seqs=args.concurrency,
        max_loras=max(args.adapters),
        max_lora_rank=args.rank,
        adapters_dir=str(adapters_dir),
    )
    model, tokenizer = load_model(ARCH, dtype=getattr(torch, args.dtype))
    return LLMEngine(ModelRunner(model.to(args.device), config), tokenizer, config)


def run_condition(
    engine: LLMEngine, requests: list[BenchRequest], names: list[str | None], concurrency: int
) -> tuple[float, float]:
    """Return (output tokens per wall second, per CPU second of this process) of `requests` (request i through
    adapter names[i % len(names)]) in a closed loop of `concurrency` requests in flight."""
    pending = deque(enumerate(requests))
    live: dict[str, BenchRequest] = {}
    done_tokens = 0
    start, start_cpu = time.perf_counter(), time.process_time()
    while pending or live:
        while pending and len(live) < concurrency:
            i, request = pending.popleft()
            params = SamplingParams(
                temperature=0.0,
                max_tokens=request.output_tokens,
                ignore_eos=True,
                detokenize=False,
                lora=names[i % len(names)],
            )
            live[engine.add_request(request.prompt_token_ids, params).request_id] = request
        for delta in engine.step():
            if delta.finish_reason:
                request = live.pop(delta.request_id)
                if delta.completion_tokens != request.output_tokens:
                    raise RuntimeError(
                        f"{delta.request_id}: {delta.completion_tokens} tokens, not {request.output_tokens}"
                    )
                done_tokens += delta.completion_tokens
    return done_tokens / (time.perf_counter() - start), done_tokens / (time.process_time() - start_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the result as JSON (last line)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="PEFT short names")
    parser.add_argument("--adapters", default="1,4,16", help="adapter counts to mix, comma-separated")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.adapters = [int(n) for n in args.adapters.split(",")]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    targets = args.targets.split(",")
    requests = make_requests(args.requests, args.seed)
    names = [f"bench-{i}" for i in range(max(args.adapters))]
    conditions: dict[str, list[str | None]] = {"base": [None]}
    conditions.update({f"{n}_adapters": names[:n] for n in args.adapters})
    with tempfile.TemporaryDirectory() as folder:
        for i, name in enumerate(names):
            write_peft(make_adapter(name, args.rank, targets, args.seed + i), Path(folder) / name, ARCH)
        engine = build_engine(args, Path(folder), requests)
        warmup = [BenchRequest(requests[0].prompt_token_ids[:8], 2)] * len(names)
        run_condition(engine, warmup, names, len(names))  # loads every adapter into its slot
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in conditions}
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("lora_serving", total=args.repeats * len(conditions))
            for _ in range(args.repeats):
                for condition, mix in conditions.items():
                    bar.update(task, description=f"lora_serving: {condition}")
                    runs[condition].append(run_condition(engine, requests, mix, args.concurrency))
                    bar.advance(task)
        assert engine.runner.lora.loads == len(names), "an adapter was evicted or loaded twice during the runs"
    best = {name: [max(r[k] for r in runs[name]) for k in (0, 1)] for name in conditions}
    result = {
        "bench": "lora_serving",
        "arch": ARCH,
        "base_tokens_per_s": round(best["base"][0], 1),
        "base_cpu_tokens_per_s": round(best["base"][1], 1),
        "conditions": {
            name: {
                "adapters": len([m for m in mix if m is not None]),
                "tokens_per_s": round(best[name][0], 1),
                "vs_base": round(best[name][0] / best["base"][0], 3),
                "cpu_tokens_per_s": round(best[name][1], 1),
                "cpu_vs_base": round(best[name][1] / best["base"][1], 3),
                "runs_tokens_per_s": [round(r[0], 1) for r in runs[name]],
                "runs_cpu_tokens_per_s": [round(r[1], 1) for r in runs[name]],
            }
            for name, mix in conditions.items()
        },
        "goal_vs_base_with_16": GOAL_VS_BASE,
        "settings": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "repeats": args.repeats,
            "rank": args.rank,
            "alpha": 2 * args.rank,
            "targets": targets,
            "max_loras": max(args.adapters),
            "device": args.device,
            "dtype": args.dtype,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, figures in result["conditions"].items():
        print(
            f"{name:>12}: {figures['tokens_per_s']:8.1f} output tokens/s ({figures['vs_base']:.0%} of base), "
            f"{figures['cpu_tokens_per_s']:8.1f} per CPU second ({figures['cpu_vs_base']:.0%} of base)"
        )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
