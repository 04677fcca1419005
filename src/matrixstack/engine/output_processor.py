"""A request's output side, off the engine's step loop: token deltas in, text deltas out (vLLM v1's
OutputProcessor and IncrementalDetokenizer, in the front end rather than the engine core).

The step loop (`LLMEngine.step`) reports each request's new token ids and why the engine finished it — a stop
token, end-of-sequence, `max_tokens` or the context length — as `TokenDelta`s, and never decodes text. A
`RequestState` per request turns them into `Delta`s: `StopText` assembles the text incrementally with the
tokenizer's decode, finds stop strings across token boundaries, cuts the text before them, and holds back from the
stream any tail that could still turn into a stop string, so a client never sees text that is later taken back.
A stop token's own text is never added. `OutputProcessor` holds the states of many requests, for a caller that
steps the engine itself (`LLMEngine.generate`, the bench).

A stop string ends the request here, not in the engine: the delta of the token that completes it carries
finish_reason "stop", the text cut before the stop string, the token ids up to and including that token, and
`completion_tokens` counting those tokens (as vLLM counts). The caller then aborts the request in the engine
(`RequestState.abort_in_engine`), which frees its KV blocks. The engine may have computed a token or two more
meanwhile: they are dropped, never streamed nor counted.

Where it runs: `AsyncEngine.stream` runs a request's state in the coroutine that consumes the request, on the
server's event loop; `LLMEngine.generate` runs an `OutputProcessor` inline between steps and aborts a stopped
request before the next step (nothing is computed past a stop string there, so its results are those of the
engine that checked stop strings itself). The event loop rather than a thread of its own: a token costs a decode
of a window of at most DETOKENIZE_CONTEXT_TOKENS + 1 tokens and a search of the stop strings near the end of the
text, microseconds whatever the prompt's length, and the consumer's coroutine wakes for each delta anyway; a
thread of its own would hold the same interpreter lock as the engine thread and the event loop (no parallelism
to gain) and add a hand-off per delta.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from matrixstack.engine.config import SamplingParams
from matrixstack.engine.sequence import TokenDelta

Decode = Callable[[list[int]], str]

# Prompt tokens decoded with the first output token, so tokenizers that drop a leading space on a lone token
# (SentencePiece) still produce it; vLLM uses the same window.
DETOKENIZE_CONTEXT_TOKENS = 5
INCOMPLETE_CHAR = "\ufffd"  # what a byte-level decode yields for a UTF-8 character cut between tokens


@dataclass
class Delta:
    """New output of one request since the last delta: text, token ids, and the finish reason once done."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


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


class RequestState:
    """One request's output side: its text (without `params.detokenize`, none), the tokens handed on, and whether a
    stop string ended it while the engine still runs it."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, decode: Decode):
        self.request_id = request_id
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_output_tokens = 0
        self.abort_in_engine = False  # a stop string ended the output: the caller must abort the engine's request
        self._token_ids = list(prompt_token_ids)
        self._text = StopText(decode, prompt_token_ids, params.stop) if params.detokenize else None

    def process(self, delta: TokenDelta) -> Delta:
        """Return the text delta of the engine's `delta`: its new text safe to stream (all that is left once the
        request finished), the token ids handed on, and the finish reason — "stop" when a stop string completed,
        with the tokens after the one that completed it dropped."""
        token_ids, finish = delta.token_ids, delta.finish_reason
        if self._text is not None:
            text_ids = token_ids[:-1] if finish == "stop" else token_ids  # a stop token adds no text
            for i, token_id in enumerate(text_ids):
                self._token_ids.append(token_id)
                if self._text.add(self._token_ids):
                    self.abort_in_engine = finish is None
                    token_ids, finish = token_ids[: i + 1], "stop"
                    break
        self.num_output_tokens += len(token_ids)
        text = self._text.take_stream_delta(final=finish is not None) if self._text is not None else ""
        return Delta(
            self.request_id,
            text,
            token_ids,
            finish,
            self.num_prompt_tokens,
            self.num_output_tokens,
            delta.error,
        )


class OutputProcessor:
    """The output side of many requests, for a caller that steps the engine itself (see the module docstring)."""

    def __init__(self, decode: Decode):
        self._decode = decode
        self._states: dict[str, RequestState] = {}

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Start the output side of a request the engine took in."""
        self._states[request_id] = RequestState(request_id, prompt_token_ids, params, self._decode)

    def process(self, deltas: Iterable[TokenDelta]) -> tuple[list[Delta], list[str]]:
        """Return (the text deltas of the engine's `deltas`, the ids of requests a stop string ended, which the
        caller must abort in the engine); a finished request is forgotten, and deltas of unknown ones skipped."""
        out, to_abort = [], []
        for token_delta in deltas:
            state = self._states.get(token_delta.request_id)
            if state is None:
                continue
            delta = state.process(token_delta)
            out.append(delta)
            if state.abort_in_engine:
                to_abort.append(delta.request_id)
            if delta.finish_reason:
                del self._states[delta.request_id]
        return out, to_abort
