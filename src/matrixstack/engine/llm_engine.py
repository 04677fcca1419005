"""The loop: requests in, steps of schedule -> run -> postprocess, tokens out; text out (offline and streaming).

`LLMEngine` is synchronous and single-threaded, like nano-vllm's: `add_request`, `step`, `abort`, `generate`.
Its step reports token ids and the engine's finish reasons only (`TokenDelta`: stop tokens, end-of-sequence,
max_tokens, the context length); the text and stop strings are the output side's (`engine.output_processor`),
which `generate` runs inline between steps.

`AsyncEngine` runs an `LLMEngine` on a background thread for a server: each request gets an asyncio queue of
`TokenDelta`s, which its stream turns into text `Delta`s on the consumer's event loop (a `RequestState`), so the
engine thread never decodes a token; a stop string found there ends the stream and aborts the request in the
engine. New requests and aborts (a stop string, or the client went away) are handed to the engine thread, which
takes them in before its next step (an abort frees the request's KV blocks there). A text prompt is tokenised on a
worker thread before it is handed in, never on the engine thread. A step that fails fails every request in flight,
each with an error that says what happened without naming the others (a `WorkerError`'s `cause`).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from matrixstack.engine.config import EngineConfig, SamplingParams
from matrixstack.engine.output_processor import Delta, OutputProcessor, RequestState
from matrixstack.engine.scheduler import Scheduler
from matrixstack.engine.sequence import Sequence, TokenDelta
from matrixstack.engine.tokenizer import Tokenizer
from matrixstack.errors import UserError


@dataclass
class Completion:
    """A finished request: its whole text, tokens and usage."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class StepStats:
    """Counters of the work done, for benchmarks and metrics."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    step_seconds: list[float] = field(default_factory=list)


class LLMEngine:
    """Continuous-batching engine over one runner: schedule, run the model, sample, report the tokens."""

    def __init__(self, runner, tokenizer: Tokenizer, config: EngineConfig):
        """`runner` has `run(SchedulerOutput) -> list[int]`: a ModelRunner or an expert-parallel deployment; its
        `lora` slots (a ModelRunner's) serve adapter requests."""
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self.scheduler = Scheduler(config, tokenizer.eos_id, getattr(runner, "lora", None))
        self.stats = StepStats()
        self._ids = itertools.count()
        self._sent_tokens: dict[str, int] = {}

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        """Queue a request (text or token ids) and return its sequence; UserError when it can never fit."""
        token_ids = self.tokenizer.encode(prompt, add_bos=True) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise UserError("the prompt is empty; send at least one token")
        bad = [t for t in token_ids if not 0 <= t < self.tokenizer.vocab_size]
        if bad:
            raise UserError(
                f"prompt token ids {bad[:5]} are outside the vocabulary (0..{self.tokenizer.vocab_size - 1})"
            )
        seq = Sequence(request_id or f"req-{next(self._ids)}", token_ids, params)
        self.scheduler.add(seq)
        self._sent_tokens[seq.request_id] = 0
        return seq

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks; return True when it was still live."""
        self._sent_tokens.pop(request_id, None)
        return self.scheduler.abort(request_id) is not None

    def has_work(self) -> bool:
        """Return True while any request is waiting or running."""
        return self.scheduler.num_unfinished > 0

    def step(self) -> list[TokenDelta]:
        """Run one step; return a token delta for every request that produced a token or finished."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        decodes = sum(1 for s in out.seqs if s.num_computed_tokens >= s.num_prompt_tokens)
        start = time.perf_counter()
        try:
            tokens = self.runner.run(out)
        except Exception:
            # the running sequences' KV cache may be gone (a worker died): fail them, keep the engine usable
            for seq in list(self.scheduler.running):
                self.scheduler.abort(seq.request_id, "error")
                self._sent_tokens.pop(seq.request_id, None)
            raise
        finished = self.scheduler.postprocess(out, tokens)
        self.stats.steps += 1
        self.stats.step_seconds.append(time.perf_counter() - start)
        self.stats.decode_tokens += decodes
        self.stats.prefill_tokens += out.num_tokens - decodes
        deltas = []
        for seq in {id(s): s for s in [*out.sample_seqs, *finished]}.values():
            delta = self._delta(seq)
            if delta.token_ids or delta.finish_reason:
                deltas.append(delta)
        return deltas

    def _delta(self, seq: Sequence) -> TokenDelta:
        sent = self._sent_tokens.get(seq.request_id, 0)
        new_tokens = seq.output_token_ids[sent:]
        self._sent_tokens[seq.request_id] = seq.num_output_tokens
        finish = seq.finish_reason if seq.is_finished else None
        if finish:
            self._sent_tokens.pop(seq.request_id, None)
        return TokenDelta(seq.request_id, new_tokens, finish)

    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Completion]:
        """Run prompts to completion together (continuous batching) and return their completions in order.

        The output side runs inline (an `OutputProcessor`): a request a stop string ended is aborted before the
        next step, so it computes nothing past its stop string."""
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, all_params, strict=True)]
        processor = OutputProcessor(self.tokenizer.decode)
        for seq in seqs:
            processor.add_request(seq.request_id, seq.prompt_token_ids, seq.params)
        texts = {s.request_id: "" for s in seqs}
        token_ids: dict[str, list[int]] = {s.request_id: [] for s in seqs}
        finish_reasons: dict[str, str] = {}
        while self.has_work():
            deltas, stopped = processor.process(self.step())
            for request_id in stopped:
                self.abort(request_id)
            for delta in deltas:
                texts[delta.request_id] += delta.text
                token_ids[delta.request_id] += delta.token_ids
                if delta.finish_reason:
                    finish_reasons[delta.request_id] = delta.finish_reason
        return [
            Completion(
                s.request_id,
                texts[s.request_id],
                token_ids[s.request_id],
                finish_reasons.get(s.request_id, "abort"),
                s.num_prompt_tokens,
                len(token_ids[s.request_id]),
            )
            for s in seqs
        ]


