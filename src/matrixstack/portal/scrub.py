"""Secrets out of log lines: Bearer tokens, `sk-...` keys, `api_key` values and the backend keys the portal holds.

`scrub(text)` returns `text` with each secret replaced by `[redacted]`: what follows `Bearer ` (any case), an
`sk-` key of 16 characters or more (a 12-character key prefix, which the request log shows to tell keys apart,
stays), the value of an `api_key`/`api-key`/`x-api-key` field, and every key `remember_secret` was told (each
backend key the portal opened, `portal.upstream_secrets`), wherever it appears.

`ScrubFilter` is the logging filter that applies it to a record's message and exception text;
`scrub_handlers(logger)` puts one on each handler of a logger (the portal's request log, uvicorn's error log), so
whatever a record carries — a backend's error message, an exception's text — reaches no log in clear.
"""

from __future__ import annotations

import logging
import re
import threading

REDACTED = "[redacted]"
MIN_SECRET_CHARS = 8  # shorter values are not treated as secrets (they would blank ordinary words)
PATTERNS = re.compile(
    r"(?i)(?P<lead>\bbearer\s+|\b(?:x-)?api[-_]?key\W{0,3}\s*[:=]\s*\W{0,2})[^\s\"',;}]+"
    r"|\bsk-[A-Za-z0-9_\-]{16,}"
)
_known: set[str] = set()
_known_pattern: re.Pattern[str] | None = None
_lock = threading.Lock()


def remember_secret(secret: str) -> None:
    """Make `scrub` hide `secret` from now on (a backend key the portal opened)."""
    global _known_pattern
    if len(secret) < MIN_SECRET_CHARS or secret in _known:
        return
    with _lock:
        _known.add(secret)
        _known_pattern = re.compile("|".join(re.escape(s) for s in sorted(_known, key=len, reverse=True)))


def _redact(match: re.Match[str]) -> str:
    return (match.group("lead") or "") + REDACTED


def scrub(text: str) -> str:
    """Return `text` with every secret it holds replaced by `[redacted]` (see the module docstring)."""
    known = _known_pattern
    if known is not None:
        text = known.sub(REDACTED, text)
    return PATTERNS.sub(_redact, text)


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
