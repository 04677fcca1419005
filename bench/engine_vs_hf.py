"""The MatrixStack engine against Hugging Face transformers' `generate`, on the same tiny-moe and the same requests.

Usage: `python bench/engine_vs_hf.py [--json] [--requests 32] [--seed 0] [--threads N] [--repeats N]
[--random-weights] [--dtype float32|bfloat16] [--hf-experts auto|eager|grouped_mm|batched_mm]`.
Needs transformers, which is not a test dependency: `pip install -e '.[bench]'` (the `bench` extra of
pyproject.toml: transformers>=4.46; written against 5.24). Results go to bench/results/engine_vs_hf.json; with
--json the last line printed is the same JSON object (`engine_tokens_per_s`, `hf_tokens_per_s`, `ratio`, ...).

The model. tiny-moe is exactly transformers' `Glm4MoeForCausalLM` (GLM-4.5): the config.json is the one
`matrixstack model export` writes (`engine.hf_export.glm4_moe_config`, whose docstring gives the mapping and why
the other candidates fit worse), so nothing is approximated: the engine's checkpoint (`engine.weights.save_weights`,
Hugging Face tensor names) loads into it as is, and the script checks that both give the same logits (within 1e-4)
before timing anything.

The weights are tiny-moe's packaged trained weights by default (greedy tokens of a trained model are decisive, so
the two implementations can be compared token by token); `--random-weights` uses the engine's seeded random
initialisation instead (`--seed`). Either way both sides run the same tensors, in float32 (`--dtype bfloat16`
runs both in bf16, with a looser logits check), with the same torch intra-op threads, set explicitly with
`torch.set_num_threads` (`--threads`, default 1: one core, the `local` fabric's device, as `tools.calibrate`
measures; `--threads 2` uses both cores of a 2-core machine).

The requests. `matrixstack.tools.bench.make_requests(requests, seed)`: prompt lengths uniform in 16..256 tokens,
output lengths uniform in 16..128 tokens, prompt token ids uniform over the vocabulary past the special tokens,
greedy decoding, end-of-sequence ignored (every request produces exactly its output length).

Hugging Face gets its best: all requests in one left-padded batch (attention mask, so padding is not attended
and positions start at 0 for every prompt), `use_cache=True`, greedy, `max_new_tokens` = the longest output,
`torch.inference_mode`, SDPA attention, the default dynamic KV cache (`cache_implementation="static"` was
measured slower here, 3.0-3.1 s against 2.8-3.1 s), and its faster expert implementation for this batch (`eager` and
`grouped_mm` are each timed on a short generate first and the faster is used; `batched_mm`, which runs every
expert on every token, was 30x slower here and is only run when asked for with `--hf-experts`). Its throughput
counts only each request's own output tokens (the tokens generated past a request's length are padding work, not
output) over the wall time of the `generate` call. The engine runs the same requests, all submitted at once, with
continuous batching (`LLMEngine`, a `ModelRunner`, the default scheduler limits, KV cache sized to hold them
all): its throughput is the same output tokens over the wall time from submission to the last token. Both sides
are warmed up first; each is timed `--repeats` times (default 5: on a shared 2-core VM single runs of either side
vary by 10-20%), the two sides alternating, and each side's best
run is kept (a `gc.collect()` before each run). Neither side assembles text (`generate` returns token ids; the
engine runs with `SamplingParams(detokenize=False)`). The greedy tokens are compared request by request
(identical up to float32 round-off: a request may diverge where two logits nearly tie, and the report says
where); the engine's tokens are also checked to be valid ids and exactly each request's length.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from matrixstack.arch import load_arch
from matrixstack.engine import PACKAGED_WEIGHTS, TOKENIZER_FILE
from matrixstack.engine.hf_export import glm4_moe_config
from matrixstack.engine.llm_engine import LLMEngine
from matrixstack.engine.model import MoETransformer
from matrixstack.engine.model_runner import ModelRunner
from matrixstack.engine.tokenizer import Tokenizer
from matrixstack.engine.weights import load_weights, save_weights
from matrixstack.tools.bench import bench_config, distribution, make_requests, run_phase, warm_up

RESULTS = Path(__file__).parent / "results"
ARCH = "tiny-moe"
LOGITS_ATOL = {"float32": 1e-4, "bfloat16": 0.25}  # bf16 keeps ~3 significant digits; logits reach ~20
PROBE_NEW_TOKENS = 4  # the short generate that picks HF's expert implementation
# batched_mm runs every expert on every token (experts / top-k = 4x the FLOPs here) and took 30x eager's time on
# the probe (16.8 s vs 0.56 s, 2 CPU cores), so the automatic choice leaves it out; --hf-experts batched_mm runs it.
AUTO_EXPERT_IMPLEMENTATIONS = ("eager", "grouped_mm")
MIN_RATIO = 2.0


def build_models(random_weights: bool, seed: int, folder: Path, dtype: str = "float32"):
    """Return (engine model, HF model, tokenizer) holding the same weights, both in `dtype`."""
    import transformers

    arch = load_arch(ARCH)
    torch.manual_seed(seed)
    model = MoETransformer(arch)
    if not random_weights:
        load_weights(model, PACKAGED_WEIGHTS[ARCH])
    model.eval()
    save_weights(model, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(glm4_moe_config(arch, "float32")))
    torch_dtype = getattr(torch, dtype)
    hf = transformers.Glm4MoeForCausalLM.from_pretrained(folder, dtype=torch_dtype, attn_implementation="sdpa")
    model.to(torch_dtype)
    hf.eval()
    return model, hf, Tokenizer.from_file(PACKAGED_WEIGHTS[ARCH] / TOKENIZER_FILE)


@torch.inference_mode()
def check_same_function(model, hf, vocab_size: int, dtype: str = "float32") -> float:
    """Return the largest logit difference of the two models on one sequence; exit when it exceeds the dtype's
    LOGITS_ATOL."""
    ids = torch.arange(FIRST_CHECK_TOKENS) * 37 % vocab_size
    ours = model.reference_forward(ids)
    theirs = hf(ids[None]).logits[0].float()
    diff = float((ours - theirs).abs().max())
    if diff > LOGITS_ATOL[dtype]:
        raise SystemExit(f"the engine and Hugging Face disagree on the logits by {diff:.2e}: the mapping is wrong")
    return diff


FIRST_CHECK_TOKENS = 64


def padded_batch(requests, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (input_ids, attention_mask) [requests, longest prompt], left-padded."""
    width = max(len(r.prompt_token_ids) for r in requests)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(requests), width), dtype=torch.int64)
    for i, r in enumerate(requests):
        n = len(r.prompt_token_ids)
        ids[i, width - n :] = torch.tensor(r.prompt_token_ids)
        mask[i, width - n :] = 1
    return ids, mask


