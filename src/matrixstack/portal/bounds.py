"""Bounds on what a client sends that the portal stores or logs, so no request can grow the database or the log
by more than a small, fixed amount.

`MODEL_MAX_CHARS` (256) is the longest `model` the portal takes: a longer one is refused with a 400
`string_above_max_length` naming `model` (`model_too_long`), as OpenAI refuses over-long strings; shorter unknown names
get their 404 but are stored in usage as the one unknown bucket (gateway.py), never verbatim. `bounded(text)`
shortens any other client text (a name, an error message that quotes the request) to `LOGGED_MAX_CHARS` before it
is logged, saying how much was cut.
"""

from __future__ import annotations

MODEL_MAX_CHARS = 256
LOGGED_MAX_CHARS = 512


def model_too_long(model: str) -> str | None:
    """Return the 400 message for a `model` longer than MODEL_MAX_CHARS; None when it is within the bound."""
    if len(model) <= MODEL_MAX_CHARS:
        return None
    return (
        f"Invalid 'model': string too long. Expected a string with maximum length {MODEL_MAX_CHARS}, but got a "
        f"string with length {len(model)} instead."
    )


def bounded(text: str | None, max_chars: int = LOGGED_MAX_CHARS) -> str | None:
    """Return `text` cut to `max_chars` characters, saying how many more there were (None stays None)."""
    if text is None or len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}... ({len(text) - max_chars} more characters)"
