"""One tune job from its checked settings to its adapter folder, and where adapters and job files lie.

`check_spec(spec)` refuses, before anything is written, settings that cannot train: a base without weights or
without the targeted modules, a rank out of range, an adapter name that is taken (a folder `adapters/NAME` exists).
`run_job(database, db_url, job, slice, tenant)` then trains on the job's slice (`adapt.train`) with the rows of
the tenant's dataset (`load_split`: train, and heldout for evaluation), evaluates the held-out split before and after
(`adapt.evaluate`), writes the JSON log and the loss-curve PNG in the job's folder, writes the adapter in PEFT's
format (engine/lora_adapter.py's `write_peft`) to a temporary folder beside `adapters/NAME` and renames it into
place, and only then marks the job succeeded (freeing its slice). On any failure the job is marked failed and its
slice freed, and no adapter folder is left; a SIGKILL leaves the row running until `sweep_dead` finds its process
gone, and its checkpoint for `tune --resume`.

Paths, under the data directory: `adapters/NAME` (a PEFT folder: what the builtin engine loads by adapter name) and
`tune/JOB` (checkpoint.pt, log.json, loss.png).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import Session

from matrixstack.adapt.datasets import load_split
from matrixstack.adapt.evaluate import evaluate
from matrixstack.adapt.examples import to_examples
from matrixstack.adapt.jobs import JobInfo, fail_job, finish_job, record_progress
from matrixstack.adapt.lora import attach_lora, load_adapter
from matrixstack.adapt.spec import TuneSpec
from matrixstack.adapt.train import Placement, train
from matrixstack.adapt.trainlog import draw_loss, write_log
from matrixstack.engine.adapter_dir import ADAPTER_NAME, default_adapters_dir
from matrixstack.engine.loading import load_model
from matrixstack.engine.lora_adapter import write_peft
from matrixstack.errors import UserError
from matrixstack.matrix.database import Database
from matrixstack.matrix.pool_state import fabric_spec, pool_row
from matrixstack.matrix.slices import SliceInfo
from matrixstack.paths import data_dir

JOBS_DIR = "tune"
LOG_FILE, LOSS_PNG = "log.json", "loss.png"


def adapter_dir(name: str) -> Path:
    """Return the folder of adapter `name`: `adapters/NAME` in the data directory, where the builtin engine finds an
    adapter by name (`engine.adapter_dir.default_adapters_dir`)."""
    return default_adapters_dir() / name


def job_dir(job_id: int) -> Path:
    """Return the folder of a job's checkpoint, log and loss curve: `tune/JOB` in the data directory."""
    return data_dir() / JOBS_DIR / str(job_id)


def check_spec(spec: TuneSpec) -> None:
    """Raise UserError when `spec` cannot train (module docstring); reads the base's weights to check them."""
    if not ADAPTER_NAME.match(spec.out):
        raise UserError(
            f"--out {spec.out!r} is not an adapter name: use 1-128 letters, digits, '.', '_' or '-', not starting "
            "with '.' (the engine serves adapters by that name)"
        )
    if adapter_dir(spec.out).exists():
        raise UserError(f"--out {spec.out}: adapter folder {adapter_dir(spec.out)} exists; pick another name")
    model, _ = load_model(spec.base)
    attach_lora(model, spec.targets, spec.rank, spec.alpha, torch.Generator())


def placement_of(session: Session, info: SliceInfo) -> Placement:
    """Return where a job on the slice `info` trains: CPU cores or CUDA GPUs of this machine (the slice's devices
    modulo a node's); UserError for other devices or GPUs this process cannot see."""
    spec = fabric_spec(pool_row(session, info.pool, lock=False).fabrics[info.fabric_index])
    per_node = spec.device.devices_per_node
    local = tuple(d % per_node for d in info.devices)
    if spec.device.vendor.lower() == "nvidia":
        if not torch.cuda.is_available() or max(local) >= torch.cuda.device_count():
            raise UserError(f"slice {info.id} holds GPUs {list(local)}, which this process cannot use; run it there")
        return Placement("cuda", local)
    if spec.device.kind.lower().startswith("cpu"):
        return Placement("cpu", local)
    raise UserError(f"pool {info.pool} is of {spec.device.kind} devices; tune runs on CPU cores or NVIDIA GPUs")


