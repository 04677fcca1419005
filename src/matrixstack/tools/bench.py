"""`matrixstack engine bench`: a fixed request set through the engine, with prefill and decode throughput.

The request set (`make_requests`) is seeded: `num_requests` prompts of random token ids with lengths uniform in
`PROMPT_TOKENS` (16..256, both ends included) and output lengths uniform in `OUTPUT_TOKENS` (16..128), greedy,
`ignore_eos` so every request produces exactly its output length. `bench/engine_vs_hf.py` uses the same set.

A run (`run_bench`) builds a deployment (a `ModelRunner` in this process for `workers == 1`, an
`ExpertParallelRunner` over `workers` processes otherwise), warms it up with one short request, then runs two
phases, both with every request submitted at once:

1. **prefill**: every prompt with `max_tokens=1`. Each sequence finishes when its prefill samples its first token,
   so every step is pure prefill: `prefill_tokens_per_s` = prompt tokens / the time of those steps.
2. **serve**: every request with its own output length, continuous batching (prefill chunks and decodes mixed as
   the scheduler likes). `decode_tokens_per_s` = the decode tokens of the steps that only decode / the time of
   those steps (after the first few steps, which mix the last prefill chunks in, every step is one);
   `output_tokens_per_s` = all output tokens / the phase's wall time (the end-to-end figure, prefill included);
   TTFT is each request's time from submission to its first token, TPOT its (finish - first token) / (output
   tokens - 1), both averaged over requests.

Step times are `LLMEngine.stats.step_seconds` (schedule excluded, model and sampling included). The output text
is assembled as when serving, off the step (an `OutputProcessor` between steps: in the wall time, not the step
times); `bench/engine_vs_hf.py` turns it off (`run_phase(detokenize=False)`), as its peer returns token ids only.
The KV cache is sized to hold every request at once (`bench_config`), the other limits are `EngineConfig`'s
defaults. No figure here is asserted anywhere: they depend on the machine.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from matrixstack.engine.config import EngineConfig, SamplingParams
from matrixstack.engine.output_processor import OutputProcessor
from matrixstack.errors import UserError

PROMPT_TOKENS = (16, 256)  # uniform, inclusive
OUTPUT_TOKENS = (16, 128)  # uniform, inclusive
FIRST_TOKEN_ID = 8  # random prompts draw ids from FIRST_TOKEN_ID..vocab-1, past the special tokens
WARMUP_PROMPT_TOKENS = 8
WARMUP_OUTPUT_TOKENS = 4
DEFAULT_REQUESTS = 32
DEFAULT_SEED = 0


@dataclass(frozen=True)
class BenchRequest:
    """One request of the set: its prompt token ids and how many tokens it generates."""

    prompt_token_ids: list[int]
    output_tokens: int


def make_requests(
    num_requests: int = DEFAULT_REQUESTS,
    seed: int = DEFAULT_SEED,
    vocab_size: int = 4096,
    prompt_tokens: tuple[int, int] = PROMPT_TOKENS,
    output_tokens: tuple[int, int] = OUTPUT_TOKENS,
) -> list[BenchRequest]:
    """Return the seeded request set: prompt and output lengths uniform in the given inclusive ranges, prompt ids
    uniform in FIRST_TOKEN_ID..vocab_size-1."""
    if num_requests < 1:
        raise UserError(f"--requests must be at least 1, got {num_requests}")
    for name, (low, high) in (("prompt", prompt_tokens), ("output", output_tokens)):
        if not 1 <= low <= high:
            raise UserError(f"{name} lengths {low}..{high}: give 1 <= min <= max")
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        prompt_len = rng.randint(*prompt_tokens)
        out_len = rng.randint(*output_tokens)
        prompt = [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(prompt_len)]
        requests.append(BenchRequest(prompt, out_len))
    return requests


def distribution(
    prompt_tokens: tuple[int, int] = PROMPT_TOKENS, output_tokens: tuple[int, int] = OUTPUT_TOKENS
) -> dict:
    """Return the request distribution in words and numbers (for reports)."""
    return {
        "prompt_tokens": {"distribution": "uniform", "min": prompt_tokens[0], "max": prompt_tokens[1]},
        "output_tokens": {"distribution": "uniform", "min": output_tokens[0], "max": output_tokens[1]},
        "prompt_token_ids": f"uniform {FIRST_TOKEN_ID}..vocab_size-1",
        "sampling": "greedy, ignore_eos",
    }


def bench_config(requests: list[BenchRequest], block_size: int = 16, max_num_seqs: int = 64) -> EngineConfig:
    """Return an EngineConfig whose KV cache holds every request of the set at once (no preemption)."""
    longest = max(len(r.prompt_token_ids) + r.output_tokens for r in requests)
    max_model_len = max(2048, longest)
    needed = sum(-(-(len(r.prompt_token_ids) + r.output_tokens) // block_size) for r in requests)
    return EngineConfig(
        block_size=block_size,
        num_kv_blocks=max(needed, -(-max_model_len // block_size)),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=2048,
        max_model_len=max_model_len,
    )


@dataclass
class PhaseTiming:
    """What one phase measured: step kinds and times, per-request first-token and finish times."""

    wall_s: float
    prefill_only_s: float
    prefill_only_tokens: int
    decode_only_s: float
    decode_only_tokens: int
    steps: int
    ttft_s: list[float]
    tpot_s: list[float]
    output_tokens: int
    sequences: list  # the requests' `Sequence`s, in request order


def run_phase(
    engine,
    requests: list[BenchRequest],
    full_outputs: bool,
    on_tokens: Callable[[int], None],
    detokenize: bool = True,
) -> PhaseTiming:
    """Submit every request to `engine` (an LLMEngine) at once and step until all finish; return the timings.

    `full_outputs` False gives each request max_tokens=1 (the prefill phase). `on_tokens(n)` is called with the
    output tokens of each step (a progress bar). `detokenize` False skips assembling the output text
    (`SamplingParams.detokenize`), as `generate` of Hugging Face does.
    """
    sequences = []
    processor = OutputProcessor(engine.tokenizer.decode)
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    counts: dict[str, int] = {}
    start = time.perf_counter()
    for r in requests:
        max_tokens = r.output_tokens if full_outputs else 1
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=detokenize)
        seq = engine.add_request(r.prompt_token_ids, params)
        processor.add_request(seq.request_id, seq.prompt_token_ids, params)
        sequences.append(seq)
    prefill_s = decode_s = 0.0
    prefill_tokens = decode_tokens = steps = 0
    while engine.has_work():
        before = (engine.stats.prefill_tokens, engine.stats.decode_tokens, len(engine.stats.step_seconds))
        deltas, stopped = processor.process(engine.step())
        for request_id in stopped:
            engine.abort(request_id)
        now = time.perf_counter()
        if len(engine.stats.step_seconds) == before[2]:
            continue
        steps += 1
        seconds = engine.stats.step_seconds[-1]
        new_prefill = engine.stats.prefill_tokens - before[0]
        new_decode = engine.stats.decode_tokens - before[1]
        if new_decode == 0:
            prefill_s += seconds
            prefill_tokens += new_prefill
        elif new_prefill == 0:
            decode_s += seconds
            decode_tokens += new_decode
        emitted = 0
        for delta in deltas:
            if delta.token_ids:
                first.setdefault(delta.request_id, now)
                counts[delta.request_id] = counts.get(delta.request_id, 0) + len(delta.token_ids)
                emitted += len(delta.token_ids)
            if delta.finish_reason:
                done[delta.request_id] = now
        on_tokens(emitted)
    wall = time.perf_counter() - start
    ids = [seq.request_id for seq in sequences]
    ttft = [first[rid] - start for rid in ids]
    tpot = [(done[rid] - first[rid]) / (counts[rid] - 1) for rid in ids if counts[rid] > 1]
    return PhaseTiming(
        wall_s=wall,
        prefill_only_s=prefill_s,
        prefill_only_tokens=prefill_tokens,
        decode_only_s=decode_s,
        decode_only_tokens=decode_tokens,
        steps=steps,
        ttft_s=ttft,
        tpot_s=tpot,
        output_tokens=sum(counts.values()),
        sequences=sequences,
    )


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def _mean_ms(values: list[float]) -> float:
    return statistics.fmean(values) * 1e3 if values else 0.0


def build_engine(
    arch_name: str,
    config: EngineConfig,
    workers: int = 1,
    weights_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    random_weights: bool = False,
    seed: int = DEFAULT_SEED,
):
    """Return (LLMEngine, close function, runner description) for a deployment of `arch_name`.

    `workers == 1`: a ModelRunner in this process on `device`; otherwise an ExpertParallelRunner (its default
    backend: NCCL with one GPU per worker, else gloo). `random_weights` (one process only) seeds the model's
    own init with `seed` instead of loading weights; the tokenizer is the packaged one or `weights_dir`'s.
    """
    from matrixstack.arch import load_arch
    from matrixstack.engine import TOKENIZER_FILE, weights_or_packaged
    from matrixstack.engine.llm_engine import LLMEngine
    from matrixstack.engine.model import MoETransformer
    from matrixstack.engine.model_runner import ModelRunner
    from matrixstack.engine.tokenizer import Tokenizer
    from matrixstack.engine.weights import load_weights

    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    arch = load_arch(arch_name)
    weights_dir = weights_or_packaged(arch.name, weights_dir, "pass --weights DIR (its safetensors and tokenizer)")
    if not (weights_dir / TOKENIZER_FILE).is_file():
        raise UserError(f"no {TOKENIZER_FILE} in {weights_dir}; pass --weights DIR with the weights and tokenizer")
    tokenizer = Tokenizer.from_file(weights_dir / TOKENIZER_FILE)
    if workers > 1:
        if random_weights:
            raise UserError("random weights run in one process; load weights or use --workers 1")
        from matrixstack.engine.ep import ExpertParallelRunner

        runner = ExpertParallelRunner(arch, weights_dir, config, workers=workers, dtype=dtype)
        return LLMEngine(runner, tokenizer, config), runner.close, f"ExpertParallelRunner({runner.backend})"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's random state
        torch.manual_seed(seed)
        model = MoETransformer(arch, dtype=dtype)
    if not random_weights:
        load_weights(model, weights_dir)
    runner = ModelRunner(model.to(device).eval(), config)
    return LLMEngine(runner, tokenizer, config), (lambda: None), "ModelRunner"


def warm_up(engine) -> None:
    """Run one short request through `engine`, untimed (first-call allocations, lazy initialisation)."""
    prompt = [FIRST_TOKEN_ID + i for i in range(WARMUP_PROMPT_TOKENS)]
    engine.generate([prompt], SamplingParams(temperature=0, max_tokens=WARMUP_OUTPUT_TOKENS, ignore_eos=True))


def summarize(prefill: PhaseTiming | None, serve: PhaseTiming) -> dict:
    """Return the figures of a run from its phases' timings (see the module docstring)."""
    figures = {
        "prefill_tokens_per_s": _rate(prefill.prefill_only_tokens, prefill.prefill_only_s) if prefill else None,
        "decode_tokens_per_s": _rate(serve.decode_only_tokens, serve.decode_only_s),
        "output_tokens_per_s": _rate(serve.output_tokens, serve.wall_s),
        "ttft_ms_mean": _mean_ms(serve.ttft_s),
        "tpot_ms_mean": _mean_ms(serve.tpot_s),
        "serve_wall_s": serve.wall_s,
        "serve_steps": serve.steps,
        "decode_only_steps_s": serve.decode_only_s,
        "output_tokens": serve.output_tokens,
    }
    if prefill is not None:
        figures["prefill_wall_s"] = prefill.wall_s
    return figures


