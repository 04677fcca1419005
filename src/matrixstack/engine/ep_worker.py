"""The inside of an expert-parallel deployment: expert placement, the all-to-all executor and the worker process.

`engine.ep` (the driver side) starts one process per worker running `worker_main`. This module holds what both
sides share: `ExpertPlacement` (which worker holds which routed expert), `WorkerBatch` (one worker's slice of a
step, sent over the pipe) and `WorkerSpec` (what a worker needs to start), plus the worker itself.

Dispatch and combine (`AllToAllExperts`, one call per MoE layer on every worker, in lockstep):

1. each (token, slot) pair of this worker's batch picks a destination: the worker holding expert
   `topk_ids[t, slot]`; when the expert has several copies (redundant experts), copy `(t + rank) % copies`, so the
   tokens of one worker are spread round-robin over the copies, deterministically;
2. the pairs are sorted by destination, the per-destination counts are exchanged (`all_to_all_single` of an int64
   [world] tensor), then the hidden rows [n, H] and a float32 [n, 2] tensor of (expert id, routing weight) go out
   with `all_to_all_single` and uneven split sizes;
3. each worker runs the received rows through its own experts (sorted by expert, two grouped GEMMs for all of
   them, as `ExpertList.rows` does; one module call per expert where grouping does not apply) and multiplies
   them by their routing weights;
4. a combine `all_to_all_single` (the splits reversed) returns the weighted rows to their source, which sums them
   per token with `index_add_`.

A worker with no tokens still makes all four calls with zero-size tensors, so nobody waits forever. gloo
supports `all_to_all_single` with uneven and zero splits on CPU in torch 2.13 (checked), as NCCL does on CUDA.
"""

from __future__ import annotations

import os
import threading
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch
import torch.distributed as dist

from matrixstack.arch.spec import Arch
from matrixstack.engine.attention import AttentionMetadata
from matrixstack.engine.config import EngineConfig, SamplingParams
from matrixstack.engine.moe import ExpertList, MoEBlock
from matrixstack.errors import UserError

STEP, LOGITS, CLOSE = "step", "logits", "close"  # driver -> worker message kinds
READY, OK, ERROR = "ready", "ok", "error"  # worker -> driver message kinds


