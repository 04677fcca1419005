"""Catalog entries and their backends as pydantic specs, read from YAML/JSON files, and key limits.

An entry is what a user calls (`model` in an OpenAI request). L0 is a foundation model with a backend; L1 an
industry model derived from an L0 (system prompt, knowledge, adapter, parameters); L2 a scenario model derived
from an L1 or an L0 (prompt, defaults, allowed ranges, stop strings). Each entry validates on its own here;
the rules between entries (the parent exists and has the right level) are `catalog_service`'s, which sees them all.
A backend's `api_key` is a secret as given, or `env:NAME` (how it is stored and used: `portal.upstream_secrets`);
`EntrySpec.view()` never shows a key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import Field, field_validator, model_validator

from matrixstack.errors import SpecError, UserError
from matrixstack.specio import Strict, malformed_json, malformed_yaml, read_text, safe_load, validate_spec

Level = Literal["L0", "L1", "L2"]
Provider = Literal["first-party", "third-party"]
PARAMETERS = ("temperature", "top_p", "max_tokens", "presence_penalty", "frequency_penalty", "top_k", "seed")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
ENV_PREFIX = "env:"  # an api_key `env:NAME` is the portal's environment variable NAME (portal.upstream_secrets)
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PARENT_LEVELS: dict[str, tuple[str, ...]] = {"L0": (), "L1": ("L0",), "L2": ("L1", "L0")}


class UnknownEntry(UserError):
    """A catalog entry that does not exist, or that the asking tenant may not see (HTTP 404 model_not_found)."""


class BackendSpec(Strict):
    """Where an L0 entry's requests go: a builtin-engine deployment, an upstream OpenAI API, or a vLLM server."""

    kind: Literal["engine", "upstream", "vllm"] = Field(description="engine, upstream or vllm")
    url: str = Field(description="OpenAI base URL including /v1, e.g. http://127.0.0.1:8001/v1")
    model: str | None = Field(None, description="model id sent to the backend (default: see backend_model)")
    api_key: str | None = Field(
        None,
        repr=False,
        description="the backend's own secret: stored sealed, never shown; or env:NAME, the portal's environment "
        "variable NAME, read when it calls the backend",
    )
    deployment: str | None = Field(None, description="engine/vllm: the deployment's name")
    adapters: bool = Field(False, description="the backend serves adapters by name (vLLM --enable-lora)")

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"url {url!r} is not an http(s) URL; give the OpenAI base URL, e.g. http://HOST:PORT/v1")
        return url.rstrip("/")

    @field_validator("api_key")
    @classmethod
    def _env_name(cls, api_key: str | None) -> str | None:
        if api_key is not None and api_key.startswith(ENV_PREFIX):
            if not ENV_NAME_PATTERN.match(api_key[len(ENV_PREFIX) :]):
                raise ValueError(
                    f"api_key {api_key!r}: after env: comes an environment variable's name, e.g. env:OPENAI_API_KEY"
                )
        return api_key

    @model_validator(mode="after")
    def _deployment_kind(self) -> BackendSpec:
        if self.deployment is not None and self.kind == "upstream":
            raise ValueError("deployment: an upstream backend has no deployment; drop it or use kind engine/vllm")
        return self


def _check_parameter_names(names: list[str] | Any, field: str) -> None:
    unknown = sorted(set(names) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"{field}: unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(PARAMETERS)}")


