"""Training tokens/s of `matrixstack tune`'s training loop against PEFT + transformers, the same LoRA on the same data.

Usage: `python bench/tune_speed.py [--json] [--steps 24] [--warmup 4] [--batch-size 8] [--rank 8] [--rows 256]
[--repeats 3] [--device cpu|cuda] [--profile-steps 6]`. Needs peft and transformers (the `test` extra). Results go to
bench/results/tune_speed.json; with --json the last line printed is the same JSON object (`engine_tokens_per_s`,
`peft_tokens_per_s`, `ratio`, memory, where the time goes).

Both sides train tiny-moe in float32 with a LoRA of rank `--rank`, alpha 2 x rank, on q/k/v/o, AdamW (lr 2e-4, no
weight decay), gradients clipped to norm 1, on the first `--rows` rows of the shipped dataset cpython-reference-qa
(chat rows: the prompt rendered with the engine's chat template, the answer learned, prompt tokens masked:
adapt/examples.py), in the same batches in the same order (`adapt.train.batch_indices`), for `--steps` optimizer
steps of which the first `--warmup` are not timed.

- MatrixStack: `adapt.train.train`, the loop `matrixstack tune` runs, on one device (a CPU core with one thread,
  or GPU 0): its per-step times (`step_s` of the checkpoint's history: batch, forward, loss, backward, clipping,
  optimizer step) over the timed steps.
- PEFT: the HF export of tiny-moe (`engine.hf_export`, transformers' Glm4MoeForCausalLM, SDPA attention) wrapped by
  `peft.get_peft_model(LoraConfig(...))`, the loss as transformers computes it from `labels` (the prompt's -100,
  mean over the answer tokens: the same number as ours), on the same device and threads (pinned to the same core);
  its faster expert implementation (eager or grouped_mm, timed on `--warmup` steps each) is used. Each step is timed
  the same way (a CUDA synchronise before reading the clock on GPU).

Each side runs in its own process (so its peak memory is its own: peak RSS on CPU, `torch.cuda.max_memory_allocated`
on GPU), `--repeats` times alternating, and its best run is kept. Tokens/s counts every non-padding token of the
batches (prompt and answer) over the timed steps' seconds: on CPU the process's CPU seconds (`time.process_time`:
one pinned thread, so on a machine shared with other work the neighbours' time is not counted; a first run here
with wall time saw one side's runs spread 746-1,814 tokens/s), on GPU wall seconds; the wall-clock figures are
reported beside them. "Where the time goes": each side once more under
`torch.profiler` for `--profile-steps` steps (the model built before the profiler starts), the ops with the most
self time (share of the profiled total).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from matrixstack.adapt.dataset_file import builtin_path, read_dataset
from matrixstack.adapt.examples import IGNORE, Example, to_examples
from matrixstack.adapt.spec import TuneSpec
from matrixstack.adapt.train import CHECKPOINT_FILE, Placement, Trainer, batch_indices, train
from matrixstack.arch import load_arch
from matrixstack.engine import PACKAGED_WEIGHTS
from matrixstack.engine.hf_export import export_hf_folder
from matrixstack.engine.loading import load_model

RESULTS = Path(__file__).parent / "results"
ARCH, DATASET = "tiny-moe", "cpython-reference-qa"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LR, MAX_GRAD_NORM, MAX_LEN = 2e-4, 1.0, 512
GOAL_RATIO = 1.5
TOP_OPS = 8
HF_EXPERTS = ("eager", "grouped_mm")


def examples(rows: int) -> list[Example]:
    """Return the first `rows` rows of the shipped dataset as training examples."""
    data = read_dataset(builtin_path(DATASET))
    _, tokenizer = load_model(ARCH)
    return to_examples(tokenizer, data.rows[:rows], MAX_LEN)


def spec_of(args, steps: int) -> TuneSpec:
    return TuneSpec(
        base=ARCH, dataset=DATASET, targets=TARGETS, rank=args.rank, alpha=2.0 * args.rank, steps=steps, lr=LR,
        batch_size=args.batch_size, checkpoint_every=steps, out="bench",
    )  # fmt: skip


def peak_memory_gib(device: str) -> float:
    """Return this process's peak memory: CUDA allocations on GPU, else peak RSS (GiB)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def engine_side(args, data: list[Example]) -> dict:
    """Run `adapt.train.train` and return its timed steps' tokens and seconds."""
    placement = Placement("cuda", (0,)) if args.device == "cuda" else Placement("cpu", (args.core,))
    with tempfile.TemporaryDirectory() as folder:
        final = train(spec_of(args, args.steps), data, placement, Path(folder))
        history = final.history[args.warmup :]
        top = []
        if args.profile_steps:  # the loop only: a Trainer built first, then its steps profiled
            (Path(folder) / CHECKPOINT_FILE).unlink()
            pin(args)
            device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
            trainer = Trainer(spec_of(args, args.profile_steps), data, device, 0, 1, Path(folder), None)
            with profiled(args.device) as prof:
                trainer.run()
            top = top_ops(prof, args.device)
    return {
        "tokens": sum(h["tokens"] for h in history),
        "seconds": sum(h["step_s"] for h in history),
        "cpu_seconds": sum(h["cpu_s"] for h in history),
        "losses": [round(h["loss"], 5) for h in final.history],
        "top_ops": top,
        "peak_memory_gib": round(peak_memory_gib(args.device), 3),
    }


