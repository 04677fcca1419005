"""Secrets out of log lines: Bearer tokens, `sk-...` keys, `api_key` values and the backend keys the portal holds.

`scrub(text)` returns `text` with each secret replaced by `[redacted]`: what follows `Bearer ` (any case), an
`sk-` key of 16 characters or more (a 12-character key prefix, which the request log shows to tell keys apart,
stays), the value of an `api_key`/`api-key`/`x-api-key` field, and every key `remember_secret` was told (each
backend key the portal opened, `portal.upstream_secrets`), wherever it appears. Each pattern runs only when a
plain substring test finds what it starts with, so an ordinary request log line costs a few microseconds.

`ScrubFilter` is the logging filter that applies it to a record's message and exception text;
`scrub_handlers(logger)` puts one on each handler of a logger (the portal's request log, uvicorn's error log), so
whatever a record carries — a backend's error message, an exception's text — reaches no log in clear.
"""

from __future__ import annotations

import logging
import re

REDACTED = "[redacted]"
MIN_SECRET_CHARS = 8  # shorter values are not treated as secrets (they would blank ordinary words)
BEARER = re.compile(r"([Bb][Ee][Aa][Rr][Ee][Rr]\s+)[^\s\"',;}]+")
SK_KEY = re.compile(r"sk-[A-Za-z0-9_\-]{16,}")
API_KEY = re.compile(r"(?i)((?:x-)?api[-_]?key\W{0,3}\s*[:=]\s*\W{0,2})[^\s\"',;}]+")
_known: tuple[str, ...] = ()


def remember_secret(secret: str) -> None:
    """Make `scrub` hide `secret` from now on (a backend key the portal opened)."""
    global _known
    if len(secret) >= MIN_SECRET_CHARS and secret not in _known:
        _known = tuple(sorted({*_known, secret}, key=len, reverse=True))  # a longer key before its own prefix


def _sk_key(match: re.Match[str]) -> str:
    """Return the replacement of an `sk-` match: redacted, unless it is the end of a word (`disk-...`)."""
    start = match.start()
    return match.group() if start and match.string[start - 1].isalnum() else REDACTED


def scrub(text: str) -> str:
    """Return `text` with every secret it holds replaced by `[redacted]` (see the module docstring)."""
    for secret in _known:
        if secret in text:
            text = text.replace(secret, REDACTED)
    lower = text.lower()
    if "bearer" in lower:
        text = BEARER.sub(rf"\1{REDACTED}", text)
    if "sk-" in text:
        text = SK_KEY.sub(_sk_key, text)
    if "api" in lower and "key" in lower:
        text = API_KEY.sub(rf"\1{REDACTED}", text)
    return text


class ScrubFilter(logging.Filter):
    """A logging filter that scrubs each record's message (formatted with its arguments) and exception text."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Scrub `record` in place and return True (every record passes, scrubbed)."""
        record.msg, record.args = scrub(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


def scrub_handlers(logger: logging.Logger) -> None:
    """Put a ScrubFilter on each handler of `logger` that has none."""
    for handler in logger.handlers:
        if not any(isinstance(f, ScrubFilter) for f in handler.filters):
            handler.addFilter(ScrubFilter())