class AsyncEngine:
    """An `LLMEngine` on a background thread, with per-request asyncio streams for a server.

    Only the engine thread touches the `LLMEngine`: other threads hand it new requests and aborts through an inbox,
    which it empties before every step. An event loop thus never waits for a step to end (it did while the two
    shared a lock: the engine thread takes it again right after each step, and under uvloop a request or an abort
    waited up to ~250 ms for it, the whole server stalled meanwhile)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: deque[_Add | str] = deque()  # new requests, and the ids of requests to abort, in order
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self.error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopped:
            self._wake.clear()
            self._take_inbox()
            if not self.engine.has_work():
                self._wake.wait(0.05)
                continue
            try:
                deltas = self.engine.step()
            except Exception as exc:  # a failed step fails its requests, never hangs them
                self._fail_all(getattr(exc, "cause", None) or f"{type(exc).__name__}: {exc}")
                continue
            for delta in deltas:
                self._publish(delta)
        while self._inbox:  # requests handed in as the engine stopped never start
            item = self._inbox.popleft()
            if isinstance(item, _Add) and item.added.set_running_or_notify_cancel():
                item.added.set_exception(RuntimeError("the engine has stopped"))

    def _take_inbox(self) -> None:
        while self._inbox:
            item = self._inbox.popleft()
            if isinstance(item, str):
                self.engine.abort(item)
                continue
            if not item.added.set_running_or_notify_cancel():
                continue  # its consumer went away before the request was taken in
            try:
                self.engine.add_request(item.prompt, item.params, item.request_id)
            except Exception as exc:
                item.added.set_exception(exc)
            else:
                item.added.set_result(None)

    def _publish(self, delta: TokenDelta) -> None:
        target = self._queues.get(delta.request_id)
        if target is None:
            return
        loop, queue = target
        loop.call_soon_threadsafe(queue.put_nowait, delta)
        if delta.finish_reason:
            self._queues.pop(delta.request_id, None)

    def _fail_all(self, message: str) -> None:
        """Fail every live request with `message`, which must concern each of them alike (no request ids)."""
        live = list(self._queues)
        for request_id in live:
            self.engine.abort(request_id)
        for request_id in live:
            self._publish(TokenDelta(request_id, [], "error", message))

    async def stream(self, prompt: str | list[int], params: SamplingParams, request_id: str) -> AsyncIterator[Delta]:
        """Yield the request's text deltas until it finishes; abort it if the consumer stops early.

        The engine thread sends token deltas; the text is decoded here, on the caller's event loop (a
        `RequestState`): a stop string ends the stream there and aborts the request in the engine, dropping the
        tokens it computed past it. The first delta waits for the engine thread to take the request in: a request
        that can never run raises its UserError there (`LLMEngine.add_request`), a reused `request_id` a
        ValueError."""
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        if isinstance(prompt, str):
            prompt = await asyncio.to_thread(self.engine.tokenizer.encode, prompt, True)
        state = RequestState(request_id, prompt, params, self.engine.tokenizer.decode)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), queue)
        add = _Add(prompt, params, request_id)
        self._inbox.append(add)
        self._wake.set()
        try:
            await asyncio.wrap_future(add.added)
        except asyncio.CancelledError:
            self.abort(request_id)  # in case the engine thread took it in already: the abort follows it
            raise
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        finished = False
        try:
            while True:
                delta = state.process(await queue.get())
                if state.abort_in_engine:
                    self.abort(request_id)  # a stop string: the engine still runs the request
                finished = delta.finish_reason is not None
                yield delta
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread (a client that disconnected): no more deltas are published for it, and
        the engine thread frees its KV blocks before its next step."""
        self._queues.pop(request_id, None)
        self._inbox.append(request_id)
        self._wake.set()

    def close(self) -> None:
        """Stop the background thread."""
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)


@dataclass
class _Add:
    """A request handed to the engine thread; `added` resolves once the engine queued it (or refused it)."""

    prompt: str | list[int]
    params: SamplingParams
    request_id: str
    added: Future = field(default_factory=Future)