def run_job(database: Database, db_url: str | None, job: JobInfo, info: SliceInfo, tenant: str | None) -> JobInfo:
    """Train, evaluate and write the adapter of a running job on its slice (module docstring); return the job as
    it ended. UserError (the job failed, its slice freed) when anything goes wrong."""
    spec = TuneSpec.model_validate(job.config)
    partial = adapter_dir(spec.out).with_name(f".{spec.out}.job{job.id}.partial")
    try:
        placement = database.read(lambda session: placement_of(session, info))
        result = _train_and_evaluate(database, db_url, job, spec, placement, tenant)
        shutil.rmtree(partial, ignore_errors=True)
        write_peft(result.pop("adapter"), partial, spec.base)
        partial.rename(adapter_dir(spec.out))
    except BaseException as exc:
        shutil.rmtree(partial, ignore_errors=True)
        error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        database.write(lambda session: fail_job(session, job.id, error))
        raise
    try:
        return database.write(lambda session: finish_job(session, job.id, result, adapter_dir(spec.out)))
    except BaseException:
        shutil.rmtree(adapter_dir(spec.out), ignore_errors=True)
        raise


def _train_and_evaluate(
    database: Database, db_url: str | None, job: JobInfo, spec: TuneSpec, placement: Placement, tenant: str | None
) -> dict[str, Any]:
    """Return the job's result (evaluation before/after, training figures, file paths) and, under "adapter", the
    trained `LoraAdapter`."""
    train_rows = database.read(lambda session: load_split(session, spec.dataset, tenant, "train"))
    heldout_rows = database.read(lambda session: load_split(session, spec.dataset, tenant, "heldout"))
    model, tokenizer = load_model(spec.base)
    examples = to_examples(tokenizer, train_rows, spec.max_len)
    heldout = to_examples(tokenizer, heldout_rows, spec.max_len)
    if not examples:
        raise UserError(f"dataset {spec.dataset} has no training rows; add rows or lower its held-out split")
    device = torch.device("cuda", placement.devices[0]) if placement.kind == "cuda" else torch.device("cpu")
    model.to(device)
    wrappers = attach_lora(model, spec.targets, spec.rank, spec.alpha, torch.Generator().manual_seed(spec.seed))
    before = evaluate(model, wrappers, tokenizer, heldout)
    folder = job_dir(job.id)
    hook = _ProgressHook(db_url, job.id)
    started = time.perf_counter()
    final = train(spec, examples, placement, folder, hook)
    wall_s = time.perf_counter() - started
    load_adapter(wrappers, final.adapter)
    after = evaluate(model, wrappers, tokenizer, heldout)
    tokens = sum(h["tokens"] for h in final.history)
    step_s = sum(h["step_s"] for h in final.history)
    summary = {
        "job": job.id,
        "steps": final.step,
        "train_rows": len(examples),
        "devices": list(placement.devices),
        "device_kind": placement.kind,
        "tokens": tokens,
        "tokens_per_s": round(tokens / step_s, 1) if step_s else None,
        "final_loss": round(final.history[-1]["loss"], 6) if final.history else None,
        "wall_s_this_run": round(wall_s, 2),
    }
    write_log(folder / LOG_FILE, final.history, summary)
    draw_loss(
        folder / LOSS_PNG, final.history, f"tune job {job.id}: {spec.base} + LoRA r={spec.rank} on {spec.dataset}"
    )
    return {
        "before": before,
        "after": after,
        "train": summary,
        "log": str(folder / LOG_FILE),
        "loss_png": str(folder / LOSS_PNG),
        "adapter": final.adapter,
    }


class _ProgressHook:
    """Writes a job's progress to its row after each checkpoint (picklable: it crosses into spawned ranks)."""

    def __init__(self, db_url: str | None, job_id: int):
        self.db_url, self.job_id = db_url, job_id

    def __call__(self, step: int, steps: int, loss: float) -> None:
        record_progress(self.db_url, self.job_id, step, steps, loss)
