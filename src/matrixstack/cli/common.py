"""Helpers shared by the CLI sub-commands: printing JSON, writing to `--out` or stdout, and turning user errors into
exit code 2."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from matrixstack.errors import UserError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors_exit_2(func: F) -> F:
    """Return `func` wrapped so that a UserError prints `error: ...` on stderr and exits with code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def print_json(data: Any) -> None:
    """Print `data` as indented JSON on stdout (no Rich markup, safe to pipe)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_out(text: str, out: Path | None) -> bool:
    """Write `text` to the file `out`, or to stdout when `out` is None; return True when it went to the file.
    UserError when the file cannot be written."""
    if out is None:
        sys.stdout.write(text)
        return False
    try:
        out.write_text(text)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write it ({exc.strerror}); pick a writable path") from None
    return True
