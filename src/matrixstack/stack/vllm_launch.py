"""A vLLM deployment's launch on a slice: its model folder, command line and environment, from its `Launch`.

Used by every site that runs vLLM itself (the local site; the Ray site's vLLM actor), so both start it the same way:

- `vllm_model_folder(launch)`: the Hugging Face folder vLLM loads: the deployment's `weights` folder; else, for
  `weights: packaged`, the folder of the model registered under the arch's name (`matrixstack model add`,
  `arch.registry`); else, for an arch with packaged weights (tiny-moe), an HF folder exported once from them into
  `<data dir>/hf-export/ARCH-KEY` (`engine.hf_export`), KEY a digest of the packaged files and the arch, so a
  changed package exports again and an unchanged one is reused (a folder there is complete: it is written under
  a temporary name and renamed). `weights: random` is refused: vLLM has no random weights.
  `check_vllm_model(name, arch, weights)` makes the same checks without writing anything (`stack.validate`).
- `vllm_launcher(launch, port, host, log_path)`: a `lanes.vllm.VllmLauncher` with the parallel degrees of the
  launch's plan (`VllmLauncher.from_plan`: tp, pp, dp, expert parallelism; a launch made without a plan runs
  `workers` data-parallel ranks with expert parallelism over them when workers > 1), the deployment's name as
  the served model id, and `--max-num-seqs`, `--max-model-len`, `--dtype` from its engine_args.
- `vllm_command(launch, launcher)`: the argv to run. On a CPU slice (where the platform has
  `os.sched_setaffinity`) vLLM's Python first binds itself to the slice's cores (a tiny `-c` program), then
  `execv`s the server, so the server and every process it starts run on those cores only; elsewhere it is
  `launcher.command()`.
- `vllm_env(launch)`: the variables to set on top of the inherited environment: PYTHONUNBUFFERED; on a CUDA
  slice CUDA_VISIBLE_DEVICES = the slice's GPUs; on a CPU slice vLLM's own binding of its OpenMP threads,
  `VLLM_CPU_OMP_THREADS_BIND` = the slice's cores split into one group per rank (dp x pp x tp, the order vLLM
  reads them in), joined by '|', and `VLLM_CPU_KVCACHE_SPACE` = `kv_cache_gib(launch)`.
- `kv_cache_gib(launch)`: GiB of KV cache per rank: the KV the deployment's engine_args hold (num_kv_blocks x
  block_size tokens at the arch's KV bytes per token in its dtype) spread over its ranks, rounded up, at least
  `MIN_KV_CACHE_GIB` (1 GiB: tiny-moe's default engine_args need ~0.1 GiB; 1 GiB fits a 24 GiB, 2-core machine).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from pathlib import Path

from matrixstack.arch.loader import load_arch
from matrixstack.arch.registry import CONFIG_FILE, registered_model
from matrixstack.arch.spec import Arch
from matrixstack.dtypes import BYTES_PER_ELEMENT
from matrixstack.engine import PACKAGED_WEIGHTS
from matrixstack.errors import UserError
from matrixstack.lanes.vllm import VllmLauncher
from matrixstack.paths import data_dir
from matrixstack.perf.spec import InstancePlan
from matrixstack.stack.site import Launch
from matrixstack.stack.spec import WEIGHTS_PACKAGED, WEIGHTS_RANDOM

EXPORT_DIR = "hf-export"  # under the data dir: HF folders exported from packaged weights for vLLM
MIN_KV_CACHE_GIB = 1
GIB = 1024**3
ENGINE_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # engine_args.dtype -> arch dtype names
# run in vLLM's Python: bind to the cores in argv[1] (before anything starts a thread), then become the server
PIN_AND_EXEC = (
    "import os, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


def check_vllm_model(name: str, arch: str, weights: str) -> None:
    """Return None when a vllm deployment `name` of `arch` (a name or YAML path) with `weights` has a model vLLM can
    load (a folder given by path is looked for where it runs, not here); UserError naming the fix otherwise.
    Writes nothing."""
    if weights == WEIGHTS_RANDOM:
        raise UserError(
            f"deployment {name}: weights: random is for the builtin engine's smoke tests; vLLM loads a Hugging "
            "Face folder: give weights: FOLDER, register one (`matrixstack model add DIR --name N`, then arch: N), "
            "or use an arch with packaged weights (tiny-moe) and weights: packaged"
        )
    if weights != WEIGHTS_PACKAGED:
        return
    arch_name = load_arch(arch).name
    if registered_model(arch_name) is None and arch_name not in PACKAGED_WEIGHTS:
        raise UserError(
            f"deployment {name}: arch {arch_name} has no model folder for vLLM: no registered model of that name "
            "and no packaged weights; give weights: FOLDER (a Hugging Face folder: config.json, safetensors, "
            "tokenizer) or register one with `matrixstack model add DIR --name N` and use arch: N"
        )


def vllm_model_folder(launch: Launch) -> Path:
    """Return the Hugging Face folder vLLM serves `launch` from (see the module docstring), exporting packaged
    weights on first use; UserError when there is none or a given folder is not a Hugging Face folder."""
    check_vllm_model(launch.name, launch.arch, launch.weights)
    if launch.weights != WEIGHTS_PACKAGED:
        folder = Path(launch.weights).expanduser()
        if not (folder / CONFIG_FILE).is_file():
            raise UserError(
                f"deployment {launch.name}: weights: {folder} is not a Hugging Face folder (no {CONFIG_FILE}); "
                "vLLM loads config.json + safetensors + tokenizer: write one with `matrixstack model export ARCH "
                "--format hf --out DIR`, or fill it on a machine with internet (`huggingface-cli download REPO "
                "--local-dir DIR`)"
            )
        return folder
    arch = load_arch(launch.arch)
    model = registered_model(arch.name)
    return Path(model.folder) if model is not None else exported_folder(arch)


def exported_folder(arch: Arch) -> Path:
    """Return the HF folder exported from `arch`'s packaged weights in the data dir, exporting it when it is not
    there yet (keyed by a digest of the packaged files and the arch)."""
    from matrixstack.engine.hf_export import export_hf_folder

    weights_dir = PACKAGED_WEIGHTS[arch.name]
    digest = hashlib.sha256(arch.model_dump_json().encode())
    for path in sorted(weights_dir.iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    folder = data_dir() / EXPORT_DIR / f"{arch.name}-{digest.hexdigest()[:16]}"
    if folder.is_dir():
        return folder
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    export_hf_folder(arch, weights_dir, partial)
    try:
        partial.rename(folder)
    except OSError:  # another process finished the same export first
        shutil.rmtree(partial, ignore_errors=True)
        if not folder.is_dir():
            raise
    return folder


def instance_plan(launch: Launch) -> InstancePlan:
    """Return the instance `launch` runs: its plan, else `workers` data-parallel ranks (expert parallel over them)."""
    if launch.plan is not None:
        return launch.plan
    return InstancePlan(devices=launch.workers, ep=launch.workers, batch_per_device=1.0)


def ranks(launch: Launch) -> int:
    """Return vLLM's ranks of `launch` on this node: dp x pp x tp of its instance."""
    plan = instance_plan(launch)
    return plan.dp(launch.dies_per_device) * plan.pp * plan.tp


