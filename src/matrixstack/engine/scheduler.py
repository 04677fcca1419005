"""Continuous batching with chunked prefill over a paged KV cache.

Each step, `schedule()` spends a budget of `max_num_batched_tokens` tokens and `max_num_seqs` sequences:

1. Running sequences that decode get their one token first (oldest first), so streams keep flowing.
2. Running sequences part-way through their prompt get the next chunk: min(rest of the prompt, budget left).
3. Waiting sequences are admitted in arrival order (FCFS), each with a first chunk that fits the budget left,
   while blocks are free; the first one that does not fit stops admission (no overtaking), and nothing is
   admitted in a step that had to preempt.
4. When a running sequence needs a block and none is free, the newest running sequence not yet in this step's
   batch is preempted (its blocks freed, its KV recomputed later from its tokens; it goes back to the front of
   the waiting queue); when there is none, the sequence itself is preempted.
5. `postprocess()` records the computed tokens, appends the sampled token of every sequence whose uncomputed
   tokens were all in the step (a decode, or a prefill's last chunk), checks the stop conditions of tokens
   (a stop token, end-of-sequence, max_tokens, the context length), and frees the blocks of sequences that
   finished. Stop strings are text, which the scheduler never sees: the output side finds them and aborts the
   request (`engine.output_processor`). `abort()` frees a sequence at once, waiting or running.

Because the config guarantees one max_model_len sequence fits the whole cache, a step with work always schedules
something: with nothing running every block is free for the head of the queue.

Adapters. A request for a LoRA adapter (`SamplingParams.lora`) has it prepared when added (`LoraSlots.prepare`: an
unknown name or a bad folder fails the request there), and gets a device slot when admitted (`LoraSlots.acquire`);
when every slot is held by running sequences of other adapters it waits at the head of the queue like one without
free blocks. A preempted or finished sequence releases its slot. `SchedulerOutput.lora_slots` gives each scheduled
sequence's slot (0: the base). An engine without slots (`lora=None`: expert parallel) refuses adapter requests.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from matrixstack.engine.block_manager import BlockManager, check_request_fits
from matrixstack.engine.config import EngineConfig
from matrixstack.engine.lora_adapter import LoraAdapter
from matrixstack.engine.sequence import FinishReason, Sequence, SequenceStatus
from matrixstack.errors import UserError

NO_BLOCK = -1  # block table padding


@dataclass
class SchedulerOutput:
    """One step's batch as plain Python lists; the model runner turns them into tensors.

    Sequence i's new tokens are the flat entries cu_seqlens_q[i] : cu_seqlens_q[i + 1] of input_ids, positions
    and slot_mapping. `logits_indices[j]` is the flat index whose logits are sampled for `sample_seqs[j]`.
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # per sequence: a prefill chunk, or 1 for a decode
    input_ids: list[int] = field(default_factory=list)  # [num_tokens]
    positions: list[int] = field(default_factory=list)  # [num_tokens]: position of each token in its sequence
    cu_seqlens_q: list[int] = field(default_factory=lambda: [0])  # [num_seqs + 1]
    context_lens: list[int] = field(default_factory=list)  # [num_seqs]: cached + new tokens after this step
    block_tables: list[list[int]] = field(default_factory=list)  # [num_seqs][max_blocks], padded with NO_BLOCK
    slot_mapping: list[int] = field(default_factory=list)  # [num_tokens]: block * block_size + offset
    logits_indices: list[int] = field(default_factory=list)  # [num_samples]
    sample_seqs: list[Sequence] = field(default_factory=list)  # [num_samples]
    lora_slots: list[int] = field(default_factory=list)  # per sequence: its adapter's slot, 0 for the base
    preempted: list[Sequence] = field(default_factory=list)  # sent back to waiting during this schedule()

    @property
    def num_tokens(self) -> int:
        """Return the tokens in the flat batch."""
        return len(self.input_ids)

    @property
    def is_empty(self) -> bool:
        """Return True when there is nothing to run this step."""
        return not self.seqs


