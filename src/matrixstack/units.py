"""Parse and print quantities with units (bytes)."""

from __future__ import annotations

import re

from matrixstack.errors import UserError

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> float:
    """Return the number of bytes in a size such as '7.5KB', '14 KiB', '64MiB' or '1e6'."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _BYTE_UNITS:
        raise UserError(f"cannot read size {text!r}; use a number with an optional unit: B, KB, MB, GB, KiB, MiB, GiB")
    return float(match.group(1)) * _BYTE_UNITS[unit]


def format_bytes(size: float) -> str:
    """Return a size in bytes as a short human string (binary units)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size:.0f} B"
