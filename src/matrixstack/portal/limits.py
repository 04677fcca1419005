"""Per-key limits of the portal: requests per minute, tokens per minute, and a lifetime token quota.

`KeyLimiter` keeps, per API key, a sliding log of the last minute (one timestamp per admitted request, one
(timestamp, tokens) per settled request), the tokens reserved by requests in flight, and the key's lifetime total.

- `admit(key)` counts EVERY authenticated request against `rpm_limit`, whatever becomes of it later (an unknown
  model, an invalid body): the gateway calls it right after the key is checked. It refuses (counting nothing) while
  the last 60 s already hold `rpm_limit` requests, while the minute's settled plus reserved tokens reach
  `tpm_limit`, or while the lifetime total plus the reserved tokens reach `token_quota`.
- `reserve(key, tokens)`, once the request's most is known (`request_tokens_bound`), checks the same two token
  limits again and reserves `tokens` against both; it returns the reservation (0 when refused: nothing is
  reserved). The check and the reservation happen together on the event loop's thread, so requests admitted at
  once cannot all see the same room.
- `settle(key_id, reserved, tokens)` at the end of the request (completed, failed, cancelled, client gone)
  replaces the reservation by the tokens really used: they go into the minute and the lifetime total.

A request is admitted while some room is left and then reserves its whole most, and every request uses at most
what it reserved, so a key overshoots a limit by at most one request's most (the last admitted), however many
requests arrive at once. A request's most (`request_tokens_bound(endpoint, body)`) is a bound, not a count: the
portal does not tokenise. Its prompt side is the UTF-8 length of the JSON of the prompt field (`messages` or
`prompt`), which a byte-level BPE tokenizer never exceeds (each token covers at least one byte) and which also
covers the chat template's few tokens per message (its `{"role":...,"content":...}` takes more bytes); its
completion side is the request's `max_tokens` (or `max_completion_tokens`, or the entry's default applied by then,
or the endpoint's default), times `n`, times the prompts of a batch. A request that sets no bound at all (a chat
without `max_tokens` on an entry without a default: "until the context is full") reserves
`UNBOUNDED_COMPLETION_TOKENS`; one that then generates more may overshoot by the difference.

The lifetime total starts from the database (`usage_service.tokens_used(session, key_id)`, read once per key and
process by the caller, outside the event loop, before the key's first request in this process: `needs_seed` /
`seed`; every key is seeded, with or without a quota, so a quota set later counts what came before) and then grows
in memory; over `token_quota` every request is refused with `insufficient_quota` until an admin raises the quota.
A refusal carries `retry_after_s`, whole seconds until the oldest entry that blocks the key leaves the window (at
least 1; 1 when only requests in flight block it); for the quota, which no wait restores, `QUOTA_RETRY_AFTER_S`.

Everything runs on the event loop's thread: no locks. The counts are per portal process; several processes
behind a balancer each enforce the limits on their own share.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from matrixstack.openai.endpoints import COMPLETION, Endpoint

WINDOW_S = 60.0
QUOTA_RETRY_AFTER_S = 3600  # a spent quota comes back only when an admin raises it; tell clients to wait long
IN_FLIGHT_RETRY_AFTER_S = 1  # room held only by requests in flight comes back when they end
UNBOUNDED_COMPLETION_TOKENS = 4096  # reserved for a request that sets no bound on its completion
RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
INSUFFICIENT_QUOTA = "insufficient_quota"


class LimitedKey(Protocol):
    """What the limiter reads from an API key (the portal's KeyInfo)."""

    id: int
    rpm_limit: int | None
    tpm_limit: int | None
    token_quota: int | None


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: OpenAI's error code, a message, and the Retry-After in whole seconds."""

    code: str
    message: str
    retry_after_s: int


@dataclass
class _KeyWindow:
    requests: deque[float] = field(default_factory=deque)  # admission times in the window
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (settle time, tokens) in the window
    tokens_in_window: int = 0
    reserved_tokens: int = 0  # reserved by requests in flight, not settled yet
    used_tokens: int | None = None  # lifetime total; None until seeded from the database


def _retry_after(oldest_s: float, now_s: float) -> int:
    """Return whole seconds until an entry stamped `oldest_s` leaves the window (at least 1)."""
    return max(1, math.ceil(oldest_s + WINDOW_S - now_s))


def request_tokens_bound(endpoint: Endpoint, body: dict[str, Any]) -> int:
    """Return the most tokens the request `body` (as sent to the backend: the entry's settings applied) can use:
    a bound on its prompt tokens plus the completion tokens it may generate (see the module docstring)."""
    prompt = body.get(endpoint.prompt_param)
    prompt_bound = len(orjson.dumps(prompt))
    most = body.get("max_tokens")
    if endpoint.max_tokens_alias is not None and body.get(endpoint.max_tokens_alias) is not None:
        most = body[endpoint.max_tokens_alias]
    if most is None:
        most = endpoint.default_max_tokens or UNBOUNDED_COMPLETION_TOKENS
    prompts = 1
    if endpoint is COMPLETION and isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompts = len(prompt)  # a batch of prompts (texts or token id lists): each gets its own completions
    return prompt_bound + int(most) * int(body.get("n") or 1) * prompts


class KeyLimiter:
    """Sliding-window rpm/tpm limits and lifetime token quotas of API keys (see the module docstring)."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._keys: dict[int, _KeyWindow] = {}

    def _window(self, key_id: int, now_s: float) -> _KeyWindow:
        window = self._keys.get(key_id)
        if window is None:
            window = self._keys[key_id] = _KeyWindow()
        start = now_s - WINDOW_S
        while window.requests and window.requests[0] <= start:
            window.requests.popleft()
        while window.tokens and window.tokens[0][0] <= start:
            window.tokens_in_window -= window.tokens.popleft()[1]
        return window

    def needs_seed(self, key_id: int) -> bool:
        """Return True while the key's lifetime token total has not been read from the database yet."""
        window = self._keys.get(key_id)
        return window is None or window.used_tokens is None

    def seed(self, key_id: int, used_tokens: int) -> None:
        """Set the key's lifetime token total read from the database (once; later calls keep the live count)."""
        window = self._window(key_id, self._clock())
        if window.used_tokens is None:
            window.used_tokens = used_tokens

    def admit(self, key: LimitedKey) -> Refusal | None:
        """Return None and count the request when `key` may send one now; else the Refusal (nothing counted)."""
        now_s = self._clock()
        window = self._window(key.id, now_s)
        refusal = self._no_room(key, window, now_s)
        if refusal is not None:
            return refusal
        if key.rpm_limit is not None and len(window.requests) >= key.rpm_limit:
            return Refusal(
                RATE_LIMIT_EXCEEDED,
                f"rate limit reached: {key.rpm_limit} requests per minute for this API key; retry later",
                _retry_after(window.requests[-key.rpm_limit] if key.rpm_limit else now_s, now_s),
            )
        window.requests.append(now_s)
        return None

    def reserve(self, key: LimitedKey, tokens: int) -> tuple[int, Refusal | None]:
        """Return (tokens reserved, None) when `key` has room left for a request of at most `tokens`: they are
        reserved against its tpm limit and quota until `settle`; else (0, the Refusal), nothing reserved."""
        now_s = self._clock()
        window = self._window(key.id, now_s)
        refusal = self._no_room(key, window, now_s)
        if refusal is not None:
            return 0, refusal
        window.reserved_tokens += tokens
        return tokens, None

    def _no_room(self, key: LimitedKey, window: _KeyWindow, now_s: float) -> Refusal | None:
        """Return the Refusal when the key's quota or its minute's tokens are taken (settled or reserved)."""
        used, reserved = window.used_tokens or 0, window.reserved_tokens
        if key.token_quota is not None and used >= key.token_quota:
            return Refusal(
                INSUFFICIENT_QUOTA,
                f"this API key has used its token quota ({used} of {key.token_quota} tokens); ask an admin to raise it",
                QUOTA_RETRY_AFTER_S,
            )
        if key.token_quota is not None and used + reserved >= key.token_quota:
            return Refusal(
                RATE_LIMIT_EXCEEDED,
                f"requests in flight hold the rest of this API key's token quota ({used} of {key.token_quota} "
                f"tokens used, {reserved} reserved); retry when they end",
                IN_FLIGHT_RETRY_AFTER_S,
            )
        if key.tpm_limit is not None and window.tokens_in_window + reserved >= key.tpm_limit:
            settled_full = window.tokens_in_window >= key.tpm_limit
            return Refusal(
                RATE_LIMIT_EXCEEDED,
                f"rate limit reached: {key.tpm_limit} tokens per minute for this API key "
                f"({window.tokens_in_window} used in the last minute, {reserved} reserved in flight); retry later",
                self._tokens_retry_after(window, key.tpm_limit, now_s) if settled_full else IN_FLIGHT_RETRY_AFTER_S,
            )
        return None

    @staticmethod
    def _tokens_retry_after(window: _KeyWindow, tpm_limit: int, now_s: float) -> int:
        """Return seconds until enough of the window's tokens expire to bring it under `tpm_limit`."""
        remaining = window.tokens_in_window
        for stamp_s, tokens in window.tokens:
            remaining -= tokens
            if remaining < tpm_limit:
                return _retry_after(stamp_s, now_s)
        return 1

    def settle(self, key_id: int, reserved: int, tokens: int) -> None:
        """Replace a request's reservation (`reserved`, 0 when it reserved none) by the `tokens` it used: they go
        into the key's last minute and its lifetime total."""
        now_s = self._clock()
        window = self._window(key_id, now_s)
        window.reserved_tokens -= reserved
        if tokens <= 0:
            return
        window.tokens.append((now_s, tokens))
        window.tokens_in_window += tokens
        if window.used_tokens is not None:
            window.used_tokens += tokens

    def used_tokens(self, key_id: int) -> int | None:
        """Return the key's lifetime token total as this process knows it (None before it is seeded)."""
        window = self._keys.get(key_id)
        return None if window is None else window.used_tokens
