"""The training loop of a LoRA tune job: data-parallel over a slice's devices, checkpointed, resumable bit for bit.

`train(spec, examples, placement, folder, on_checkpoint)` trains `spec.total_steps` AdamW steps (constant learning
rate, gradients clipped to norm 1) of a LoRA adapter (adapt/lora.py) on the base model in float32, its frozen routed
experts run grouped (`lora.FrozenExperts`), a batch's sequences laid flat without their padding (`examples.packed`:
only attention sees the padded batch) and the logits computed for the learned positions only, and returns the
final `Checkpoint`. One process per device of the slice (`Placement`): with one device the calling process trains
(pinned to its CPU core or on its GPU for the duration); with N, N processes are spawned
(`torch.multiprocessing`, each dies with its parent: Linux's parent-death signal) and joined in a
`torch.distributed` group (gloo on CPU cores, NCCL on CUDA GPUs) on a loopback port.

Data order is a function of (seed, step) only: epoch e visits the examples in `torch.randperm(n)` drawn from a
generator seeded with (seed, e), in consecutive batches of `batch_size`; step s takes batch s of that sequence.
Rank r of N takes examples r, r + N, ... of the step's batch, computes the summed cross-entropy of its completion
tokens divided by the whole batch's completion tokens, and the gradients are summed over the ranks (one
all-reduce of one flat buffer): every rank holds the gradient of the batch's mean token loss, whatever N, and takes
the same optimizer step. Every CPU rank runs one intra-op thread, so the arithmetic is the same on every run.

A checkpoint (`folder/checkpoint.pt`, written by rank 0 every `checkpoint_every` steps and at the end, atomically:
a temporary file renamed over the old one) holds the step reached (the data position), the adapter's A and B,
the optimizer's state, torch's RNG state and the loss history. Training restarts from it when it exists, so a job
killed (SIGKILL) mid-run and resumed ends with the same weights as a run never interrupted: the same steps run on
the same data in the same order from the same state. Rank 0 shows a progress bar (steps, tokens/s, loss, ETA) on
stderr and calls `on_checkpoint(step, total_steps, loss)` after each checkpoint (the job row's progress).
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from matrixstack.adapt.examples import IGNORE, Example, packed
from matrixstack.adapt.lora import FrozenExperts, adapter_of, attach_lora, load_adapter, lora_parameters
from matrixstack.adapt.spec import TuneSpec
from matrixstack.engine.loading import load_model
from matrixstack.engine.lora_adapter import LoraAdapter
from matrixstack.errors import UserError

CHECKPOINT_FILE = "checkpoint.pt"
MAX_GRAD_NORM = 1.0
EPOCH_SEED_STRIDE = 1_000_003  # generator seed of epoch e: seed * stride + e
PR_SET_PDEATHSIG = 1  # prctl option: the signal this process gets when its parent dies

OnCheckpoint = Callable[[int, int, float], None]


@dataclass(frozen=True)
class Placement:
    """Where a job trains: `kind` "cpu" (CPU cores, by index) or "cuda" (GPUs, by index), and the device of each
    rank."""

    kind: str
    devices: tuple[int, ...]


@dataclass
class Checkpoint:
    """The state after `step` steps: the adapter, the optimizer and RNG states, and per-step history rows
    ({step, loss, tokens, step_s, cpu_s}: wall and this process's CPU seconds of the step)."""

    step: int
    adapter: LoraAdapter
    optimizer: dict[str, Any]
    rng: torch.Tensor
    history: list[dict[str, float]] = field(default_factory=list)

    def save(self, path: Path) -> None:
        """Write the checkpoint to `path` atomically (a temporary file renamed over it)."""
        partial = path.with_suffix(".partial")
        state = {
            "step": self.step,
            "adapter": {
                "name": self.adapter.name,
                "rank": self.adapter.rank,
                "alpha": self.adapter.alpha,
                "target_modules": self.adapter.target_modules,
                "weights": self.adapter.weights,
            },
            "optimizer": self.optimizer,
            "rng": self.rng,
            "history": self.history,
        }
        torch.save(state, partial)
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        """Return the checkpoint saved at `path`."""
        state = torch.load(path, weights_only=True)
        return cls(state["step"], LoraAdapter(**state["adapter"]), state["optimizer"], state["rng"], state["history"])


def batch_indices(rows: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Return the indices of the examples of step `step` (see the module docstring)."""
    per_epoch = math.ceil(rows / batch_size)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch))
    return order[k * batch_size : (k + 1) * batch_size].tolist()


def free_port() -> int:
    """Return a TCP port free on the loopback interface now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(
    spec: TuneSpec,
    examples: list[Example],
    placement: Placement,
    folder: Path,
    on_checkpoint: OnCheckpoint | None = None,
) -> Checkpoint:
    """Train the job's adapter (module docstring) and return the final checkpoint; it continues from
    `folder/checkpoint.pt` when one exists."""
    folder.mkdir(parents=True, exist_ok=True)
    world = len(placement.devices)
    if world == 1:
        _rank_main(0, spec, examples, placement, folder, None, on_checkpoint)
    else:
        try:
            mp.start_processes(
                _spawned_rank,
                args=(spec, examples, placement, folder, free_port(), on_checkpoint),
                nprocs=world,
                join=True,
                start_method="spawn",
            )
        except mp.ProcessRaisedException as exc:
            raise UserError(f"a training process failed: {str(exc).strip().splitlines()[-1]}") from None
    return Checkpoint.load(folder / CHECKPOINT_FILE)


def _spawned_rank(rank, spec, examples, placement, folder, port, on_checkpoint) -> None:
    """Entry of a spawned rank: die with the parent, then train (`_rank_main`)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the signal was armed
        os._exit(1)
    _rank_main(rank, spec, examples, placement, folder, port, on_checkpoint)


def _rank_main(rank, spec, examples, placement, folder, port, on_checkpoint) -> None:
    """Set up rank `rank` on its device (and its process group when `port` is given), train, tear down."""
    world = len(placement.devices)
    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    if placement.kind == "cuda":
        device = torch.device("cuda", placement.devices[rank])
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        os.sched_setaffinity(0, {placement.devices[rank]})
        torch.set_num_threads(1)
    try:
        if port is not None:
            dist.init_process_group(
                "nccl" if placement.kind == "cuda" else "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world,
                device_id=device if placement.kind == "cuda" else None,
            )
        Trainer(spec, examples, device, rank, world, folder, on_checkpoint).run()
    finally:
        if port is not None and dist.is_initialized():
            dist.destroy_process_group()
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)


class Trainer:
    """One rank's training state and loop, on `device` (set up by the caller: pinned core, process group): the
    model with its adapter, the optimizer, the step reached (from the checkpoint in `folder` when there is one);
    `run()` trains to the last step."""

    def __init__(self, spec, examples, device, rank, world, folder, on_checkpoint):
        self.spec, self.examples, self.device = spec, examples, device
        self.rank, self.world, self.folder, self.on_checkpoint = rank, world, folder, on_checkpoint
        self.model, _ = load_model(spec.base)
        self.model.to(device)
        self.wrappers = attach_lora(
            self.model, spec.targets, spec.rank, spec.alpha, torch.Generator().manual_seed(spec.seed)
        )
        self.model.expert_executor = FrozenExperts(self.model)
        self.params = lora_parameters(self.wrappers)
        self.optimizer = torch.optim.AdamW(self.params, lr=spec.lr, weight_decay=spec.weight_decay)
        self.total = spec.total_steps(len(examples))
        self.step, self.history = 0, []
        path = folder / CHECKPOINT_FILE
        if path.exists():
            self._restore(Checkpoint.load(path))
        else:
            torch.manual_seed(spec.seed)

    def _restore(self, checkpoint: Checkpoint) -> None:
        load_adapter(self.wrappers, checkpoint.adapter)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        torch.set_rng_state(checkpoint.rng)
        self.step, self.history = checkpoint.step, checkpoint.history

    def _checkpoint(self) -> Checkpoint:
        adapter = adapter_of(self.wrappers, self.spec.out, self.spec.rank, self.spec.alpha, self.spec.targets)
        return Checkpoint(self.step, adapter, self.optimizer.state_dict(), torch.get_rng_state(), self.history)

    def _one_step(self) -> tuple[float, int]:
        """Run one optimizer step; return (the batch's mean token loss, tokens processed by all ranks)."""
        chosen = [
            self.examples[i] for i in batch_indices(len(self.examples), self.spec.batch_size, self.spec.seed, self.step)
        ]
        counted = sum(e.completion_tokens for e in chosen)
        mine = chosen[self.rank :: self.world]
        loss_sum = torch.zeros((), device=self.device)
        if mine:
            ids, positions, labels, layout = packed(mine, self.device)
            hidden = self.model(ids, positions, layout, None)
            learned = labels != IGNORE
            logits = self.model.compute_logits(hidden[learned])
            loss_sum = F.cross_entropy(logits, labels[learned], reduction="sum")
            (loss_sum / counted).backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.world > 1:
            flat = torch.cat([g.flatten() for g in grads] + [loss_sum.detach().reshape(1)])
            dist.all_reduce(flat)
            loss_sum = flat[-1]
            offset = 0
            for p, g in zip(self.params, grads, strict=True):
                p.grad = flat[offset : offset + g.numel()].view_as(g)
                offset += g.numel()
        else:
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss_sum.detach()) / counted, sum(len(e.ids) for e in chosen)

    def run(self) -> None:
        """Train from the current step to the last, checkpointing on the way (module docstring)."""
        progress = _Progress(self.total, self.step) if self.rank == 0 else None
        try:
            while self.step < self.total:
                started, cpu_started = time.perf_counter(), time.process_time()
                loss, tokens = self._one_step()
                self.step += 1
                step_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
                entry = {"step": self.step, "loss": loss, "tokens": tokens, "step_s": step_s, "cpu_s": cpu_s}
                self.history.append(entry)
                if progress is not None:
                    progress.advance(tokens, step_s, loss)
                if self.rank == 0 and (self.step % self.spec.checkpoint_every == 0 or self.step == self.total):
                    self._checkpoint().save(self.folder / CHECKPOINT_FILE)
                    if self.on_checkpoint is not None:
                        self.on_checkpoint(self.step, self.total, loss)
        finally:
            if progress is not None:
                progress.close()


class _Progress:
    """A rich progress bar on stderr: steps done of the total, tokens/s, the last loss and the ETA."""

    def __init__(self, total: int, done: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.tokens, self.seconds = 0, 0.0
        self.bar = Progress(
            TextColumn("tune"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} tok/s  loss {task.fields[loss]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task = self.bar.add_task("tune", total=total, completed=done, rate="-", loss="-")
        self.bar.start()

    def advance(self, tokens: int, step_s: float, loss: float) -> None:
        """Count one step of `tokens` tokens that took `step_s` seconds and ended at `loss`."""
        self.tokens += tokens
        self.seconds += step_s
        self.bar.update(self.task, advance=1, rate=f"{self.tokens / self.seconds:,.0f}", loss=f"{loss:.4f}")

    def close(self) -> None:
        """Stop drawing the bar."""
        self.bar.stop()
