"""One request as the engine sees it: its tokens, its place in the KV cache and why it finished; and what a step
reports of it.

A `Sequence` holds the prompt and output token ids in one list. `num_computed_tokens` counts the leading tokens
whose keys and values are in the KV cache; the rest are computed by the next steps (a prefill in chunks, then one
token per decode step). After a preemption it drops back to 0 and the tokens are computed again.

The engine knows tokens only, never text: a step reports each request's new token ids and, once the engine
finished it (a stop token, end-of-sequence, max_tokens, the context length, an abort or an error), why, as a
`TokenDelta`. Text and stop strings are the output side's (`engine.output_processor`), off the step loop.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass
from typing import Any, Literal

from matrixstack.engine.config import SamplingParams
from matrixstack.errors import UserError

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class TokenDelta:
    """A request's new output tokens of one step, and why the engine finished it once it did ("stop": a stop token
    or end-of-sequence, the last of `token_ids`); `error` says what failed, for "error"."""

    request_id: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    error: str | None = None


class SequenceStatus(enum.Enum):
    """Where a sequence is in the scheduler: waiting for admission, in the running batch, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One request's tokens, KV cache blocks, progress and outcome."""

    _arrival_counter = itertools.count()

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        if not prompt_token_ids:
            raise UserError(f"request {request_id}: the prompt is empty; send at least one token")
        self.request_id = request_id
        self.arrival_index = next(Sequence._arrival_counter)  # FCFS order; larger is newer
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        # Per-request torch.Generator for seeded sampling, made by the model runner (sampler.make_generator); kept
        # here so it lives as long as the request and keeps its state across preemptions.
        self.generator: Any = None

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )

    @property
    def num_tokens(self) -> int:
        """Return prompt plus output tokens."""
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Return how many tokens have been generated."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """Return the generated token ids (a copy)."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Return the tokens whose KV is not yet cached: the rest of the prompt, or 1 (the last sampled token)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        """Return True once the sequence has a finish reason."""
        return self.status is SequenceStatus.FINISHED

    @property
    def prompt_token_ids(self) -> list[int]:
        """Return the prompt's token ids (a copy)."""
        return self.token_ids[: self.num_prompt_tokens]

    def finish(self, reason: FinishReason) -> None:
        """Mark the sequence finished."""
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
