"""Load pydantic specs from YAML with errors that name the file, the field and the expected unit.

Used by every layer that reads a spec (fabric, arch, shapes). A built-in name is looked up in a package catalog
folder; anything that looks like a path is read from disk. `Strict` is the base of every spec model: an unknown field
is an error (a typo must not pass silently).

Bounded on hostile files: a spec file is read up to `MAX_SPEC_BYTES` (so /dev/zero or a huge file fails at once),
must be UTF-8, and YAML is read by `safe_load`, yaml.safe_load refusing more than `MAX_YAML_ALIASES` aliases (a
"billion laughs" file); a bad value is echoed shortened (`reprlib`), never whole. Each is a SpecError (exit 2).
`read_bounded_text` is the same bounded UTF-8 read under another cap, for files that are not specs (datasets).
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from matrixstack.errors import SpecError, UnknownNameError

MAX_SPEC_BYTES = 4 * 2**20  # the biggest built-in spec is a few KiB; a shape of hundreds of deployments ~100 KiB
MAX_YAML_ALIASES = 100  # YAML anchors are handy for a few repeated blocks, not for exponential expansion
_SHORT = reprlib.Repr()  # how a bad value is echoed: a few levels and items, strings cut (Python 3.11: no kwargs)
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 2, 4, 4, 4
_SHORT.maxstring = _SHORT.maxother = 60

SpecT = TypeVar("SpecT", bound=BaseModel)


class Strict(BaseModel):
    """Base of every spec model: unknown fields are an error (a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid")


def catalog_names(package: str) -> list[str]:
    """Return the sorted names of the built-in YAML specs in a catalog package."""
    folder = resources.files(package)
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def looks_like_path(name_or_path: str) -> bool:
    """Return True when the argument should be read as a file path rather than a built-in name."""
    return name_or_path.endswith((".yaml", ".yml", ".json")) or "/" in name_or_path or Path(name_or_path).is_file()


def read_text(path: Path, source: str, missing_hint: str) -> str:
    """Return the text of the file `source` names at `path`; SpecError when it is missing (with `missing_hint`, how
    to fix it) or unreadable."""
    return read_bounded_text(path, source, missing_hint, MAX_SPEC_BYTES, "far more than any spec; check the path")


def read_bounded_text(path: Path, source: str, missing_hint: str, max_bytes: int, too_big_hint: str) -> str:
    """Return the UTF-8 text of the file `source` names at `path`, read up to `max_bytes` (so /dev/zero fails at
    once); SpecError when it is missing (with `missing_hint`), unreadable, larger (with `too_big_hint`) or not UTF-8."""
    try:
        with open(path, "rb") as file:
            data = file.read(max_bytes + 1)
    except FileNotFoundError:
        raise SpecError(f"{source} does not exist; {missing_hint}") from None
    except OSError as exc:
        raise SpecError(f"cannot read {source}: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise SpecError(f"{source} is larger than {max_bytes // 2**20} MiB, {too_big_hint}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"{source} is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); save it as UTF-8"
        ) from None


class _BoundedSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a document with more than MAX_YAML_ALIASES aliases."""

    aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_YAML_ALIASES} aliases (*name); write the values out", mark
                )
        return super().compose_node(parent, index)


def safe_load(text: str) -> Any:
    """Return the YAML document in `text` as yaml.safe_load does; yaml.YAMLError (with its line) when it is
    malformed or holds more than MAX_YAML_ALIASES aliases."""
    return yaml.load(text, Loader=_BoundedSafeLoader)  # noqa: S506 - a SafeLoader subclass


def malformed_yaml(exc: yaml.YAMLError, source: str) -> SpecError:
    """Return the error of a file that is not valid YAML, naming `source`, the line and column, and the problem."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return SpecError(f"{source}: malformed YAML{where}: {problem}")


def malformed_json(exc: json.JSONDecodeError, source: str) -> SpecError:
    """Return the error of a file that is not valid JSON, naming `source`, the line and column, and the problem."""
    return SpecError(f"{source}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")


def read_mapping(
    path: Path, source: str, missing_hint: str, load: Callable[[str], Any], expected: str
) -> dict[str, Any]:
    """Return the mapping `load` (yaml.safe_load or json.loads) reads from the file `source` names at `path`;
    SpecError naming the file when it is missing, malformed (with the line), or not `expected` (a mapping)."""
    text = read_text(path, source, missing_hint)
    try:
        data = load(text)
    except yaml.YAMLError as exc:
        raise malformed_yaml(exc, source) from None
    except json.JSONDecodeError as exc:
        raise malformed_json(exc, source) from None
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected {expected}, got {type(data).__name__}")
    return data


def read_yaml(path: Path | str, what: str) -> dict[str, Any]:
    """Return the mapping at the top of a YAML file, or raise SpecError naming the file and the line."""
    path = Path(path)
    hint = "give a built-in name or an existing YAML path"
    return read_mapping(path, f"{what} file {path}", hint, safe_load, "a mapping of fields at the top")


def _field_hint(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """Return the description (type and unit) of the field at `loc`, walking nested models."""
    current: Any = model
    description = ""
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return description
        info = fields[part]
        description = info.description or ""
        current = _nested_model(info.annotation)
    return description


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """Return the BaseModel inside an annotation like Model, list[Model], Model | None, dict[str, Model]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    """Return a readable multi-line message: one line per bad field with its expected type and unit."""
    lines = [f"{source}: {exc.error_count()} invalid field(s)"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        field = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
        hint = _field_hint(model, loc)
        got = err.get("input")
        got_text = "" if err["type"] == "missing" else f" (got {_SHORT.repr(got)})"
        expected = f"; expected {hint}" if hint else ""
        lines.append(f"  - {field or '<top>'}: {err['msg']}{got_text}{expected}")
    return "\n".join(lines)


def validate_spec(model: type[SpecT], data: dict[str, Any], source: str) -> SpecT:
    """Return `data` validated as `model`, or raise SpecError listing each bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, model, source)) from None


def load_spec(
    model: type[SpecT], name_or_path: str, package: str, what: str, other_names: tuple[str, ...] = ()
) -> SpecT:
    """Return a spec by built-in name (from `package`) or by YAML path; SpecError/UnknownNameError on bad input.

    `other_names` are names the caller resolves itself (such as the `local` fabric), listed in the error.
    """
    if looks_like_path(name_or_path):
        return validate_spec(model, read_yaml(name_or_path, what), f"{what} file {name_or_path}")
    if name_or_path not in catalog_names(package):
        names = sorted([*catalog_names(package), *other_names])
        raise UnknownNameError(
            f"unknown {what} {name_or_path!r}; built-in {what}s: {', '.join(names)} (or give a path to a YAML file)"
        )
    path = resources.files(package) / f"{name_or_path}.yaml"
    with resources.as_file(path) as real_path:
        return validate_spec(model, read_yaml(real_path, what), f"built-in {what} {name_or_path}")
