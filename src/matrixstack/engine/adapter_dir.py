"""Adapters by name on disk, without torch (the engine's admission checks, which may run in a body-pool child, ask
it whether a request's `model` is an adapter).

A name is 1-128 letters, digits, '.', '_' or '-', not starting with '.', so it can never leave the adapter folder
(no '/', no '..'). Its folder is the one given for it (`EngineConfig.lora_modules`, vLLM's `--lora-modules
name=DIR`), else `<adapters_dir>/<name>/` (default `<data dir>/adapters`, `default_adapters_dir`): an adapter written
there (`matrixstack tune`) is served on its first request, without a restart. Unknown names raise `UnknownAdapter`
(HTTP 404 model_not_found).
"""

from __future__ import annotations

import re
from pathlib import Path

from matrixstack.engine.config import EngineConfig
from matrixstack.errors import UserError
from matrixstack.paths import data_dir

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
ADAPTERS_SUBDIR = "adapters"
CONFIG_FILE = "adapter_config.json"  # PEFT's: a folder holding one is an adapter


class UnknownAdapter(UserError):
    """An adapter name this engine cannot find (HTTP 404 model_not_found)."""


def default_adapters_dir() -> Path:
    """Return where adapters live by name when no folder is configured: <data dir>/adapters."""
    return data_dir() / ADAPTERS_SUBDIR


class AdapterDirectory:
    """Adapter names -> PEFT folders: the configured `modules` first, then `<root>/<name>/` (module docstring)."""

    def __init__(self, modules: dict[str, str], root: str | Path | None):
        for name in modules:
            self._check_name(name)
        self.modules = {name: Path(folder) for name, folder in modules.items()}
        self.root = Path(root) if root is not None else default_adapters_dir()

    @classmethod
    def of(cls, config: EngineConfig) -> AdapterDirectory:
        """Return the directory an engine config names (`lora_modules`, `adapters_dir`)."""
        return cls(config.lora_modules, config.adapters_dir)

    @staticmethod
    def _check_name(name: str) -> None:
        if not ADAPTER_NAME.match(name):
            raise UnknownAdapter(
                f"{name!r} is not an adapter name: use 1-128 letters, digits, '.', '_' or '-', not starting with '.'"
            )

    def folder(self, name: str) -> Path:
        """Return the folder of adapter `name`; UnknownAdapter when the name is invalid or has no folder."""
        self._check_name(name)
        folder = self.modules.get(name, self.root / name)
        if not folder.is_dir():
            raise UnknownAdapter(f"no adapter {name!r}: {folder} does not exist (see GET /v1/models)")
        return folder

    def names(self) -> list[str]:
        """Return the adapters that can be asked for: the configured ones and the folders under the root that hold
        an adapter_config.json, sorted."""
        found = set(self.modules)
        if self.root.is_dir():
            found |= {p.name for p in self.root.iterdir() if ADAPTER_NAME.match(p.name) and (p / CONFIG_FILE).is_file()}
        return sorted(found)
