"""Expert-parallel deployment: N worker processes, attention data-parallel, the routed experts spread over them.

`ExpertParallelRunner(arch, weights_dir, config, workers, placement, redundant, backend, launcher)` has the model
runner's interface, `run(SchedulerOutput) -> list[int]`, so `LLMEngine` drives it unchanged; `run_logits` returns
the sampled rows' logits instead (a debug and test hook), `restart()` brings up a fresh set of workers, `close()`
(or leaving a `with` block) stops them.

Layout. Worker `r` is a process in a torch.distributed group (gloo on CPU; NCCL on CUDA with GPU `r` per worker,
or the one GPU a remote worker sees) that joins over TCP on a free port of the launcher's host (loopback for local
processes). It holds the whole model except the routed experts, of which it loads only its own (`ExpertPlacement`:
expert e on worker e % N by default, one expert per worker when N equals the expert count; `redundant={e: [ranks]}`
adds copies of hot experts, and each source worker spreads its tokens for such an expert round-robin over the
copies). Attention, dense FFNs, shared experts and the LM head are
data-parallel: each sequence belongs to one worker for its life (assigned when first seen, to the worker with the
fewest live sequences) and its KV cache lives there. In each MoE layer the tokens travel to their experts and
back with all-to-all (`engine.ep_worker.AllToAllExperts`).

Where the workers run is the launcher's business (`engine.ep_launch`): by default local child processes over
pipes; with a `TcpLauncher`, wherever its callable starts them (the ray site: one Ray actor per rank), connected
back over TCP with the same protocol. Local workers start fresh, never forked from the driver (no inherited CUDA
context, threads or locks): `start_method="forkserver"` (default) forks them from a clean server process that
imported torch and the worker module once, so a start or restart costs a fork instead of an interpreter and a torch
import per worker (under a second instead of 5-10 s for 4 workers on 2 cores); `"spawn"` starts each from scratch.

KV memory trade-off: every worker allocates a cache of the full `config.num_kv_blocks`, and the scheduler's global
block ids index it directly; a worker only ever touches the blocks of its own sequences. This keeps one scheduler
and one block manager unchanged and exact, at the price of N x the KV memory the scheduler believes it has
(on a real deployment size `num_kv_blocks` for one worker's memory; per-worker block pools are the refinement).

Protocol (one duplex connection per worker, a pipe or TCP, pickled tuples):

- driver -> worker: ("step", WorkerBatch) or ("logits", WorkerBatch) every step, to every worker, even one with
  no sequences this step (it still joins each MoE layer's collectives with zero-size tensors), so all workers
  run in lockstep; ("close",) to stop. A `WorkerBatch` is the worker's slice of the `SchedulerOutput`: input ids,
  positions, cu_seqlens_q, context lens, block tables, slot mapping, logits indices (rebased to the slice), the
  sampled requests' ids and `SamplingParams`, and the ids of requests that finished since the last step.
- worker -> driver: ("ready", {"pid", "experts"}) once its weights are loaded; ("ok", tokens | logits rows) per
  step; ("error", (summary, traceback)) when anything fails, after which the worker exits.

Sampling happens on the owning worker, which keeps each seeded request's `torch.Generator` until the request
finishes; the driver merges the tokens back in `sample_seqs` order. Each worker also holds a second connection, the
lifeline, that the driver never writes to: a watcher thread exits the worker when it closes (the driver died or
let go), even while the worker is blocked in a collective.

Failures never hang the driver: it waits on the connections and on the processes' sentinels (a remote worker's
lifeline, at end of file once it is gone) with a deadline (`step_timeout_s`), so a worker that is killed, crashes
or stops answering makes `run` raise `WorkerError` ("worker 1 (pid N) died: killed by signal SIGKILL; ...", or
"...: its connection closed" for a remote one) within moments, listing the in-flight request ids in
`WorkerError.request_ids`. The collective group cannot survive a dead member, so the runner kills the other
workers too and the next `run` restarts them all (`restarts` counts it); the caller must fail the sequences that
were running (their KV caches are gone); a sequence that comes back expecting a cached prefix raises
`WorkerError` instead of producing garbage. Workers exit when their connection closes or the driver process dies.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import weakref
from collections.abc import Iterable
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch

from matrixstack.arch import Arch, load_arch
from matrixstack.engine import weights_or_packaged
from matrixstack.engine.config import EngineConfig
from matrixstack.engine.ep_launch import LocalRank, ProcessLauncher, RemoteRank, TcpLauncher
from matrixstack.engine.ep_worker import (
    CLOSE,
    ERROR,
    LOGITS,
    READY,
    STEP,
    ExpertPlacement,
    WorkerBatch,
    WorkerSpec,
)
from matrixstack.engine.scheduler import SchedulerOutput
from matrixstack.engine.sequence import Sequence
from matrixstack.errors import UserError

log = logging.getLogger(__name__)

DEATH_GRACE_S = 2.0  # after a worker reports an error, how long to wait for the peer whose death caused it
CLOSE_JOIN_S = 5.0  # how long close() waits for a worker to exit before killing it


class WorkerError(RuntimeError):
    """A worker of an expert-parallel deployment died, failed or stopped answering; its step's requests failed.

    `request_ids` lists the requests that were in flight on the deployment (their KV caches are lost);
    `details` holds a worker's traceback when it reported one; `cause` is what happened without the request ids,
    what each failed request is told.
    """

    def __init__(self, message: str, request_ids: Iterable[str] = (), details: str = "", cause: str = ""):
        super().__init__(message)
        self.request_ids = list(request_ids)
        self.details = details
        self.cause = cause or message


def _free_port(host: str) -> int:
    """Return a TCP port on `host` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _kill(ranks: list[LocalRank | RemoteRank]) -> None:
    """Kill the ranks still alive and wait for them to end (also the finaliser of a runner never closed)."""
    for rank in ranks:
        if rank.is_alive():
            rank.kill()
    for rank in ranks:
        rank.join(CLOSE_JOIN_S)


