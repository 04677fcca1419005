"""The loop: requests in, steps of schedule -> run -> postprocess, text out (offline and streaming).

`LLMEngine` is synchronous and single-threaded, like nano-vllm's: `add_request`, `step`, `abort`, `generate`.
`AsyncEngine` runs an `LLMEngine` on a background thread for a server: each request gets an asyncio queue of
`Delta`s; aborting (the client went away) is handed to the engine thread, which frees the request's KV blocks
before its next step.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from matrixstack.engine.config import EngineConfig, SamplingParams
from matrixstack.engine.scheduler import Scheduler
from matrixstack.engine.sequence import Sequence
from matrixstack.engine.tokenizer import Tokenizer
from matrixstack.errors import UserError


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
    """Continuous-batching engine over one runner: schedule, run the model, sample, stream text."""

    def __init__(self, runner, tokenizer: Tokenizer, config: EngineConfig):
        """`runner` has `run(SchedulerOutput) -> list[int]`: a ModelRunner or an expert-parallel deployment."""
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self.scheduler = Scheduler(config, tokenizer.eos_id)
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
        seq = Sequence(request_id or f"req-{next(self._ids)}", token_ids, params, self.tokenizer.decode)
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

    def step(self) -> list[Delta]:
        """Run one step; return a delta for every request that produced text or finished."""
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
            if delta.text or delta.token_ids or delta.finish_reason:
                deltas.append(delta)
        return deltas

    def _delta(self, seq: Sequence) -> Delta:
        sent = self._sent_tokens.get(seq.request_id, 0)
        new_tokens = seq.output_token_ids[sent:]
        self._sent_tokens[seq.request_id] = seq.num_output_tokens
        finish = seq.finish_reason if seq.is_finished else None
        if finish:
            self._sent_tokens.pop(seq.request_id, None)
        return Delta(
            seq.request_id,
            seq.take_new_text(),
            new_tokens,
            finish,
            seq.num_prompt_tokens,
            seq.num_output_tokens,
        )

    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Completion]:
        """Run prompts to completion together (continuous batching) and return their completions in order."""
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, all_params, strict=True)]
        texts = {s.request_id: "" for s in seqs}
        while self.has_work():
            for delta in self.step():
                texts[delta.request_id] = texts.get(delta.request_id, "") + delta.text
        return [
            Completion(
                s.request_id,
                texts[s.request_id],
                s.output_token_ids,
                s.finish_reason or "abort",
                s.num_prompt_tokens,
                s.num_output_tokens,
            )
            for s in seqs
        ]


class AsyncEngine:
    """An `LLMEngine` on a background thread, with per-request asyncio streams for a server."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self.error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopped:
            if not self.engine.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                with self._lock:
                    deltas = self.engine.step()
            except Exception as exc:  # a failed step fails its requests, never hangs them
                self._fail_all(f"{type(exc).__name__}: {exc}")
                continue
            for delta in deltas:
                self._publish(delta)

    def _publish(self, delta: Delta) -> None:
        target = self._queues.get(delta.request_id)
        if target is None:
            return
        loop, queue = target
        loop.call_soon_threadsafe(queue.put_nowait, delta)
        if delta.finish_reason:
            self._queues.pop(delta.request_id, None)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            live = list(self._queues)
            for request_id in live:
                self.engine.abort(request_id)
        for request_id in live:
            self._publish(Delta(request_id, "", [], "error", error=message))

    async def stream(self, prompt: str | list[int], params: SamplingParams, request_id: str) -> AsyncIterator[Delta]:
        """Yield the request's deltas until it finishes; abort it if the consumer stops early."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self.engine.add_request(prompt, params, request_id)
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        finished = False
        try:
            while True:
                delta = await queue.get()
                yield delta
                if delta.finish_reason:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread (a client that disconnected)."""
        with self._lock:
            self._queues.pop(request_id, None)
            self.engine.abort(request_id)

    def close(self) -> None:
        """Stop the background thread."""
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)
