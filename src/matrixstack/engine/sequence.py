"""One request as the engine sees it: its tokens, its place in the KV cache, its text and why it finished.

A `Sequence` holds the prompt and output token ids in one list. `num_computed_tokens` counts the leading tokens
whose keys and values are in the KV cache; the rest are computed by the next steps (a prefill in chunks, then one
token per decode step). After a preemption it drops back to 0 and the tokens are computed again.

Text is assembled incrementally with a `decode(token_ids) -> str` function the engine passes (the tokenizer's).
`StopText` finds stop strings across token boundaries, cuts the text before them, and holds back from the stream
any tail that could still turn into a stop string, so a client never sees text that is later taken back.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from typing import Any, Literal

from matrixstack.engine.config import SamplingParams
from matrixstack.errors import UserError

FinishReason = Literal["stop", "length", "abort", "error"]
Decode = Callable[[list[int]], str]

# Prompt tokens decoded with the first output token, so tokenizers that drop a leading space on a lone token
# (SentencePiece) still produce it; vLLM uses the same window.
DETOKENIZE_CONTEXT_TOKENS = 5
INCOMPLETE_CHAR = "\ufffd"  # what a byte-level decode yields for a UTF-8 character cut between tokens


class SequenceStatus(enum.Enum):
    """Where a sequence is in the scheduler: waiting for admission, in the running batch, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class StopText:
    """Output text built token by token, cut at the first stop string, with a stream that never over-shares."""

    def __init__(self, decode: Decode, prompt_token_ids: list[int], stop: list[str]):
        self._decode = decode
        self._stop = stop
        self._max_stop_chars = max((len(s) for s in stop), default=0)
        self._prefix_offset = max(len(prompt_token_ids) - DETOKENIZE_CONTEXT_TOKENS, 0)
        self._read_offset = len(prompt_token_ids)
        self._num_streamed_chars = 0
        self.text = ""

    def add(self, token_ids: list[int]) -> bool:
        """Decode the tokens not yet in the text (`token_ids` is prompt + output); return True on a stop string.

        A token that ends in the middle of a UTF-8 character adds nothing until the character completes.
        On a stop string the text is cut just before it.
        """
        window = token_ids[self._prefix_offset :]
        prefix_text = self._decode(token_ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(window)
        if len(full_text) <= len(prefix_text) or full_text.endswith(INCOMPLETE_CHAR):
            return False
        self._prefix_offset, self._read_offset = self._read_offset, len(token_ids)
        search_from = max(len(self.text) - self._max_stop_chars + 1, 0)
        self.text += full_text[len(prefix_text) :]
        hits = [i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def take_stream_delta(self, final: bool) -> str:
        """Return the text not streamed before, minus a tail that may begin a stop string (all of it when final)."""
        end = len(self.text) if final else len(self.text) - self._stop_prefix_chars()
        delta = self.text[self._num_streamed_chars : end]
        self._num_streamed_chars = end
        return delta

    def _stop_prefix_chars(self) -> int:
        """Return the length of the longest tail of the text that is a proper prefix of a stop string."""
        for length in range(min(self._max_stop_chars - 1, len(self.text)), 0, -1):
            tail = self.text[-length:]
            if any(s.startswith(tail) for s in self._stop):
                return length
        return 0


class Sequence:
    """One request's tokens, KV cache blocks, progress, text and outcome."""

    _arrival_counter = itertools.count()

    def __init__(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, decode: Decode | None = None
    ):
        if not prompt_token_ids:
            raise UserError(f"request {request_id}: the prompt is empty; send at least one token")
        if params.stop and decode is None:
            raise ValueError("stop strings need a decode function to assemble the text")
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
        detokenize = decode is not None and params.detokenize
        self._text = StopText(decode, prompt_token_ids, params.stop) if detokenize else None

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
    def text(self) -> str:
        """Return the output text so far (cut before a stop string); empty without a decode function."""
        return self._text.text if self._text is not None else ""

    def append_token(self, token_id: int, add_text: bool = True) -> bool:
        """Append a sampled token and, when `add_text`, its text; return True when a stop string now ends the text."""
        self.token_ids.append(token_id)
        return add_text and self._text is not None and self._text.add(self.token_ids)

    def finish(self, reason: FinishReason) -> None:
        """Mark the sequence finished; the held-back stream text becomes final."""
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason

    def take_new_text(self) -> str:
        """Return the output text that is safe to stream and was not returned before."""
        if self._text is None:
            return ""
        return self._text.take_stream_delta(final=self.is_finished)