def run_bench(
    arch: str = "tiny-moe",
    workers: int = 1,
    num_requests: int = DEFAULT_REQUESTS,
    seed: int = DEFAULT_SEED,
    weights_dir: str | Path | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    threads: int | None = None,
    random_weights: bool = False,
    progress: bool = False,
    prompt_tokens: tuple[int, int] = PROMPT_TOKENS,
    output_tokens: tuple[int, int] = OUTPUT_TOKENS,
) -> dict:
    """Run the benchmark (module docstring) and return its report (`bench_report`): figures, request set and
    configuration as a dict.

    `prompt_tokens` and `output_tokens` narrow the request set's (inclusive) length ranges (quick runs, tests).
    """
    from matrixstack.arch import load_arch

    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype {dtype!r} is not one of float32, bfloat16, float16")
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    spec = load_arch(arch)
    requests = make_requests(num_requests, seed, spec.vocab_size, prompt_tokens, output_tokens)
    config = bench_config(requests)
    engine, close, runner_kind = build_engine(
        arch, config, workers, weights_dir, getattr(torch, dtype), device, random_weights, seed
    )
    try:
        warm_up(engine)
        total_output = sum(r.output_tokens for r in requests)
        with _progress(progress, num_requests + total_output) as advance:
            prefill = run_phase(engine, requests, full_outputs=False, on_tokens=advance)
            serve = run_phase(engine, requests, full_outputs=True, on_tokens=advance)
    finally:
        close()
    setup = {
        "arch": spec.name,
        "workers": workers,
        "runner": runner_kind,
        "seed": seed,
        "dtype": dtype,
        "device": device,
    }
    return bench_report(setup, requests, prefill, serve, config, prompt_tokens, output_tokens)


