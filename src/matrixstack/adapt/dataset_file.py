"""A dataset file: JSONL in one of two shapes, every line validated, and the canonical bytes it is stored as.

Shapes (one per file; the first row decides, a row of the other shape is a bad line):

- `chat`: `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`: a system message only
  first, the last message the assistant's, with content (what a tune job learns to answer);
- `completion`: `{"prompt": str, "completion": str}`, the completion not empty.

No other keys, in a row or a message (a typo must not pass silently). No text may hold one of the engine
tokenizer's special tokens (`<|eos|>`, `<|user|>`, ...): they would be read as the chat template's own markers.
Blank lines are skipped; line numbers are the file's (1-based).

Bounds: the file is read up to `MAX_DATASET_BYTES` and must be UTF-8 (`specio.read_bounded_text`: /dev/zero or a
binary file fails at once), and holds at most `MAX_ROWS` rows. Every line is checked before anything is kept:
`read_dataset` raises one `UserError` naming up to `MAX_REPORTED` bad lines, each as `line N: FIELD: problem`, and
how many more there are.

Canonical bytes: each row as compact JSON (keys sorted, non-ASCII kept as is), one per line, each ended by "\\n".
Its sha256 names the stored file, so the same rows written with other spacing or key order are the same dataset.

Built-in datasets (`builtin_names`, `builtin_path`) are JSONL files shipped in `adapt/builtin/`, made by scripts in
`scripts/` (see the README there).
"""

from __future__ import annotations

import hashlib
import json
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from matrixstack.engine.tokenizer import ROLES, SPECIAL_TOKENS
from matrixstack.errors import UnknownNameError, UserError
from matrixstack.specio import read_bounded_text

MAX_DATASET_BYTES = 64 * 2**20  # far above a LoRA dataset for the models a CPU trains; bounded so RAM is too
MAX_ROWS = 200_000
MAX_REPORTED = 10  # bad lines named in one error; the rest are counted
BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_SUFFIX = ".jsonl"
Shape = Literal["chat", "completion"]
SHAPE_KEYS: dict[str, set[str]] = {"chat": {"messages"}, "completion": {"prompt", "completion"}}
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 40


@dataclass(frozen=True)
class DatasetFile:
    """A validated dataset: its shape, its rows (in file order) and the canonical bytes they are stored as."""

    shape: Shape
    rows: list[dict[str, Any]]
    canonical: bytes

    @property
    def sha256(self) -> str:
        """Return the hex sha256 of the canonical bytes (the stored file's name)."""
        return hashlib.sha256(self.canonical).hexdigest()


def builtin_names() -> list[str]:
    """Return the sorted names of the datasets shipped with MatrixStack."""
    return sorted(p.name.removesuffix(BUILTIN_SUFFIX) for p in BUILTIN_DIR.glob(f"*{BUILTIN_SUFFIX}"))


def builtin_path(name: str) -> Path:
    """Return the file of the shipped dataset `name`; UnknownNameError listing the shipped ones."""
    if name not in builtin_names():
        raise UnknownNameError(f"no built-in dataset {name!r}; built-in datasets: {', '.join(builtin_names())}")
    return BUILTIN_DIR / f"{name}{BUILTIN_SUFFIX}"


def canonical_line(row: dict[str, Any]) -> str:
    """Return `row` as its canonical JSON line (compact, keys sorted, non-ASCII kept), without the newline."""
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def read_dataset(path: Path, source: str | None = None) -> DatasetFile:
    """Return the validated dataset in the JSONL file at `path`; UserError naming every bad line (up to
    MAX_REPORTED) by number and field, or the file's problem (missing, too large, not UTF-8, empty, too many rows)."""
    source = source or f"dataset file {path}"
    text = read_bounded_text(
        path, source, "give the path of a JSONL file", MAX_DATASET_BYTES, "too large for a dataset; split it"
    )
    return parse_dataset(text, source)


