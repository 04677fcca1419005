"""How long does the engine's step loop spend per step when its streams carry stop strings? (issue 15 point 2:
detokenising off the engine's step loop.)

Usage: `python bench/engine_thread_detokenize.py [--streams 32] [--max-tokens 64] [--rounds 3] [--json]
[--out FILE]`. Results go to bench/results/engine_thread_detokenize.json (`--out`); with --json the last line
printed is the same JSON object. It measures the `matrixstack` Python imports: put another checkout's `src` first
on PYTHONPATH to measure it (e.g. the code before the fix, `git archive cf4b79a src | tar -x -C /tmp/before`, with
`--out bench/results/engine_thread_detokenize_before.json`).

One `AsyncEngine` over tiny-moe (the packaged weights, or seeded random ones) in this process; `--streams`
concurrent streams on one event loop, each of exactly `--max-tokens` tokens (`ignore_eos`), run in two cases that
alternate for `--rounds` rounds:

- `stop_strings`: every stream has two stop strings that never occur, so the text is assembled and searched for
  every token, and no stream ends early;
- `token_ids_only` (the peer): `detokenize` off, no text at all — what a step costs without any detokenising.

On the engine thread, each `LLMEngine.step` is timed (`step_ms`: wall, schedule + model + sampling + postprocess),
its time outside the runner's `run` (`outside_model_ms`: schedule, postprocess, deltas — where detokenising sat
before the fix), and the tokenizer's decode calls made on that thread are counted and timed
(`engine_thread_decode_ms_per_step`, a mean). Step figures are over the steps of all rounds; `step_ratio` is
stop_strings / token_ids_only of the median step, `outside_model_ratio` of the mean time outside the model. No
figure is asserted anywhere: they depend on the machine (and this one is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from matrixstack.arch import load_arch
from matrixstack.engine import PACKAGED_WEIGHTS
from matrixstack.engine.config import EngineConfig, SamplingParams
from matrixstack.engine.llm_engine import AsyncEngine, LLMEngine
from matrixstack.engine.loading import load_model
from matrixstack.engine.model import MoETransformer
from matrixstack.engine.model_runner import ModelRunner
from matrixstack.engine.tokenizer import Tokenizer

RESULTS = Path(__file__).parent / "results" / "engine_thread_detokenize.json"
STOP_NEVER = ["\u2603never\u2603", "zq#zq"]  # stop strings tiny-moe does not produce
PROMPT = "Once upon a time, in a land far away,"
CASES = ("stop_strings", "token_ids_only")


class EngineThreadClock:
    """Times every `LLMEngine.step`, the model's part of it, and every tokenizer decode made on the engine thread."""

    def __init__(self, engine: LLMEngine):
        self.step_s: list[float] = []
        self.outside_model_s: list[float] = []
        self.decode_s_per_step: list[float] = []
        self.decode_calls = 0
        self._decode_s = self._model_s = 0.0
        step, decode, run = engine.step, engine.tokenizer.decode, engine.runner.run

        def timed_step():
            self._decode_s = self._model_s = 0.0
            start = time.perf_counter()
            deltas = step()
            self.step_s.append(time.perf_counter() - start)
            self.outside_model_s.append(self.step_s[-1] - self._model_s)
            self.decode_s_per_step.append(self._decode_s)
            return deltas

        def timed_run(out):
            start = time.perf_counter()
            tokens = run(out)
            self._model_s += time.perf_counter() - start
            return tokens

        def timed_decode(*args, **kwargs):
            if threading.current_thread().name != "engine-loop":
                return decode(*args, **kwargs)
            start = time.perf_counter()
            text = decode(*args, **kwargs)
            self._decode_s += time.perf_counter() - start
            self.decode_calls += 1
            return text

        engine.step = timed_step
        engine.runner.run = timed_run
        engine.tokenizer.decode = timed_decode

    def reset(self) -> None:
        """Forget what was timed so far."""
        self.step_s, self.outside_model_s, self.decode_s_per_step, self.decode_calls = [], [], [], 0


async def run_streams(engine: AsyncEngine, prompt_ids: list[int], params: SamplingParams, streams: int) -> int:
    """Run `streams` requests at once to their end; return the output tokens."""

    async def one(i: int) -> int:
        tokens = 0
        async for delta in engine.stream(prompt_ids, params, f"bench-{time.monotonic_ns()}-{i}"):
            tokens += len(delta.token_ids)
        return tokens

    return sum(await asyncio.gather(*(one(i) for i in range(streams))))


