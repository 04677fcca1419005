"""`matrixstack calibrate`: measure this machine and this runtime, and write the `local` fabric's figures.

A device of the `local` fabric is one CPU core, so everything is measured on one thread:

- the attention rate (FP32 FLOP/s of a 512-token SDPA) -> `efficiency.attention` as a fraction of the core's
  vector peak;
- streaming memory bandwidth (a 256 MiB copy) -> `hbm_gbs` (achievable, so `efficiency.hbm` is 1);
- `grouped_gemm_per_expert: true`: the engine's routed experts run torch's `grouped_mm`, which on CPU is one GEMM
  per expert, so the step model counts two matrix kernels per active expert;
- two figures FITTED to this runtime's own decode steps (tiny-moe, one thread), by design: the fixed cost of a
  kernel, from the step at FIT_BATCHES[0] = 1 sequence (almost all fixed cost: what the roofline does not
  explain is spread over the step model's kernels, `perf.step.kernels_per_layer`, matrix and vector kernels in
  the ratio a tiny matmul and a tiny elementwise op take here -> `matmul_kernel_us`, `vector_kernel_us`); and
  the GEMM efficiency, from the step at FIT_BATCHES[1] = 32 sequences -> `efficiency.gemm` (a decode step's
  GEMMs have a few rows each and reach a fraction of what the large-shape microbenchmark `gemm_flops_per_s`,
  the starting point, reaches). bench/calibrate_check.py tests the prediction at the batches between;
- the local bus between two worker processes (gloo over loopback): ping-pong latency and bandwidth.

The result goes to `local-calibration.yaml` in the data directory, which `fabric.local` reads from then on.
"""

from __future__ import annotations

import datetime as dt
import socket
import statistics
import time
from collections.abc import Callable

import torch
import torch.multiprocessing as mp
import yaml

from matrixstack.arch.loader import load_arch
from matrixstack.engine import PACKAGED_WEIGHTS, TOKENIZER_FILE
from matrixstack.engine.config import EngineConfig, SamplingParams
from matrixstack.engine.llm_engine import LLMEngine
from matrixstack.engine.model import MoETransformer
from matrixstack.engine.model_runner import ModelRunner
from matrixstack.engine.tokenizer import Tokenizer
from matrixstack.fabric.local import calibration_path, detect_local_fabric
from matrixstack.perf.spec import InstancePlan, Workload
from matrixstack.perf.step import StepModel, active_experts_per_rank, kernels_per_layer

CALIBRATION_ARCH = "tiny-moe"
PROMPT_TOKENS = 48
DECODE_TOKENS = 32
_COPY_ELEMENTS = 64 * 2**20  # 256 MiB of fp32
_PING_BYTES = (8, 32 * 2**20)
FIT_BATCHES = (1, 32)  # decode batches the kernel costs and the GEMM efficiency are fitted to
FIT_ROUNDS = 3  # alternations of the two fits (they move by well under 1% after the second)
FIT_TOLERANCE_PCT = 2.0  # a fitted step the prediction misses by more than this is reported (`fit_miss_pct`)


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Return the fastest of `repeats` timed calls of `fn`, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_flops_per_s(repeats: int = 5) -> float:
    """Return the median FP32 GEMM rate over the engine's typical shapes, in FLOP/s."""
    rates = []
    for m, k, n in ((64, 256, 512), (256, 256, 512), (512, 512, 512)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        seconds = _best_seconds(lambda a=a, b=b: a @ b, repeats)
        rates.append(2 * m * k * n / seconds)
    return statistics.median(rates)


def attention_flops_per_s(repeats: int = 5) -> float:
    """Return the FP32 rate of scaled-dot-product attention over a 512-token context, in FLOP/s."""
    heads, queries, keys, dim = 4, 64, 512, 64
    q, k, v = torch.randn(1, heads, queries, dim), torch.randn(1, heads, keys, dim), torch.randn(1, heads, keys, dim)
    seconds = _best_seconds(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), repeats)
    return 2 * 2 * heads * queries * keys * dim / seconds


