"""Where MatrixStack keeps its state on this machine."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """Return MatrixStack's data directory: $MATRIXSTACK_HOME, else $XDG_DATA_HOME/matrixstack, else ~/.local/share."""
    home = os.environ.get("MATRIXSTACK_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "matrixstack"
