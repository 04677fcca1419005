"""The `local` fabric: this machine, detected at load time.

CPU cores are the devices unless CUDA GPUs are present, in which case the GPUs are. Figures that cannot be
read from the machine (peak FLOPS per core, memory bandwidth, interconnect) are documented estimates; the
engine's `matrixstack calibrate` (a later layer) measures them.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from matrixstack.fabric.spec import FabricSpec
from matrixstack.paths import data_dir

# FP32 FLOPs per cycle per core: two FMA pipes x vector lanes x 2 (multiply + add). Intel/AMD optimisation
# manuals; a core without AVX is taken as 2 x 128-bit SSE.
_FP32_FLOPS_PER_CYCLE = {"avx512f": 64, "avx2": 32, "sse": 8}
# Estimates until `matrixstack calibrate` measures this machine: DRAM bandwidth a single core can draw
# (a typical server core sustains 10-20 GB/s of STREAM triad) and loopback gloo between processes.
_CORE_MEMORY_GBS = 12.0
_SHM_GBS_PER_DEVICE = 5.0
_SHM_LATENCY_US = 20.0
_CPU_FREQ_GHZ_DEFAULT = 2.5
# Achievable fractions until `matrixstack calibrate` measures them: PyTorch CPU GEMMs reach roughly half of
# the vector peak, small attention kernels less, a single stream a little over half of DRAM bandwidth.
_CPU_EFFICIENCY = {"gemm": 0.5, "attention": 0.3, "hbm": 0.6, "matmul_kernel_us": 10.0, "vector_kernel_us": 5.0}
_GPU_EFFICIENCY = {  # the H800 figures of dgx-h800.yaml
    "gemm": 0.8,
    "attention": 0.667,
    "hbm": 0.896,
    "matmul_kernel_us": 3.0,
    "vector_kernel_us": 1.5,
}

# Known GPUs (name substring -> dense bf16 TFLOPS, fp8 TFLOPS, HBM GB/s), published_results.md §5.
_KNOWN_GPUS = {
    "H200": (989.0, 1979.0, 4800.0),
    "H100": (989.0, 1979.0, 3350.0),
    "H800": (989.0, 1979.0, 3350.0),
    "B200": (2250.0, 4500.0, 8000.0),
}


def _cpu_flags_and_freq() -> tuple[str, float, str]:
    """Return (widest vector ISA, clock in GHz, model name) read from /proc/cpuinfo."""
    flags, mhz, model = "", 0.0, "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "flags" and not flags:
                flags = value
            elif key == "cpu MHz" and not mhz:
                mhz = float(value)
            elif key == "model name" and model == "CPU":
                model = value.strip()
    except OSError:
        pass
    isa = next((name for name in ("avx512f", "avx2") if f" {name}" in f" {flags} "), "sse")
    return isa, (mhz / 1000.0) or _CPU_FREQ_GHZ_DEFAULT, model


def _dram_gib() -> float:
    """Return this machine's total memory in GiB (from /proc/meminfo; 8 GiB when unreadable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 8.0


def _cuda_devices() -> list[tuple[str, float]]:
    """Return (name, memory GiB) per CUDA GPU; torch is imported only when an NVIDIA driver is present."""
    if not Path("/proc/driver/nvidia/gpus").exists() and not Path("/dev/nvidia0").exists():
        return []
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [
        (torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory / 2**30)
        for i in range(torch.cuda.device_count())
    ]


def _plane(bandwidth_gbs: float, latency_us: float, protocol: str, efficiency: float = 0.8) -> dict[str, object]:
    return {
        "name": "local-bus",
        "kind": "scale_up",
        "protocol": protocol,
        "attached": "device",
        "bandwidth_gbs": bandwidth_gbs,
        "efficiency": efficiency,
        "tiers": [{"name": "host", "nodes_per_domain": 1, "switches_per_domain": 1, "latency_us": latency_us}],
    }


CALIBRATION_FILE = "local-calibration.yaml"


def calibration_path() -> Path:
    """Return where `matrixstack calibrate` writes this machine's measured figures."""
    return data_dir() / CALIBRATION_FILE


def _calibration() -> dict:
    """Return the measured figures of this machine, or {} before `matrixstack calibrate` has run."""
    path = calibration_path()
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return data if isinstance(data, dict) else {}


def detect_local_fabric() -> FabricSpec:
    """Return a one-node FabricSpec describing this machine (GPUs as devices when CUDA GPUs exist)."""
    cores = os.cpu_count() or 1
    isa, ghz, cpu_model = _cpu_flags_and_freq()
    host = {"cpu_kind": cpu_model, "cpus_per_node": 1, "cores_per_cpu": cores, "dram_gib": round(_dram_gib(), 1)}
    gpus = _cuda_devices()
    if gpus:
        name, mem_gib = gpus[0]
        bf16, fp8, hbm_gbs = next((v for k, v in _KNOWN_GPUS.items() if k in name), (100.0, 200.0, 1000.0))
        device = {
            "kind": name,
            "vendor": "NVIDIA",
            "devices_per_node": len(gpus),
            "peak_tflops": {"bf16": bf16, "fp16": bf16, "fp8": fp8},
            "hbm_gib": round(mem_gib, 1),
            "hbm_gbs": hbm_gbs,
            "efficiency": _GPU_EFFICIENCY,
        }
        plane = _plane(bandwidth_gbs=450.0 if len(gpus) > 1 else 25.0, latency_us=10.0, protocol="NVLink/PCIe")
        description = f"this machine: {len(gpus)} x {name}"
    else:
        fp32_tflops = _FP32_FLOPS_PER_CYCLE[isa] * ghz * 1e9 / 1e12
        device = {
            "kind": f"CPU core ({isa})",
            "vendor": "local",
            "devices_per_node": cores,
            "peak_tflops": {"fp32": round(fp32_tflops, 4), "bf16": round(fp32_tflops, 4)},
            "hbm_gib": round(_dram_gib() / cores, 2),
            "hbm_gbs": _CORE_MEMORY_GBS,
            "efficiency": _CPU_EFFICIENCY,
        }
        plane = _plane(bandwidth_gbs=_SHM_GBS_PER_DEVICE, latency_us=_SHM_LATENCY_US, protocol="shared memory")
        description = f"this machine: {cores} CPU cores of {cpu_model}"
        measured = _calibration()
        if measured:  # figures measured by `matrixstack calibrate` replace the estimates
            device["hbm_gbs"] = measured["hbm_gbs"]
            device["efficiency"] = {**_CPU_EFFICIENCY, **measured["efficiency"]}
            plane = _plane(measured["plane_gbs"], measured["plane_latency_us"], "shared memory (gloo), measured", 1.0)
            description += f", calibrated {measured.get('measured_at', '')}".rstrip()
    return FabricSpec.model_validate(
        {
            "name": "local",
            "description": description,
            "node_count": 1,
            "device": device,
            "host": host,
            "planes": [plane],
            "collective_library": {
                "name": "gloo (torch.distributed)",
                "launch_us": plane["tiers"][0]["latency_us"],
                "all_to_all_launch_us": plane["tiers"][0]["latency_us"],
                "per_peer_us": 1.0,
            },
        }
    )