@dataclass(frozen=True)
class ExpertPlacement:
    """Where the routed experts live: `replicas[e]` lists the workers holding a copy of expert e, primary first."""

    workers: int
    replicas: tuple[tuple[int, ...], ...]

    @classmethod
    def build(
        cls,
        num_experts: int,
        workers: int,
        placement: list[int] | tuple[int, ...] | None = None,
        redundant: dict[int, list[int] | tuple[int, ...]] | None = None,
    ) -> ExpertPlacement:
        """Return a placement: expert e on worker `placement[e]` (default e % workers), plus the extra copies
        `redundant[e]` (worker ranks). Raises UserError naming the bad entry."""
        if placement is None:
            primary = [e % workers for e in range(num_experts)]
        else:
            primary = list(placement)
            if len(primary) != num_experts:
                raise UserError(
                    f"placement has {len(primary)} entries but the arch has {num_experts} routed experts; "
                    "give one worker rank per expert"
                )
        for e, rank in enumerate(primary):
            if not 0 <= rank < workers:
                raise UserError(f"placement[{e}]={rank} is not a worker; ranks are 0..{workers - 1}")
        replicas = [[rank] for rank in primary]
        for e, extra in (redundant or {}).items():
            if not 0 <= e < num_experts:
                raise UserError(f"redundant names expert {e}; the arch's experts are 0..{num_experts - 1}")
            for rank in extra:
                if not 0 <= rank < workers:
                    raise UserError(f"redundant[{e}] names worker {rank}; ranks are 0..{workers - 1}")
                if rank in replicas[e]:
                    raise UserError(f"redundant[{e}] lists worker {rank}, which already holds expert {e}")
                replicas[e].append(rank)
        return cls(workers, tuple(tuple(r) for r in replicas))

    def held_by(self, rank: int) -> set[int]:
        """Return the routed experts worker `rank` holds (primary or redundant copies)."""
        return {e for e, ranks in enumerate(self.replicas) if rank in ranks}

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (replica ranks int64 [experts, max copies], padded with -1; copies per expert int64 [experts])."""
        width = max((len(r) for r in self.replicas), default=1)
        table = [list(r) + [-1] * (width - len(r)) for r in self.replicas] or [[-1]]
        counts = [len(r) for r in self.replicas] or [1]
        return torch.tensor(table, dtype=torch.int64, device=device), torch.tensor(counts, device=device)


@dataclass
class WorkerBatch:
    """One worker's slice of a step: its sequences' tokens, laid out as `SchedulerOutput` does for the whole
    batch (offsets rebased to this slice), the rows to sample and their sampling settings."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    cu_seqlens_q: list[int] = field(default_factory=lambda: [0])
    context_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    logits_indices: list[int] = field(default_factory=list)
    sample_request_ids: list[str] = field(default_factory=list)
    sample_params: list[SamplingParams] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)  # drop their seeded generators


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to start, sent once when it is spawned."""

    arch: Arch
    weights_dir: str
    dtype: torch.dtype
    config: EngineConfig
    placement: ExpertPlacement
    backend: str
    init_method: str
    threads: int
    collective_timeout_s: float


class AllToAllExperts:
    """An `ExpertExecutor` that sends each token to the workers holding its experts and sums what comes back
    (algorithm in the module docstring). `experts_by_layer[layer]` holds this worker's experts of a layer."""

    def __init__(
        self,
        experts_by_layer: dict[int, torch.nn.ModuleList],
        placement: ExpertPlacement,
        rank: int,
        device: torch.device,
    ):
        self.experts_by_layer = experts_by_layer
        self.rank, self.world = rank, placement.workers
        self.replica_table, self.replica_counts = placement.tables(device)

    def _all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        recv = send.new_empty(sum(recv_splits), *send.shape[1:])
        dist.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits)
        return recv

    def __call__(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """Return sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden[t]), [T, H], computed where the
        experts live."""
        num_tokens, k = topk_ids.shape
        expert_ids = topk_ids.reshape(-1)
        tokens = torch.arange(num_tokens, device=hidden.device).repeat_interleave(k)
        copy = (tokens + self.rank) % self.replica_counts[expert_ids]
        dest = self.replica_table[expert_ids, copy]
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=self.world)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        tokens = tokens[order]
        meta = torch.stack((expert_ids[order].float(), topk_weights.reshape(-1)[order].float()), dim=1)
        recv_hidden = self._all_to_all(hidden[tokens], send_splits, recv_splits)
        recv_meta = self._all_to_all(meta, send_splits, recv_splits)
        computed = self._compute(layer, recv_hidden, recv_meta[:, 0].long(), recv_meta[:, 1])
        returned = self._all_to_all(computed, recv_splits, send_splits)
        return torch.zeros_like(hidden).index_add_(0, tokens, returned)

    def _compute(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor):
        """Return each received row through its expert, times its routing weight, [n, H]."""
        experts = self.experts_by_layer[layer]
        if isinstance(experts, ExpertList) and experts.can_group(hidden):  # grouped GEMMs, a constant op count
            return experts.rows(hidden, expert_ids, weights)
        out = torch.empty_like(hidden)
        for expert in expert_ids.unique().tolist():
            rows = (expert_ids == expert).nonzero(as_tuple=True)[0]
            out[rows] = experts[expert](hidden[rows]) * weights[rows].to(hidden.dtype)[:, None]
        return out