def _resolve_weights(arch: Arch, weights_dir: str | Path | None) -> Path:
    """Return the folder or file of the arch's safetensors; UserError when there is none."""
    path = weights_or_packaged(arch.name, weights_dir, "pass weights_dir, the folder of its safetensors")
    if not (path.is_file() or any(path.glob("*.safetensors"))):
        raise UserError(f"no safetensors weights at {path}; give weights_dir, a .safetensors file or a folder of them")
    return path


def _resolve_backend(backend: str | None, workers: int, local: bool) -> str:
    """Return "gloo" or "nccl": NCCL when asked or, by default, when there is one CUDA device here per worker.
    Remote workers (`local` False) default to gloo and are trusted to see a GPU each when NCCL is asked for."""
    gpus = torch.cuda.device_count() if local and torch.cuda.is_available() else 0
    if backend is None:
        return "nccl" if local and gpus >= workers else "gloo"
    if backend not in ("gloo", "nccl"):
        raise UserError(f"backend={backend!r} is not supported; use 'gloo' (CPU) or 'nccl' (one GPU per worker)")
    if backend == "nccl" and local and gpus < workers:
        raise UserError(
            f"backend='nccl' needs one CUDA device per worker: {workers} workers, {gpus} devices visible; "
            "use backend='gloo' or fewer workers"
        )
    return backend