@torch.inference_mode()
def hf_generate(hf, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Return (generated tokens [batch, new_tokens], seconds) of one greedy `generate` call."""
    start = time.perf_counter()
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=None,
        pad_token_id=0,
    )
    seconds = time.perf_counter() - start
    return out[:, ids.shape[1] :], seconds


def pick_expert_implementation(hf, ids, mask, names: tuple[str, ...]) -> tuple[str, dict[str, float]]:
    """Time a short generate with each of the expert implementations `names`; return the fastest and all
    timings."""
    timings = {}
    for name in names:
        try:
            hf.set_experts_implementation(name)
            hf_generate(hf, ids, mask, PROBE_NEW_TOKENS)  # warm-up for this implementation
            timings[name] = hf_generate(hf, ids, mask, PROBE_NEW_TOKENS)[1]
        except Exception as exc:  # an implementation this build or device lacks
            timings[name] = float("nan")
            print(f"HF experts_implementation={name} unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
    usable = {k: v for k, v in timings.items() if v == v}
    best = min(usable, key=usable.get)
    hf.set_experts_implementation(best)
    return best, timings


def make_engine(model, tokenizer, requests) -> LLMEngine:
    """Return a warmed-up engine over `model` whose KV cache holds every request at once."""
    config = bench_config(requests)
    engine = LLMEngine(ModelRunner(model, config), tokenizer, config)
    warm_up(engine)
    return engine


def run_engine(engine: LLMEngine, requests) -> tuple[float, list[list[int]], dict]:
    """Return (seconds, output token ids per request, figures) of one engine run over the request set."""
    timing = run_phase(engine, requests, full_outputs=True, on_tokens=lambda n: None, detokenize=False)
    figures = {
        "wall_s": round(timing.wall_s, 3),
        "steps": timing.steps,
        "decode_only_tokens_per_s": round(timing.decode_only_tokens / timing.decode_only_s, 1),
    }
    return timing.wall_s, [seq.output_token_ids for seq in timing.sequences], figures


def compare_tokens(engine_out: list[list[int]], hf_out: torch.Tensor, requests) -> dict:
    """Return how many requests got identical greedy tokens, and where the others first differ."""
    identical, first_diff = 0, {}
    for i, r in enumerate(requests):
        ours, theirs = engine_out[i], hf_out[i, : r.output_tokens].tolist()
        if ours == theirs:
            identical += 1
        else:
            first_diff[i] = next(j for j, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
    return {"identical_requests": identical, "first_difference_at": first_diff}


def main() -> None:
    """Run both sides, print the comparison and write bench/results/engine_vs_hf.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="end with a JSON line")
    parser.add_argument("--requests", type=int, default=32, help="requests in the set (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request set and random weights")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, both sides (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side, interleaved; the best is kept")
    parser.add_argument("--random-weights", action="store_true", help="seeded random weights, not the packaged")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both sides' dtype")
    parser.add_argument(
        "--hf-experts",
        default="auto",
        choices=["auto", "eager", "grouped_mm", "batched_mm"],
        help="HF experts_implementation (auto: the faster of eager and grouped_mm on a short probe)",
    )
    args = parser.parse_args()
    try:
        import transformers
    except ImportError:
        raise SystemExit("transformers is not installed: pip install -e '.[bench]'") from None
    torch.set_num_threads(args.threads)
    arch = load_arch(ARCH)
    requests = make_requests(args.requests, args.seed, arch.vocab_size)
    with tempfile.TemporaryDirectory() as folder:
        model, hf, tokenizer = build_models(args.random_weights, args.seed, Path(folder), args.dtype)
    logits_diff = check_same_function(model, hf, arch.vocab_size, args.dtype)
    output_tokens = sum(r.output_tokens for r in requests)
    longest = max(r.output_tokens for r in requests)
    ids, mask = padded_batch(requests, pad_id=0)
    names = AUTO_EXPERT_IMPLEMENTATIONS if args.hf_experts == "auto" else (args.hf_experts,)
    expert_impl, impl_timings = pick_expert_implementation(hf, ids, mask, names)
    engine = make_engine(model, tokenizer, requests)
    hf_seconds = engine_seconds = float("inf")
    hf_out = engine_out = engine_figures = None
    for _ in range(args.repeats):  # interleaved, so both sides see the machine in the same moods
        gc.collect()  # each side starts without the other's garbage
        generated, seconds = hf_generate(hf, ids, mask, longest)
        if seconds < hf_seconds:
            hf_seconds, hf_out = seconds, generated
        gc.collect()
        seconds, outputs, figures = run_engine(engine, requests)
        if seconds < engine_seconds:
            engine_seconds, engine_out, engine_figures = seconds, outputs, figures
    engine_rate = output_tokens / engine_seconds
    hf_rate = output_tokens / hf_seconds
    tokens_valid = all(0 <= t < arch.vocab_size for out in engine_out for t in out) and [
        len(o) for o in engine_out
    ] == [r.output_tokens for r in requests]
    figures = {
        "engine_tokens_per_s": round(engine_rate, 1),
        "hf_tokens_per_s": round(hf_rate, 1),
        "ratio": round(engine_rate / hf_rate, 2),
        "at_least_2x": engine_rate / hf_rate >= MIN_RATIO,
        "output_tokens": output_tokens,
        "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
        "requests": args.requests,
        "seed": args.seed,
        "distribution": distribution(),
        "hf_padded_batch": {"prompt_width": ids.shape[1], "max_new_tokens": longest},
        "hf_seconds": round(hf_seconds, 3),
        "hf_model": "Glm4MoeForCausalLM",
        "hf_experts_implementation": expert_impl,
        "hf_experts_probe_s": {k: round(v, 3) for k, v in impl_timings.items()},
        "engine": engine_figures,
        "weights": "random (seeded)" if args.random_weights else "packaged tiny-moe",
        "dtype": args.dtype,
        "max_logit_difference": logits_diff,
        "engine_tokens_valid": tokens_valid,
        **compare_tokens(engine_out, hf_out, requests),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine_vs_hf.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(
        f"{args.requests} requests, {output_tokens} output tokens, {args.threads} threads: engine "
        f"{figures['engine_tokens_per_s']} tok/s, Hugging Face ({expert_impl} experts) {figures['hf_tokens_per_s']} "
        f"tok/s: {figures['ratio']}x (target >= {MIN_RATIO}x); greedy tokens identical in "
        f"{figures['identical_requests']}/{args.requests} requests"
    )
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