class Worker:
    """One worker's model (its experts only), KV cache and seeded generators; runs its slice of each step."""

    def __init__(self, rank: int, spec: WorkerSpec):
        from matrixstack.engine.model import MoETransformer
        from matrixstack.engine.weights import load_weights

        self.rank = rank
        nccl = spec.backend == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        held = spec.placement.held_by(rank)
        model = MoETransformer(spec.arch, dtype=spec.dtype, expert_ids=held)
        load_weights(model, Path(spec.weights_dir))
        self.model = model.to(self.device).eval()
        self.moe_layers = {i: layer.mlp for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoEBlock)}
        experts = {i: block.experts for i, block in self.moe_layers.items()}
        self.model.expert_executor = AllToAllExperts(experts, spec.placement, rank, self.device)
        self.config = spec.config
        self.kv_cache = self.model.allocate_kv_cache(spec.config.num_kv_blocks, spec.config.block_size)
        self.generators: dict[str, torch.Generator | None] = {}
        self.held = sorted(held)

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _idle(self) -> None:
        """Take part in every MoE layer's collectives with no tokens (this worker has no sequence this step)."""
        hidden_size = self.model.arch.hidden_size
        dtype = self.model.embed_tokens.weight.dtype
        for layer, block in sorted(self.moe_layers.items()):
            k = block.gate.moe.experts_per_token
            self.model.expert_executor(
                layer,
                torch.empty(0, hidden_size, dtype=dtype, device=self.device),
                torch.empty(0, k, dtype=torch.int64, device=self.device),
                torch.empty(0, k, dtype=torch.float32, device=self.device),
            )

    @torch.inference_mode()
    def step(self, batch: WorkerBatch, want_logits: bool) -> list:
        """Run this worker's slice; return its sampled tokens (or float32 logits rows as lists when asked)."""
        from matrixstack.engine.sampler import make_generator, sample

        for request_id in batch.finished_request_ids:
            self.generators.pop(request_id, None)
        if not batch.input_ids:
            self._idle()
            return []
        meta = AttentionMetadata(
            cu_seqlens_q=self._tensor(batch.cu_seqlens_q, torch.int32),
            context_lens=self._tensor(batch.context_lens, torch.int32),
            block_tables=self._tensor(batch.block_tables, torch.int32),
            slot_mapping=self._tensor(batch.slot_mapping, torch.int64),
            block_size=self.config.block_size,
        )
        ids = self._tensor(batch.input_ids, torch.int64)
        hidden = self.model(ids, self._tensor(batch.positions, torch.int64), meta, self.kv_cache)
        if not batch.logits_indices:
            return []
        logits = self.model.compute_logits(hidden[self._tensor(batch.logits_indices, torch.int64)])
        if want_logits:
            return logits.cpu().tolist()
        generators = []
        for request_id, params in zip(batch.sample_request_ids, batch.sample_params, strict=True):
            if request_id not in self.generators:
                self.generators[request_id] = make_generator(params.seed, self.device)
            generators.append(self.generators[request_id])
        return sample(logits, batch.sample_params, generators).tolist()


def _exit_with_driver(lifeline: Connection) -> None:
    """Exit this process as soon as the driver is gone (its end of `lifeline` closes), even while this worker is
    stuck in a collective."""

    def watch() -> None:
        wait([lifeline])
        os._exit(0)

    threading.Thread(target=watch, name="ep-lifeline", daemon=True).start()


def worker_main(rank: int, spec: WorkerSpec, conn: Connection, lifeline: Connection) -> None:
    """A worker process: join the group, load its experts, then run steps from `conn` until told to close.

    Replies on `conn`: ("ready", {"pid", "experts"}) once loaded; ("ok", result) per step; ("error", (summary,
    traceback)) on any failure, after which it exits (the collective group cannot go on without it). It exits at
    once when the pipe or the `lifeline` (a pipe the driver never writes to) closes: the driver died or let go.
    """
    _exit_with_driver(lifeline)
    torch.set_num_threads(spec.threads)
    try:
        if spec.backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())  # GPU r locally; the only one a remote rank sees
        dist.init_process_group(
            spec.backend,
            init_method=spec.init_method,
            rank=rank,
            world_size=spec.placement.workers,
            timeout=timedelta(seconds=spec.collective_timeout_s),
        )
        worker = Worker(rank, spec)
        conn.send((READY, {"pid": os.getpid(), "experts": worker.held}))
        while True:
            message = conn.recv()
            if message[0] == CLOSE:
                break
            conn.send((OK, worker.step(message[1], want_logits=message[0] == LOGITS)))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the driver is gone: nothing to report to
    except BaseException as exc:  # report anything else, then leave: the group is broken either way
        try:
            conn.send((ERROR, (f"{type(exc).__name__}: {exc}", traceback.format_exc())))
        except OSError:
            pass
        os._exit(1)
    os._exit(0)  # skip interpreter teardown (slow with torch loaded) and the process-group shutdown