class ExpertParallelRunner:
    """An expert-parallel deployment of one model over `workers` processes (see the module docstring).

    `placement[e]` is the worker of expert e (default e % workers); `redundant[e]` lists workers holding extra
    copies of expert e. `backend` defaults to NCCL when there is one CUDA device per worker, else gloo.
    `threads_per_worker` (torch intra-op threads) defaults to the CPU cores divided among the workers.
    `step_timeout_s` bounds a step (and each collective); `start_timeout_s` bounds loading the workers.
    `launcher` starts the workers (`engine.ep_launch`); by default local processes with `start_method`.
    """

    def __init__(
        self,
        arch_name_or_path: str | Path | Arch = "tiny-moe",
        weights_dir: str | Path | None = None,
        config: EngineConfig | None = None,
        workers: int = 2,
        placement: list[int] | None = None,
        redundant: dict[int, list[int]] | None = None,
        backend: str | None = None,
        dtype: torch.dtype = torch.float32,
        threads_per_worker: int | None = None,
        step_timeout_s: float = 120.0,
        start_timeout_s: float = 300.0,
        start_method: str = "forkserver",
        launcher: ProcessLauncher | TcpLauncher | None = None,
    ):
        if workers < 1:
            raise UserError(f"workers={workers}: an expert-parallel deployment needs at least 1 worker")
        arch = arch_name_or_path if isinstance(arch_name_or_path, Arch) else load_arch(str(arch_name_or_path))
        moe = arch.ffn.moe
        if moe is None and (placement or redundant):
            raise UserError(f"arch {arch.name} has no routed experts; drop placement and redundant")
        self.arch = arch
        self.config = config or EngineConfig()
        self.workers = workers
        self.placement = ExpertPlacement.build(moe.routed_experts if moe else 0, workers, placement, redundant)
        self.launcher = launcher or ProcessLauncher(start_method)
        self.backend = _resolve_backend(backend, workers, self.launcher.local)
        self.weights_dir = _resolve_weights(arch, weights_dir)
        self.dtype = dtype
        self.threads_per_worker = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
        self.step_timeout_s = step_timeout_s
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self._ranks: list[LocalRank | RemoteRank] = []
        self._conns: list[Connection] = []
        self._lifelines: list[Connection] = []  # never written: a worker exits when its end sees EOF
        self._pids: list[int] = []
        self._owners: dict[str, tuple[Sequence, int]] = {}  # request id -> (sequence, owning worker)
        self._finished: dict[int, list[str]] = {}  # worker -> requests to forget at its next step
        self._broken = False
        self._closed = False
        self._finalizer = weakref.finalize(self, _kill, self._ranks)
        self._start()

    # -- lifecycle ---------------------------------------------------------------------------------------------

    @property
    def worker_pids(self) -> list[int]:
        """Return the process ids of the current workers, by rank."""
        return list(self._pids)

    def __enter__(self) -> ExpertParallelRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        """Launch the workers and wait until each has joined the group and loaded its weights."""
        spec = WorkerSpec(
            arch=self.arch,
            weights_dir=str(self.weights_dir),
            dtype=self.dtype,
            config=self.config,
            placement=self.placement,
            backend=self.backend,
            init_method=f"tcp://{self.launcher.host}:{_free_port(self.launcher.host)}",
            threads=self.threads_per_worker,
            collective_timeout_s=self.step_timeout_s,
        )
        try:
            ranks = self.launcher.launch(spec, self.workers, self.start_timeout_s)
        except OSError as exc:  # a TimeoutError too: a remote worker that never connected back
            self._broken = True
            raise WorkerError(f"the expert-parallel deployment could not start: {exc}") from exc
        self._ranks.extend(ranks)  # in place: the finaliser holds this list
        self._conns.extend(r.conn for r in ranks)
        self._lifelines.extend(r.lifeline for r in ranks)
        self._pids = [r.pid for r in ranks]
        ready = self._collect(self.start_timeout_s, "while starting", starting=True)
        self._pids = [info["pid"] for info in ready]
        log.info("expert-parallel deployment up: %s", {r: info["experts"] for r, info in enumerate(ready)})

    def _stop(self) -> None:
        """Kill the workers and forget them and their sequences."""
        _kill(self._ranks)
        for conn in [*self._conns, *self._lifelines]:
            conn.close()
        self._ranks.clear()  # in place: the finaliser holds this list
        self._conns.clear()
        self._lifelines.clear()
        self._owners.clear()
        self._finished.clear()

    def restart(self) -> None:
        """Replace every worker with a fresh one (the collective group cannot outlive a member)."""
        if self._closed:
            raise RuntimeError("the expert-parallel deployment is closed; make a new one")
        self._stop()
        self._broken = False
        self.restarts += 1
        self._start()

    def close(self) -> None:
        """Ask every worker to exit, kill the ones that do not, and reap them all; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for conn in self._conns:
            try:
                conn.send((CLOSE,))
            except OSError:
                pass
        deadline = time.monotonic() + CLOSE_JOIN_S
        for rank in self._ranks:
            rank.join(max(0.0, deadline - time.monotonic()))
        self._stop()

    # -- steps -------------------------------------------------------------------------------------------------

    def run(self, out: SchedulerOutput) -> list[int]:
        """Run one step over the workers; return one sampled token per `out.sample_seqs` entry."""
        return self._run(out, STEP)

    def run_logits(self, out: SchedulerOutput) -> torch.Tensor:
        """Run one step like `run` (KV written, generators untouched) but return the float32 logits of the
        sampled rows, [len(out.sample_seqs), vocab], on the CPU: the debug hook the equivalence tests use."""
        rows = self._run(out, LOGITS)
        return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), self.arch.vocab_size)

    def dead_workers(self) -> list[int]:
        """Return the ranks of workers that have exited (a health check; the next `run` restarts the workers)."""
        return [r for r, rank in enumerate(self._ranks) if not rank.is_alive()]

    def owner_of(self, request_id: str) -> int | None:
        """Return the worker that holds a live request's KV cache, or None."""
        entry = self._owners.get(request_id)
        return None if entry is None else entry[1]

    def _run(self, out: SchedulerOutput, kind: str) -> list:
        if self._closed:
            raise RuntimeError("the expert-parallel deployment is closed; make a new one")
        if out.is_empty:
            return []
        self._ensure_workers()
        batches, where = self._split(out)
        try:
            for rank, (conn, batch) in enumerate(zip(self._conns, batches, strict=True)):
                try:
                    conn.send((kind, batch))
                except OSError as exc:
                    hint = f"worker {rank} (pid {self._pids[rank]}) cannot be reached: {exc}"
                    raise self._failure(hint, {}) from exc
            results = self._collect(self.step_timeout_s, "a step")
        except WorkerError:
            raise
        except BaseException:  # interrupted mid-step (Ctrl-C): the workers are out of step with the driver
            self._sweep()
            self._stop()
            self._broken = True
            raise
        return [results[rank][j] for rank, j in where]

    def _ensure_workers(self) -> None:
        """Restart after a failure; notice a worker that died between steps."""
        if self._broken:
            self.restart()
            return
        if not self.dead_workers():
            return
        self._sweep()
        if self._owners:  # sequences hold KV on the dead deployment: fail them
            raise self._failure("", {})
        self.restart()

    def _sweep(self) -> None:
        """Forget finished sequences; their workers drop their generators at the next step."""
        for request_id, (seq, rank) in list(self._owners.items()):
            if seq.is_finished:
                del self._owners[request_id]
                self._finished.setdefault(rank, []).append(request_id)

    def _owner(self, seq: Sequence, load: list[int], batches: list[WorkerBatch]) -> int:
        """Return the worker of `seq`, assigning a new one to the least-loaded worker."""
        entry = self._owners.get(seq.request_id)
        if entry is not None and entry[0] is seq:
            return entry[1]
        if entry is not None:  # an id reused by a new request: the old holder drops its state before this step
            batches[entry[1]].finished_request_ids.append(seq.request_id)
            load[entry[1]] -= 1
        rank = min(range(self.workers), key=lambda r: (load[r], r))
        self._owners[seq.request_id] = (seq, rank)
        load[rank] += 1
        return rank

    def _split(self, out: SchedulerOutput) -> tuple[list[WorkerBatch], list[tuple[int, int]]]:
        """Return each worker's slice of the step and, per sampled row, (worker, row in its slice)."""
        self._sweep()
        cu = out.cu_seqlens_q
        lost = [
            seq.request_id
            for i, seq in enumerate(out.seqs)
            if self.owner_of(seq.request_id) is None and out.context_lens[i] > cu[i + 1] - cu[i]
        ]
        if lost:
            raise WorkerError(
                f"requests {', '.join(lost)} expect KV caches that were lost with failed workers; abort them",
                lost,
                cause="its KV cache was lost with failed workers",
            )
        batches = [WorkerBatch(finished_request_ids=self._finished.pop(r, [])) for r in range(self.workers)]
        load = [0] * self.workers
        for _, rank in self._owners.values():
            load[rank] += 1
        index = {id(seq): i for i, seq in enumerate(out.seqs)}
        owner, local_start = [], []
        for i, seq in enumerate(out.seqs):
            rank = self._owner(seq, load, batches)
            b, start, end = batches[rank], cu[i], cu[i + 1]
            owner.append(rank)
            local_start.append(b.cu_seqlens_q[-1])
            b.input_ids.extend(out.input_ids[start:end])
            b.positions.extend(out.positions[start:end])
            b.slot_mapping.extend(out.slot_mapping[start:end])
            b.cu_seqlens_q.append(b.cu_seqlens_q[-1] + end - start)
            b.context_lens.append(out.context_lens[i])
            b.block_tables.append(out.block_tables[i])
        where = []
        for seq, flat in zip(out.sample_seqs, out.logits_indices, strict=True):
            i = index[id(seq)]
            b = batches[owner[i]]
            where.append((owner[i], len(b.logits_indices)))
            b.logits_indices.append(flat - cu[i] + local_start[i])
            b.sample_request_ids.append(seq.request_id)
            b.sample_params.append(seq.params)
        return batches, where

    # -- replies and failures ----------------------------------------------------------------------------------

    def _collect(self, timeout_s: float, what: str, starting: bool = False) -> list:
        """Return every worker's reply payload by rank, or raise WorkerError on a death, error or timeout."""
        results: dict[int, object] = {}
        pending = set(range(self.workers))
        deadline = time.monotonic() + timeout_s
        while pending:
            waitables = {self._conns[r]: r for r in pending} | {self._ranks[r].sentinel: r for r in pending}
            ready = wait(list(waitables), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = ", ".join(f"{r} (pid {self._pids[r]})" for r in sorted(pending))
                raise self._failure(f"workers {late} did not answer {what} within {timeout_s:g} s", {}, starting)
            for obj in ready:
                rank = waitables[obj]
                if rank not in pending:
                    continue
                conn = self._conns[rank]
                if not conn.poll():
                    if self._ranks[rank].is_alive():
                        continue
                    raise self._failure("", {}, starting)  # died without a word
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    raise self._failure("", {}, starting) from None
                if kind == ERROR:
                    raise self._failure("", {rank: payload}, starting)
                if kind == READY and not starting:
                    continue
                results[rank] = payload
                pending.discard(rank)
        return [results[r] for r in range(self.workers)]

    def _await_root_cause(self, errors: dict[int, tuple[str, str]]) -> list[int]:
        """Collect error reports into `errors` and wait up to DEATH_GRACE_S for a worker that exited without one
        (a peer's collective fails the moment a worker dies, a bit before the death itself is visible); return
        the ranks that exited without a report."""
        deadline = time.monotonic() + DEATH_GRACE_S
        at_eof: set[int] = set()
        while True:
            for rank, conn in enumerate(self._conns):
                try:
                    while rank not in errors and rank not in at_eof and conn.poll():
                        kind, payload = conn.recv()
                        if kind == ERROR:
                            errors[rank] = payload
                except (EOFError, OSError):
                    at_eof.add(rank)
            silent = {r: p for r, p in enumerate(self._ranks) if r not in errors}
            died = [r for r, p in silent.items() if p.ended() is not None]
            left = deadline - time.monotonic()
            if died or not silent or left <= 0:
                return died
            waitables = {p.sentinel: p for p in silent.values()}
            waitables.update({self._conns[r]: None for r in silent if r not in at_eof})
            for obj in wait(list(waitables), timeout=left):
                if waitables[obj] is not None:
                    waitables[obj].join(DEATH_GRACE_S)  # reap it, so its exit code is known

    def _failure(self, hint: str, errors: dict[int, tuple[str, str]], starting: bool = False) -> WorkerError:
        """Stop the deployment after a failure and return the error to raise, naming the root cause: a worker
        that died (killed or crashed) before one that reported an error, before a timeout `hint`."""
        died = self._await_root_cause(errors)
        details = ""
        if died:
            rank = died[0]
            cause = f"worker {rank} (pid {self._pids[rank]}) died: {self._ranks[rank].ended()}"
        elif errors:
            rank = next(iter(errors))  # the first report received
            summary, details = errors[rank]
            cause = f"worker {rank} (pid {self._pids[rank]}) failed: {summary}"
            log.error("expert-parallel worker %d failed:\n%s", rank, details)
        else:
            cause = hint or "a worker stopped unexpectedly"
        self._sweep()
        lost = sorted(self._owners)
        self._stop()
        self._broken = True
        if starting:
            return WorkerError(f"the expert-parallel deployment could not start: {cause}", details=details)
        in_flight = f"its in-flight requests failed ({', '.join(lost)})" if lost else "no request was in flight"
        restart = "the next step restarts the workers"
        return WorkerError(f"{cause}; {in_flight}; {restart}", lost, details, f"{cause}; {restart}")