def copy_gbs(repeats: int = 3) -> float:
    """Return the streaming bandwidth of a 256 MiB copy (read + write), in GB/s."""
    src, dst = torch.ones(_COPY_ELEMENTS), torch.empty(_COPY_ELEMENTS)
    seconds = _best_seconds(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def tiny_op_us(repeats: int = 2000) -> tuple[float, float]:
    """Return (microseconds of a 1-row matmul, of a small elementwise op): the runtime's per-call cost."""
    x, w, y = torch.randn(1, 256), torch.randn(256, 256), torch.randn(1, 256)

    def per_call(fn: Callable[[], object]) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1e6

    return per_call(lambda: x @ w), per_call(lambda: x * y)


def decode_step_seconds(batch: int, seed: int = 0) -> float:
    """Return the mean time of the engine's pure decode steps for `batch` sequences of tiny-moe (random weights)."""
    torch.manual_seed(seed)
    model = MoETransformer(load_arch(CALIBRATION_ARCH)).eval()
    tokenizer = Tokenizer.from_file(PACKAGED_WEIGHTS[CALIBRATION_ARCH] / TOKENIZER_FILE)
    config = EngineConfig(
        num_kv_blocks=max(64, batch * 8), block_size=16, max_num_seqs=max(batch, 1), max_model_len=256,
        max_num_batched_tokens=max(batch * PROMPT_TOKENS, 256),
    )  # fmt: skip
    engine = LLMEngine(ModelRunner(model, config), tokenizer, config)
    params = SamplingParams(temperature=0, max_tokens=DECODE_TOKENS, ignore_eos=True)
    for i in range(batch):
        engine.add_request([(7 * i + j) % 4000 + 10 for j in range(PROMPT_TOKENS)], params)
    decode_steps = []
    while engine.has_work():
        decoding = all(s.num_computed_tokens >= s.num_prompt_tokens for s in engine.scheduler.running) and not (
            engine.scheduler.waiting
        )
        before = len(engine.stats.step_seconds)
        engine.step()
        if decoding and len(engine.stats.step_seconds) > before:
            decode_steps.append(engine.stats.step_seconds[-1])
    return statistics.median(decode_steps[2:] or decode_steps)


def predicted_decode_seconds(batch: int) -> float:
    """Return the perf layer's decode step for `batch` tiny-moe sequences on one core of the local fabric."""
    arch = load_arch(CALIBRATION_ARCH)
    workload = Workload(
        input_len=PROMPT_TOKENS, output_len=DECODE_TOKENS, kv_len=PROMPT_TOKENS + DECODE_TOKENS // 2, precision="fp32"
    )
    plan = InstancePlan(devices=1, ep=1, batch_per_device=batch, microbatches=1)
    return StepModel(arch, detect_local_fabric(), workload).decode_step(plan).time_us / 1e6


def _pingpong(rank: int, port: int, results) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for size in _PING_BYTES:
        buffer = torch.zeros(size // 4)
        rounds = 200 if size < 1024 else 5
        torch.distributed.barrier()
        start = time.perf_counter()
        for _ in range(rounds):
            if rank == 0:
                torch.distributed.send(buffer, 1)
                torch.distributed.recv(buffer, 1)
            else:
                torch.distributed.recv(buffer, 0)
                torch.distributed.send(buffer, 0)
        if rank == 0:
            results[size] = (time.perf_counter() - start) / rounds / 2  # one way
    torch.distributed.destroy_process_group()


def local_bus() -> tuple[float, float]:
    """Return (one-way latency in microseconds, bandwidth in GB/s) of gloo between two local processes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_pingpong, args=(port, results), nprocs=2, join=True)
        small, large = results[_PING_BYTES[0]], results[_PING_BYTES[1]]
    return small * 1e6, _PING_BYTES[1] / large / 1e9


def calibrate(measure_bus: bool = True) -> dict:
    """Measure this machine, write the local fabric's calibration file and return what was written.

    The rates come from microbenchmarks; then two figures are fitted to the engine's own decode steps (module
    docstring): the kernel costs to the step at FIT_BATCHES[0] sequences, the GEMM efficiency to the step at
    FIT_BATCHES[1] (small-row GEMMs reach far less than the large-shape microbenchmark). Each depends a little on
    the other, so the two fits alternate FIT_ROUNDS times.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = detect_local_fabric() if not calibration_path().exists() else _uncalibrated()
        peak = base.device.peak_tflops["fp32"] * 1e12
        matmul_us, vector_us = tiny_op_us()
        efficiency = {
            "gemm": round(min(1.0, gemm_flops_per_s() / peak), 4),
            "attention": round(min(1.0, attention_flops_per_s() / peak), 4),
            "hbm": 1.0,
            "matmul_kernel_us": 0.0,
            "vector_kernel_us": 0.0,
            "grouped_gemm_per_expert": True,  # the engine's experts run torch's grouped_mm: a GEMM per expert on CPU
        }
        measured = {
            "measured_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "threads_per_device": 1,
            "hbm_gbs": round(copy_gbs(), 2),
            "efficiency": efficiency,
            "plane_gbs": base.plane("scale_up").bandwidth_gbs,
            "plane_latency_us": base.plane("scale_up").tiers[0].latency_us,
        }
        if measure_bus:
            latency_us, bus_gbs = local_bus()
            measured["plane_latency_us"], measured["plane_gbs"] = round(latency_us, 2), round(bus_gbs, 3)
        steps_s = {batch: decode_step_seconds(batch) for batch in FIT_BATCHES}
        measured["fitted_decode_step_ms"] = {batch: round(s * 1e3, 3) for batch, s in steps_s.items()}
        small, large = steps_s.values()
        for _ in range(FIT_ROUNDS):
            _fit_kernel_costs(measured, small, vector_us / matmul_us)
            _fit_gemm_efficiency(measured, large)
        measured["fit_miss_pct"] = {
            batch: round((predicted_decode_seconds(batch) / s - 1) * 100, 2) for batch, s in steps_s.items()
        }
        _write(measured)
        return measured
    finally:
        torch.set_num_threads(threads)


def fit_misses(measured: dict) -> dict[int, float]:
    """Return the fitted batches the prediction misses by more than FIT_TOLERANCE_PCT, with the miss in percent.

    The fit meets both steps unless a bound binds: GEMM efficiency at 1 or kernel costs at 0, which happens when the
    two steps were measured under different load (the larger step too fast for the smaller's fixed cost)."""
    return {int(b): pct for b, pct in measured.get("fit_miss_pct", {}).items() if abs(pct) > FIT_TOLERANCE_PCT}


def _fit_kernel_costs(measured: dict, step_s: float, vector_to_matmul: float) -> None:
    """Set the kernel costs so that the predicted decode step at FIT_BATCHES[0] equals `step_s`: what the roofline
    leaves unexplained, spread over the step's kernels, matrix and vector in the ratio `vector_to_matmul`."""
    efficiency = measured["efficiency"]
    efficiency["matmul_kernel_us"] = efficiency["vector_kernel_us"] = 0.0
    _write(measured)
    residual_s = step_s - predicted_decode_seconds(FIT_BATCHES[0])
    arch = load_arch(CALIBRATION_ARCH)
    moe = arch.ffn.moe
    active = active_experts_per_rank(arch, FIT_BATCHES[0], moe.routed_experts) if moe else None
    weighted_kernels = 0.0
    for i in range(arch.layers):
        matmuls, vectors = kernels_per_layer(arch, arch.is_moe_layer(i), active)
        weighted_kernels += matmuls + vectors * vector_to_matmul
    per_matmul_us = max(0.0, residual_s * 1e6 / weighted_kernels)
    efficiency["matmul_kernel_us"] = round(per_matmul_us, 2)
    efficiency["vector_kernel_us"] = round(per_matmul_us * vector_to_matmul, 2)
    _write(measured)


def _fit_gemm_efficiency(measured: dict, step_s: float) -> None:
    """Set `efficiency.gemm` (bisection, the prediction falls as it rises) so that the predicted decode step at
    FIT_BATCHES[1] equals `step_s`; it stays in [0.001, 1]."""
    low, high = 0.001, 1.0
    for _ in range(30):
        measured["efficiency"]["gemm"] = mid = (low + high) / 2
        _write(measured)
        if predicted_decode_seconds(FIT_BATCHES[1]) > step_s:
            low = mid
        else:
            high = mid
    measured["efficiency"]["gemm"] = round((low + high) / 2, 4)
    _write(measured)


def _uncalibrated():
    """Return the local fabric as detected without the calibration file (estimates only)."""
    path = calibration_path()
    saved = path.read_text()
    path.unlink()
    try:
        return detect_local_fabric()
    finally:
        path.write_text(saved)


def _write(measured: dict) -> None:
    path = calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Measured by `matrixstack calibrate` (matrixstack/tools/calibrate.py); read by fabric/local.py.\n"
    path.write_text(header + yaml.safe_dump(measured, sort_keys=False))
