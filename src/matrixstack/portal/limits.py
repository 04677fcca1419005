"""Per-key limits of the portal: requests per minute, tokens per minute, and a lifetime token quota.

`KeyLimiter` keeps, per API key, a sliding log of the last minute: one timestamp per admitted request and one
(timestamp, tokens) per finished request. `admit(key)` counts a request against `rpm_limit` when it is admitted
and refuses it while the last 60 s already hold `rpm_limit` requests or `tpm_limit` tokens; `finish(key, tokens)`
adds a finished request's tokens to the minute and to the key's lifetime total. Tokens are known only when a
request ends, so requests already in flight may take a key over its tpm limit once; the next request then waits.

The lifetime total starts from the database (`usage_service.tokens_used(session, key_id)`, read once per key and process
by the caller, outside the event loop, before the key's first request in this process: `needs_seed` / `seed`;
every key is seeded, with or without a quota, so a quota set later counts what came before) and then grows in
memory; over `token_quota` every
request is refused with `insufficient_quota` until an admin raises the quota. A refusal carries `retry_after_s`,
whole seconds until the oldest entry that blocks the key leaves the window (at least 1); for the quota, which
no wait restores, `QUOTA_RETRY_AFTER_S`.

Everything runs on the event loop's thread: no locks. The counts are per portal process; several processes
behind a balancer each enforce the limits on their own share.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

WINDOW_S = 60.0
QUOTA_RETRY_AFTER_S = 3600  # a spent quota comes back only when an admin raises it; tell clients to wait long
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
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (finish time, tokens) in the window
    tokens_in_window: int = 0
    used_tokens: int | None = None  # lifetime total; None until seeded from the database


def _retry_after(oldest_s: float, now_s: float) -> int:
    """Return whole seconds until an entry stamped `oldest_s` leaves the window (at least 1)."""
    return max(1, math.ceil(oldest_s + WINDOW_S - now_s))


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
        if key.token_quota is not None and (window.used_tokens or 0) >= key.token_quota:
            return Refusal(
                INSUFFICIENT_QUOTA,
                f"this API key has used its token quota ({window.used_tokens} of {key.token_quota} tokens); "
                "ask an admin to raise it",
                QUOTA_RETRY_AFTER_S,
            )
        if key.rpm_limit is not None and len(window.requests) >= key.rpm_limit:
            return Refusal(
                RATE_LIMIT_EXCEEDED,
                f"rate limit reached: {key.rpm_limit} requests per minute for this API key; retry later",
                _retry_after(window.requests[-key.rpm_limit] if key.rpm_limit else now_s, now_s),
            )
        if key.tpm_limit is not None and window.tokens_in_window >= key.tpm_limit:
            return Refusal(
                RATE_LIMIT_EXCEEDED,
                f"rate limit reached: {key.tpm_limit} tokens per minute for this API key "
                f"({window.tokens_in_window} used in the last minute); retry later",
                self._tokens_retry_after(window, key.tpm_limit, now_s),
            )
        window.requests.append(now_s)
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

    def finish(self, key_id: int, tokens: int) -> None:
        """Add a finished request's tokens to the key's last minute and its lifetime total."""
        if tokens <= 0:
            return
        now_s = self._clock()
        window = self._window(key_id, now_s)
        window.tokens.append((now_s, tokens))
        window.tokens_in_window += tokens
        if window.used_tokens is not None:
            window.used_tokens += tokens

    def used_tokens(self, key_id: int) -> int | None:
        """Return the key's lifetime token total as this process knows it (None before it is seeded)."""
        window = self._keys.get(key_id)
        return None if window is None else window.used_tokens