def build_engine(streams: int, max_tokens: int) -> AsyncEngine:
    """Return an AsyncEngine over tiny-moe sized for `streams` concurrent requests of `max_tokens` tokens."""
    if any(PACKAGED_WEIGHTS["tiny-moe"].glob("*.safetensors")):
        model, tokenizer = load_model("tiny-moe")
    else:
        torch.manual_seed(0)
        model = MoETransformer(load_arch("tiny-moe")).eval()
        tokenizer = Tokenizer.from_file(PACKAGED_WEIGHTS["tiny-moe"] / "tokenizer.json")
    max_model_len = 128 + max_tokens
    config = EngineConfig(
        block_size=16, num_kv_blocks=streams * (max_model_len // 16 + 1), max_num_seqs=streams,
        max_num_batched_tokens=max(2048, streams), max_model_len=max_model_len,
    )  # fmt: skip
    return AsyncEngine(LLMEngine(ModelRunner(model, config), tokenizer, config))


def figures(step_s: list[float], outside_s: list[float], decode_s: list[float], decode_calls: int, tokens: int,
            wall_s: float) -> dict:  # fmt: skip
    """Return one case's figures over all its rounds' steps."""
    return {
        "steps": len(step_s),
        "step_ms_median": statistics.median(step_s) * 1e3,
        "step_ms_mean": statistics.fmean(step_s) * 1e3,
        "outside_model_ms_median": statistics.median(outside_s) * 1e3,
        "outside_model_ms_mean": statistics.fmean(outside_s) * 1e3,
        "engine_thread_decode_ms_per_step": statistics.fmean(decode_s) * 1e3,
        "engine_thread_decode_calls": decode_calls,
        "output_tokens_per_s": tokens / wall_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = build_engine(args.streams, args.max_tokens)
    clock = EngineThreadClock(engine.engine)
    prompt_ids = engine.engine.tokenizer.encode(PROMPT, add_bos=True)
    params = {
        "stop_strings": SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True, stop=STOP_NEVER),
        "token_ids_only": SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True, detokenize=False),
    }
    asyncio.run(run_streams(engine, prompt_ids, params["stop_strings"], 2))  # warm-up
    step_s: dict[str, list[float]] = {case: [] for case in CASES}
    outside_s: dict[str, list[float]] = {case: [] for case in CASES}
    decode_s: dict[str, list[float]] = {case: [] for case in CASES}
    decode_calls, tokens, wall_s = dict.fromkeys(CASES, 0), dict.fromkeys(CASES, 0), dict.fromkeys(CASES, 0.0)
    try:
        for _ in range(args.rounds):
            for case in CASES:
                clock.reset()
                start = time.perf_counter()
                tokens[case] += asyncio.run(run_streams(engine, prompt_ids, params[case], args.streams))
                wall_s[case] += time.perf_counter() - start
                step_s[case] += clock.step_s
                outside_s[case] += clock.outside_model_s
                decode_s[case] += clock.decode_s_per_step
                decode_calls[case] += clock.decode_calls
    finally:
        engine.close()
    result: dict = {"streams": args.streams, "max_tokens": args.max_tokens, "rounds": args.rounds}
    for case in CASES:
        result[case] = figures(
            step_s[case], outside_s[case], decode_s[case], decode_calls[case], tokens[case], wall_s[case]
        )
    stop, peer = result["stop_strings"], result["token_ids_only"]
    result["step_ratio"] = stop["step_ms_median"] / peer["step_ms_median"]
    result["outside_model_ratio"] = stop["outside_model_ms_mean"] / peer["outside_model_ms_mean"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for case in CASES:
        f = result[case]
        print(f"{case:15} step {f['step_ms_median']:.2f} ms median ({f['step_ms_mean']:.2f} mean), outside the "
              f"model {f['outside_model_ms_mean']:.3f} ms mean, engine-thread decode "
              f"{f['engine_thread_decode_ms_per_step']:.3f} ms/step in {f['engine_thread_decode_calls']} calls, "
              f"{f['output_tokens_per_s']:.0f} tokens/s")  # fmt: skip
    print(f"stop_strings / token_ids_only: step {result['step_ratio']:.3f}, outside the model "
          f"{result['outside_model_ratio']:.3f}")  # fmt: skip
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