def parse_dataset(text: str, source: str) -> DatasetFile:
    """Return the validated dataset in JSONL `text` (see the module docstring); UserError naming the bad lines."""
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    shape: Shape | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row, problem = _parse_line(line)
        if problem is None:
            row_shape = _shape_of(row)
            shape = shape or row_shape
            problem = _row_problem(row, shape)
        if problem is not None:
            problems.append(f"line {number}: {problem}")
        else:
            rows.append(row)
        if len(rows) + len(problems) > MAX_ROWS:
            raise UserError(f"{source} has more than {MAX_ROWS} rows; split it into several datasets")
    if problems:
        shown = problems[:MAX_REPORTED]
        more = f"\n  ... and {len(problems) - len(shown)} more bad line(s)" if len(problems) > len(shown) else ""
        raise UserError(
            f"{source}: {len(problems)} bad line(s), nothing stored:\n  " + "\n  ".join(shown) + more
            + "\n  fix them and add the file again (each line: a chat row {\"messages\": [...]} or a completion row"
            " {\"prompt\": ..., \"completion\": ...})"
        )  # fmt: skip
    if shape is None:
        raise UserError(f"{source} holds no rows; give one JSON object per line")
    canonical = "".join(canonical_line(row) + "\n" for row in rows).encode()
    return DatasetFile(shape=shape, rows=rows, canonical=canonical)


def _parse_line(line: str) -> tuple[dict[str, Any], str | None]:
    """Return (the JSON object of a line, None), or ({}, the problem) when it is not JSON or not an object."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return {}, f"not JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(row, dict):
        return {}, f"expected a JSON object, got {_type(row)}"
    return row, None


def _shape_of(row: dict[str, Any]) -> Shape:
    """Return the shape a row has the keys of (chat unless it has a prompt or completion key)."""
    return "completion" if {"prompt", "completion"} & row.keys() else "chat"


def _row_problem(row: dict[str, Any], shape: Shape) -> str | None:
    """Return `FIELD: problem` for the first thing wrong in a row of a `shape` dataset, None when it is valid."""
    if _shape_of(row) != shape:
        return f"a {_shape_of(row)} row in a {shape} dataset (its first row decides): use one shape per file"
    unknown = sorted(row.keys() - SHAPE_KEYS[shape])
    if unknown:
        return f"{unknown[0]}: unknown field; a {shape} row has only {', '.join(sorted(SHAPE_KEYS[shape]))}"
    if shape == "completion":
        for key in ("prompt", "completion"):
            problem = _text_problem(row.get(key, None), key in row, empty_ok=key == "prompt")
            if problem:
                return f"{key}: {problem}"
        return None
    return _messages_problem(row.get("messages"), "messages" in row)


def _messages_problem(messages: Any, present: bool) -> str | None:
    """Return `FIELD: problem` for the first thing wrong in a chat row's messages, None when they are valid."""
    if not present:
        return 'messages: missing; a chat row is {"messages": [{"role": ..., "content": ...}, ...]}'
    if not isinstance(messages, list) or not messages:
        return f"messages: expected a non-empty list of messages, got {_short(messages)}"
    last = len(messages) - 1
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            return f"{field}: expected an object with role and content, got {_type(message)}"
        unknown = sorted(message.keys() - {"role", "content"})
        if unknown:
            return f"{field}.{unknown[0]}: unknown field; a message has only role and content"
        role = message.get("role")
        if role not in ROLES:
            got = "missing" if "role" not in message else f"{_short(role)} is not one of {', '.join(ROLES)}"
            return f"{field}.role: {got}"
        if role == "system" and i > 0:
            return f"{field}.role: a system message may only come first"
        if i == last and role != "assistant":
            return f"{field}.role: the last message must be the assistant's (the reply to learn), got {role!r}"
        problem = _text_problem(message.get("content"), "content" in message, empty_ok=i != last)
        if problem:
            return f"{field}.content: {problem}"
    return None


def _text_problem(value: Any, present: bool, empty_ok: bool) -> str | None:
    """Return what is wrong with a text field's value, None when it is a string (non-empty unless `empty_ok`)
    without special tokens."""
    if not present:
        return "missing"
    if not isinstance(value, str):
        return f"expected a string, got {_type(value)} {_short(value)}"
    if not value and not empty_ok:
        return "empty; give the text to learn"
    for token in SPECIAL_TOKENS:
        if token in value:
            return f"contains {token}, a special token of the tokenizer; remove it"
    return None


def _type(value: Any) -> str:
    """Return the JSON type name of a parsed value."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    """Return `value` echoed shortened (a hostile line is never echoed whole)."""
    return _SHORT.repr(value)