class EntrySpec(Strict):
    """A catalog entry: name, level, parent, provider, owner, backend (L0 only) and the settings it applies."""

    name: str = Field(description="[A-Za-z0-9._:-]{1,128}: what users put in `model`")
    level: Level = Field(description="L0 (foundation), L1 (industry) or L2 (scenario)")
    parent: str | None = Field(None, description="L0: none; L1: an L0 entry; L2: an L1 or L0 entry")
    provider: Provider = Field("first-party", description="first-party or third-party")
    owner: str | None = Field(None, description="tenant name for a private entry; none = public")
    description: str = ""
    backend: BackendSpec | None = Field(None, description="required on L0, forbidden on L1/L2")
    system_prompt: str | None = None
    knowledge: list[str] = Field(default_factory=list, description="passages appended to the system message")
    adapter: str | None = Field(None, description="adapter name passed to backends with adapters: true")
    parameters: dict[str, float | int] = Field(
        default_factory=dict, description=f"default values of {', '.join(PARAMETERS)}"
    )
    parameter_ranges: dict[str, tuple[int | float, int | float]] = Field(
        default_factory=dict, description="allowed [min, max] per parameter"
    )
    stop: list[str] = Field(default_factory=list, description="stop strings added to every request")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not NAME_PATTERN.match(name):
            raise ValueError(f"name {name!r} is not allowed: use 1-128 letters, digits, '.', '_', ':' or '-'")
        return name

    @model_validator(mode="after")
    def _rules(self) -> EntrySpec:
        if self.level == "L0" and self.parent is not None:
            raise ValueError(f"parent: an L0 entry is a foundation model and has no parent; drop {self.parent!r}")
        if self.level != "L0" and self.parent is None:
            wanted = " or ".join(PARENT_LEVELS[self.level])
            raise ValueError(f"parent: an {self.level} entry needs a parent ({wanted} entry)")
        if self.level == "L0" and self.backend is None:
            raise ValueError("backend: an L0 entry needs a backend (kind engine, upstream or vllm, and url)")
        if self.level != "L0" and self.backend is not None:
            raise ValueError(f"backend: only an L0 entry has a backend; an {self.level} entry uses its L0's")
        _check_parameter_names(self.parameters, "parameters")
        _check_parameter_names(self.parameter_ranges, "parameter_ranges")
        for param, (low, high) in self.parameter_ranges.items():
            if low > high:
                raise ValueError(f"parameter_ranges.{param}: [{low:g}, {high:g}] is empty; write [min, max]")
        for param, value in self.parameters.items():
            low, high = self.parameter_ranges.get(param, (value, value))
            if not low <= value <= high:
                raise ValueError(
                    f"parameters.{param}: default {value:g} is outside its own range [{low:g}, {high:g}]; "
                    "change the default or the range"
                )
        return self

    def view(self) -> dict[str, Any]:
        """Return the entry as JSON-ready data with the backend's api_key shown as "set" (or None, or the `env:NAME`
        it refers to), never the key itself."""
        data = self.model_dump(mode="json")
        if data["backend"] is not None:
            key = self.backend.api_key if self.backend else None
            data["backend"]["api_key"] = key if key is None or key.startswith(ENV_PREFIX) else "set"
        return data


class KeyLimits(Strict):
    """An API key's limits: requests and tokens per minute, and tokens over its life; None = no limit."""

    rpm_limit: int | None = Field(None, ge=1, description="requests per minute")
    tpm_limit: int | None = Field(None, ge=1, description="tokens (prompt + completion) per minute")
    token_quota: int | None = Field(None, ge=1, description="tokens over the key's life")


def parse_entries(data: Any, source: str) -> list[EntrySpec]:
    """Return the entries in `data` (one entry mapping, or a list under `entries:`); SpecError names each bad field."""
    if isinstance(data, dict) and set(data) == {"entries"}:
        items = data["entries"]
        if not isinstance(items, list) or not items:
            raise SpecError(f"{source}: `entries:` must be a non-empty list of entries")
    elif isinstance(data, dict):
        items = [data]
    else:
        got = type(data).__name__
        raise SpecError(f"{source}: expected one entry (a mapping) or `entries:` with a list, got {got}")
    specs = []
    for i, item in enumerate(items):
        where = source if len(items) == 1 else f"{source} entries[{i}]"
        if not isinstance(item, dict):
            raise SpecError(f"{where}: expected a mapping of entry fields, got {type(item).__name__}")
        specs.append(validate_spec(EntrySpec, item, where))
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SpecError(f"{source}: entry name(s) {', '.join(twice)} appear more than once; names must be unique")
    return specs


def load_entries(path: Path | str) -> list[EntrySpec]:
    """Return the entries of a YAML or JSON catalog file; SpecError on a missing, malformed or invalid file."""
    path = Path(path)
    source = f"catalog file {path}"
    text = read_text(path, source, "give the path of a YAML or JSON file")
    try:
        data = json.loads(text) if path.suffix == ".json" else safe_load(text)
    except json.JSONDecodeError as exc:
        raise malformed_json(exc, source) from None
    except yaml.YAMLError as exc:
        raise malformed_yaml(exc, source) from None
    return parse_entries(data, source)