def vllm_launcher(launch: Launch, port: int, host: str, log_path: Path) -> VllmLauncher:
    """Return the VllmLauncher of `launch` serving on host:port with its output in `log_path` (see the module
    docstring); UserError when its model or plan cannot run on vLLM."""
    args = launch.engine_args
    flags = ["--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len)]
    flags += ["--dtype", args.dtype]
    return VllmLauncher.from_plan(
        vllm_model_folder(launch),
        instance_plan(launch),
        port=port,
        extra_args=flags,
        dies_per_device=launch.dies_per_device,
        host=host,
        served_model_name=launch.name,
        log_path=log_path,
    )


def vllm_command(launch: Launch, launcher: VllmLauncher) -> list[str]:
    """Return the argv that runs `launcher`'s server for `launch`: bound to the slice's cores first on a CPU slice
    (see the module docstring), else `launcher.command()` as is."""
    command = launcher.command()
    if launch.device_kind != "cpu" or not hasattr(os, "sched_setaffinity"):
        return command
    cores = ",".join(str(c) for c in sorted(launch.devices))
    return [command[0], "-c", PIN_AND_EXEC, cores, *command[1:]]


def vllm_env(launch: Launch) -> dict[str, str]:
    """Return the environment variables a vLLM launch sets on top of the inherited ones (see the module
    docstring); UserError when a CPU slice has fewer cores than vLLM has ranks."""
    env = {"PYTHONUNBUFFERED": "1"}
    if launch.device_kind == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in launch.devices)
    elif launch.device_kind == "cpu":
        env["VLLM_CPU_OMP_THREADS_BIND"] = thread_binding(sorted(launch.devices), ranks(launch), launch.name)
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib(launch))
    return env


def thread_binding(cores: list[int], rank_count: int, name: str = "") -> str:
    """Return `cores` split into `rank_count` contiguous groups (the first ones one core larger when they do not
    divide evenly), each as vLLM's id list ("0-3" or "0,2"), joined by '|'; UserError when there are fewer cores
    than ranks."""
    if len(cores) < rank_count:
        raise UserError(
            f"deployment {name}: vLLM runs {rank_count} ranks, one OpenMP group each, but its slice has "
            f"{len(cores)} CPU cores; ask for at least {rank_count} cores or plan fewer ranks"
        )
    size, extra = divmod(len(cores), rank_count)
    groups, start = [], 0
    for rank in range(rank_count):
        end = start + size + (1 if rank < extra else 0)
        groups.append(_id_list(cores[start:end]))
        start = end
    return "|".join(groups)


def _id_list(cores: list[int]) -> str:
    """Return sorted core ids as a Linux-style id list: runs as "a-b", others by commas ("0-3,6")."""
    parts: list[str] = []
    run_start = previous = cores[0]
    for core in [*cores[1:], None]:
        if core is not None and core == previous + 1:
            previous = core
            continue
        parts.append(str(run_start) if run_start == previous else f"{run_start}-{previous}")
        if core is not None:
            run_start = previous = core
    return ",".join(parts)


def kv_cache_gib(launch: Launch) -> int:
    """Return the KV cache space (GiB) of each vLLM rank of `launch` (see the module docstring)."""
    arch = load_arch(launch.arch)
    args = launch.engine_args
    per_token = (
        arch.layers * arch.attention.kv_elements_per_token_per_layer() * BYTES_PER_ELEMENT[ENGINE_DTYPES[args.dtype]]
    )
    total = args.num_kv_blocks * args.block_size * per_token
    return max(MIN_KV_CACHE_GIB, math.ceil(total / ranks(launch) / GIB))