def hf_batch(chosen: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (input_ids, attention_mask, labels) right-padded, labels unshifted as transformers wants them."""
    width = max(len(e.ids) for e in chosen)
    ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chosen), width), dtype=torch.long)
    labels = torch.full((len(chosen), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(chosen):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        mask[row, : len(e.ids)] = 1
        labels[row, e.prompt_len : len(e.ids)] = torch.tensor(e.ids[e.prompt_len :])
    return ids, mask, labels


def pin(args) -> None:
    """Pin this process to `--core` with one torch thread (on CPU), as `adapt.train` pins a rank."""
    if args.device == "cpu":
        os.sched_setaffinity(0, {args.core})
        torch.set_num_threads(1)


def profiled(device: str):
    """Return a torch profiler context over the CPU (and CUDA on GPU)."""
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else []))


def hf_train(args, data: list[Example], hf_folder: Path, steps: int, experts: str, prof: bool = False) -> dict:
    """Train PEFT's LoRA on the HF export for `steps` steps; return the timed steps' tokens, seconds and losses (and
    with `prof`, the top ops of the steps under the profiler)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Glm4MoeForCausalLM

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32, attn_implementation="sdpa")
    model.set_experts_implementation(experts)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(model, config).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    _, tokenizer = load_model(ARCH)
    tokens, seconds, cpu_seconds, losses = 0, 0.0, 0.0, []
    with profiled(args.device) if prof else contextlib.nullcontext() as profiler:
        for step in range(steps):
            chosen = [data[i] for i in batch_indices(len(data), args.batch_size, 0, step)]
            started, cpu_started = time.perf_counter(), time.process_time()
            ids, mask, labels = (t.to(device) for t in hf_batch(chosen, tokenizer.eos_id))
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if args.device == "cuda":
                torch.cuda.synchronize()
            losses.append(round(float(loss), 5))
            if step >= args.warmup:
                tokens += sum(len(e.ids) for e in chosen)
                seconds += time.perf_counter() - started
                cpu_seconds += time.process_time() - cpu_started
    return {
        "tokens": tokens,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "losses": losses,
        "top_ops": top_ops(profiler, args.device) if prof else [],
    }


def peft_side(args, data: list[Example]) -> dict:
    """Pick PEFT's faster expert implementation, train with it, return its figures."""
    pin(args)
    with tempfile.TemporaryDirectory() as folder:
        hf_folder = Path(folder) / "hf"
        export_hf_folder(load_arch(ARCH), PACKAGED_WEIGHTS[ARCH], hf_folder)
        probe = {}
        for experts in HF_EXPERTS:
            try:
                run = hf_train(args, data, hf_folder, 2 * args.warmup, experts)
                probe[experts] = run["tokens"] / run[clock_of(args)]
            except (RuntimeError, NotImplementedError, ValueError) as exc:
                print(f"HF experts {experts} unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        best = max(probe, key=probe.get)
        result = hf_train(args, data, hf_folder, args.steps, best)
        if args.profile_steps:
            result["top_ops"] = hf_train(args, data, hf_folder, args.profile_steps, best, prof=True)["top_ops"]
    return {
        **result,
        "experts_implementation": best,
        "probe_tokens_per_s": {k: round(v, 1) for k, v in probe.items()},
        "peak_memory_gib": round(peak_memory_gib(args.device), 3),
    }


def top_ops(prof, device: str) -> list[dict]:
    """Return the profiled ops with the most self time: name, self ms, share of the total self time."""
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events)
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [
        {"op": e.key, "self_ms": round(getattr(e, key) / 1e3, 1), "share": round(getattr(e, key) / total, 3)}
        for e in events[:TOP_OPS]
    ]