def bench_report(
    setup: dict,
    requests: list[BenchRequest],
    prefill: PhaseTiming | None,
    serve: PhaseTiming,
    config: EngineConfig,
    prompt_tokens: tuple[int, int] = PROMPT_TOKENS,
    output_tokens: tuple[int, int] = OUTPUT_TOKENS,
) -> dict:
    """Return the report of a run (`run_bench`'s dict) from what it measured: `setup` (arch, workers, runner, seed,
    dtype, device), the request set, the two phases' timings, the config and the length ranges; this process's
    torch and CPU are added as they are."""
    return {
        "arch": setup["arch"],
        "workers": setup["workers"],
        "runner": setup["runner"],
        "requests": len(requests),
        "seed": setup["seed"],
        "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
        **summarize(prefill, serve),
        "distribution": distribution(prompt_tokens, output_tokens),
        "config": config.model_dump(),
        "dtype": setup["dtype"],
        "device": setup["device"] if setup["workers"] == 1 else "per worker",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def summary_rows(result: dict) -> list[tuple[str, str]]:
    """Return the (figure, value) rows `matrixstack engine bench` shows of a report, the values formatted."""
    return [
        ("prefill tokens/s", f"{result['prefill_tokens_per_s']:,.0f}"),
        ("decode tokens/s", f"{result['decode_tokens_per_s']:,.0f}"),
        ("output tokens/s (end to end)", f"{result['output_tokens_per_s']:,.0f}"),
        ("TTFT mean", f"{result['ttft_ms_mean']:,.1f} ms"),
        ("TPOT mean", f"{result['tpot_ms_mean']:,.2f} ms"),
        ("prompt / output tokens", f"{result['prompt_tokens']:,} / {result['output_tokens']:,}"),
        ("threads, dtype, device", f"{result['threads']}, {result['dtype']}, {result['device']}"),
        ("torch", result["torch"]),
    ]


class _progress:
    """A rich progress bar on stderr over the run's tokens (a no-op when disabled); yields `advance(n)`."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total
        self._bar = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import Progress

        self._bar = Progress(console=Console(stderr=True), transient=True)
        self._bar.start()
        task = self._bar.add_task("bench: prefill, then serve", total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