class Scheduler:
    """Waiting and running queues, the block manager, and the per-step batching policy (see module docstring)."""

    def __init__(self, config: EngineConfig, eos_token_id: int | None, lora=None):
        """`lora` is the runner's `LoraSlots`, or None when the runner serves no adapters."""
        self.config = config
        self.eos_token_id = eos_token_id
        self.lora = lora
        self._adapters: dict[str, LoraAdapter] = {}  # request id -> its adapter, for adapter requests
        self._slots: dict[str, int] = {}  # request id -> its adapter's slot, while it holds one
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._by_request_id: dict[str, Sequence] = {}

    @property
    def num_unfinished(self) -> int:
        """Return the sequences waiting or running."""
        return len(self._by_request_id)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; raise UserError when it can never fit the context, ValueError on a reused id."""
        check_request_fits(seq.num_prompt_tokens, seq.params.max_tokens, self.config.max_model_len)
        if seq.request_id in self._by_request_id:
            raise ValueError(f"request id {seq.request_id!r} is already in the engine")
        if seq.params.lora is not None:
            if self.lora is None:
                raise UserError(
                    f"adapter {seq.params.lora!r}: this deployment runs expert parallel (--workers > 1), which "
                    "serves no LoRA adapters; serve the adapter on a deployment with --workers 1"
                )
            self._adapters[seq.request_id] = self.lora.prepare(seq.params.lora)
        self._by_request_id[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str, reason: FinishReason = "abort") -> Sequence | None:
        """Finish a waiting or running sequence now and free its blocks; return it, or None for an unknown id."""
        seq = self._by_request_id.get(request_id)
        if seq is None:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._finish(seq, reason)
        return seq

    def schedule(self) -> SchedulerOutput:
        """Pick this step's sequences and token counts, allocate their blocks, and return the flat batch."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        in_batch: set[Sequence] = set()
        preempted: list[Sequence] = []
        decodes_first = sorted(self.running, key=lambda s: (s.num_uncomputed_tokens > 1, s.arrival_index))
        for seq in decodes_first:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            if self._make_room(seq, num_new, in_batch, preempted):
                self.block_manager.allocate(seq, num_new)
                scheduled.append((seq, num_new))
                in_batch.add(seq)
                budget -= num_new
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_allocate(seq, num_new) or not self._acquire_adapter(seq):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.block_manager.allocate(seq, num_new)
            scheduled.append((seq, num_new))
            budget -= num_new
        return self._build_output(scheduled, preempted)

    def postprocess(self, output: SchedulerOutput, sampled_token_ids: list[int]) -> list[Sequence]:
        """Record the step: advance computed tokens, append `sampled_token_ids` (one per `output.sample_seqs`),
        finish sequences that hit a stop condition and free their blocks; return the sequences finished now.

        Sequences aborted while the step ran are skipped.
        """
        for seq, num_new in zip(output.seqs, output.num_new_tokens, strict=True):
            if not seq.is_finished:
                seq.num_computed_tokens += num_new
        finished = []
        for seq, token_id in zip(output.sample_seqs, sampled_token_ids, strict=True):
            if seq.is_finished:
                continue
            reason = self._append_and_check(seq, token_id)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def _make_room(self, seq: Sequence, num_new: int, in_batch: set[Sequence], preempted: list[Sequence]) -> bool:
        """Preempt newest unscheduled running sequences until `seq` can get its blocks; return False if `seq` went."""
        while not self.block_manager.can_allocate(seq, num_new):
            victims = [s for s in self.running if s is not seq and s not in in_batch]
            victim = max(victims, key=lambda s: s.arrival_index) if victims else seq
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _acquire_adapter(self, seq: Sequence) -> bool:
        """Give `seq` its adapter's slot (nothing to do for the base); return False when every slot is held."""
        adapter = self._adapters.get(seq.request_id)
        if adapter is None or seq.request_id in self._slots:
            return True
        slot = self.lora.acquire(adapter)
        if slot is None:
            return False
        self._slots[seq.request_id] = slot
        return True

    def _release_adapter(self, seq: Sequence) -> None:
        """Let go of `seq`'s adapter slot, when it holds one."""
        slot = self._slots.pop(seq.request_id, None)
        if slot is not None:
            self.lora.release(slot)

    def _preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and adapter slot and put it at the front of the waiting queue to be recomputed."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        self._release_adapter(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _append_and_check(self, seq: Sequence, token_id: int) -> FinishReason | None:
        """Append the sampled token to `seq`; return why it finished ("stop" or "length"), or None to go on."""
        params = seq.params
        is_stop_token = token_id in params.stop_token_ids or (
            not params.ignore_eos and self.eos_token_id is not None and token_id == self.eos_token_id
        )
        seq.token_ids.append(token_id)
        if is_stop_token:
            return "stop"
        hit_max_tokens = params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens
        if hit_max_tokens or seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Mark `seq` finished, free its blocks and forget its request id (it is already out of both queues)."""
        self.block_manager.free(seq)
        self._release_adapter(seq)
        self._adapters.pop(seq.request_id, None)
        seq.finish(reason)
        del self._by_request_id[seq.request_id]

    def _build_output(self, scheduled: list[tuple[Sequence, int]], preempted: list[Sequence]) -> SchedulerOutput:
        """Lay the scheduled sequences' new tokens out as the flat batch the model runner consumes."""
        out = SchedulerOutput(preempted=preempted)
        max_blocks = max((len(seq.block_table) for seq, _ in scheduled), default=0)
        for seq, num_new in scheduled:
            start = seq.num_computed_tokens
            end = start + num_new
            out.seqs.append(seq)
            out.num_new_tokens.append(num_new)
            out.input_ids.extend(seq.token_ids[start:end])
            out.positions.extend(range(start, end))
            out.slot_mapping.extend(self.block_manager.slots(seq, start, num_new))
            out.cu_seqlens_q.append(out.cu_seqlens_q[-1] + num_new)
            out.context_lens.append(end)
            out.block_tables.append(seq.block_table + [NO_BLOCK] * (max_blocks - len(seq.block_table)))
            out.lora_slots.append(self._slots.get(seq.request_id, 0))
            if end == seq.num_tokens:
                out.logits_indices.append(out.cu_seqlens_q[-1] - 1)
                out.sample_seqs.append(seq)
        return out