def clock_of(args) -> str:
    """Return which seconds tokens/s are counted over: the process's CPU time on CPU, wall time on GPU."""
    return "cpu_seconds" if args.device == "cpu" else "seconds"


def run_side(args, side: str) -> dict:
    """Run one side in a fresh process of this script and return its figures."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--side", side, "--side-out", out.name, *args.forward]
        subprocess.run(cmd, check=True)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--core", type=int, default=0, help="CPU core both sides are pinned to")
    parser.add_argument("--profile-steps", type=int, default=6)
    parser.add_argument("--side", choices=("engine", "peft"), help=argparse.SUPPRESS)
    parser.add_argument("--side-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side is not None:
        data = examples(args.rows)
        figures = engine_side(args, data) if args.side == "engine" else peft_side(args, data)
        Path(args.side_out).write_text(json.dumps(figures))
        return
    args.forward = [
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
        "--rank", str(args.rank), "--rows", str(args.rows), "--device", args.device, "--core", str(args.core),
    ]  # fmt: skip
    runs: dict[str, list[dict]] = {"engine": [], "peft": []}
    for repeat in range(args.repeats):
        profile = ["--profile-steps", str(args.profile_steps if repeat == 0 else 0)]
        for side in ("engine", "peft"):
            forward = args.forward
            args.forward = [*forward, *profile]
            runs[side].append(run_side(args, side))
            args.forward = forward
    clock = clock_of(args)
    best = {side: max(r, key=lambda x: x["tokens"] / x[clock]) for side, r in runs.items()}
    rate = {side: b["tokens"] / b[clock] for side, b in best.items()}
    wall = {side: b["tokens"] / b["seconds"] for side, b in best.items()}
    result = {
        "bench": "tune_speed",
        "arch": ARCH,
        "dataset": DATASET,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "threads": 1 if args.device == "cpu" else None,
        "machine": platform.processor() or platform.machine(),
        "steps": args.steps,
        "timed_steps": args.steps - args.warmup,
        "batch_size": args.batch_size,
        "rank": args.rank,
        "rows": args.rows,
        "engine_tokens_per_s": round(rate["engine"], 1),
        "peft_tokens_per_s": round(rate["peft"], 1),
        "ratio": round(rate["engine"] / rate["peft"], 3),
        "goal_ratio": GOAL_RATIO,
        "clock": "process CPU seconds (one pinned thread)" if clock == "cpu_seconds" else "wall seconds",
        "engine_runs_tokens_per_s": [round(r["tokens"] / r[clock], 1) for r in runs["engine"]],
        "peft_runs_tokens_per_s": [round(r["tokens"] / r[clock], 1) for r in runs["peft"]],
        "engine_wall_tokens_per_s": round(wall["engine"], 1),
        "peft_wall_tokens_per_s": round(wall["peft"], 1),
        "wall_ratio": round(wall["engine"] / wall["peft"], 3),
        "engine_peak_memory_gib": max(r["peak_memory_gib"] for r in runs["engine"]),
        "peft_peak_memory_gib": max(r["peak_memory_gib"] for r in runs["peft"]),
        "peft_experts_implementation": best["peft"]["experts_implementation"],
        "peft_probe_tokens_per_s": best["peft"]["probe_tokens_per_s"],
        "first_losses": {"engine": runs["engine"][0]["losses"][:3], "peft": runs["peft"][0]["losses"][:3]},
        "engine_top_ops": runs["engine"][0]["top_ops"],
        "peft_top_ops": runs["peft"][0]["top_ops"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tune_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    if not args.json:
        print(
            f"tune training: MatrixStack {result['engine_tokens_per_s']:,} tokens/s, PEFT + transformers "
            f"{result['peft_tokens_per_s']:,} tokens/s: {result['ratio']}x (goal {GOAL_RATIO}x)"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
