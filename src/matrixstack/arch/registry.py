"""Registered models: local Hugging Face folders (config.json, *.safetensors, tokenizer.json) under a name, each
with the arch imported from its config.json, so the name works wherever an arch is named (`load_arch`).

Nothing is downloaded: a folder is filled beforehand (`huggingface-cli download REPO --local-dir DIR` on a machine
with internet, or `matrixstack model export`). The registry lives under the data directory, one folder per model:
`models/NAME/model.yaml` (the `RegisteredModel` record) and `models/NAME/arch.yaml` (the imported arch, with the
config.json field of each figure in a comment). Removing a model forgets it; its Hugging Face folder is untouched.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from matrixstack.arch.hf_import import FAMILIES, import_hf_config, read_hf_config
from matrixstack.errors import UserError
from matrixstack.paths import data_dir
from matrixstack.specio import Strict, read_yaml, validate_spec

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
RECORD_FILE = "model.yaml"
ARCH_FILE = "arch.yaml"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
FILL_HINT = (
    "fill it on a machine with internet (`huggingface-cli download REPO --local-dir DIR`) or write one with "
    "`matrixstack model export`"
)


class RegisteredModel(Strict, frozen=True):
    """A registered Hugging Face folder: where it is, what it is, and the lanes that can serve it."""

    name: str = Field(description="the name it is used by; also its arch's name")
    folder: str = Field(description="absolute path of the Hugging Face folder")
    architecture: str = Field(description='config.json "architectures"[0], e.g. Glm4MoeForCausalLM')
    model_type: str = Field(description='config.json "model_type"')
    lanes: list[str] = Field(description="lanes that can serve it: engine (the builtin one), vllm")
    engine_blockers: list[str] = Field(default_factory=list, description="why the builtin engine cannot run it")


def models_dir() -> Path:
    """Return the folder holding one sub-folder per registered model."""
    return data_dir() / "models"


def model_names() -> list[str]:
    """Return the sorted names of the registered models."""
    root = models_dir()
    return sorted(p.name for p in root.iterdir() if (p / RECORD_FILE).is_file()) if root.is_dir() else []


def registered_model(name: str) -> RegisteredModel | None:
    """Return the registered model called `name`, or None when there is none."""
    if not NAME_PATTERN.match(name):
        return None
    record = models_dir() / name / RECORD_FILE
    if not record.is_file():
        return None
    return validate_spec(RegisteredModel, read_yaml(record, "model record"), f"model record {record}")


def registered_arch_file(name: str) -> Path | None:
    """Return the imported arch YAML of the registered model `name`, or None when `name` is not one."""
    return models_dir() / name / ARCH_FILE if registered_model(name) is not None else None


def _unsupported(folder: Path, config: dict[str, Any]) -> UserError:
    """Return the error for a config.json whose model_type MatrixStack cannot import, naming the lanes left."""
    kind = f"{(config.get('architectures') or ['?'])[0]} (model_type {config.get('model_type')!r})"
    return UserError(
        f"{folder}: architecture {kind} is not one MatrixStack can import, so neither the builtin engine nor the "
        f"vllm lane can plan it; lanes that could serve it: upstream (run a server for it that speaks OpenAI's API "
        f"and name its URL in a shape). Importable model_types: {', '.join(sorted(FAMILIES))}"
    )


def read_folder(folder: Path, name: str) -> tuple[dict[str, Any], str]:
    """Return (config.json, the arch YAML imported from it under `name`) of a Hugging Face folder; UserError naming
    what is missing and how to fill it, or an unsupported architecture and the lanes that could serve it."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; give a Hugging Face model folder: {FILL_HINT}")
    missing = []
    if not (folder / CONFIG_FILE).is_file():
        missing.append(CONFIG_FILE)
    if not any(folder.glob("*.safetensors")):
        bins = " (it holds *.bin weights: convert them to safetensors)" if any(folder.glob("*.bin")) else ""
        missing.append(f"*.safetensors weights{bins}")
    if not (folder / TOKENIZER_FILE).is_file():
        missing.append(f"{TOKENIZER_FILE} (a fast tokenizer)")
    if missing:
        raise UserError(f"{folder} is not a Hugging Face model folder: it has no {', no '.join(missing)}; {FILL_HINT}")
    config = read_hf_config(folder / CONFIG_FILE)
    if config.get("model_type") not in FAMILIES:
        raise _unsupported(folder, config)
    _, text = import_hf_config(folder / CONFIG_FILE, name)
    return config, text


def register_model(
    name: str, folder: Path, config: dict[str, Any], arch_yaml: str, lanes: list[str], blockers: list[str]
) -> RegisteredModel:
    """Record `folder` as the model `name` with its imported arch YAML and lanes; returns the record. UserError
    when the name is malformed or taken (built-in arch names are the caller's to refuse: they shadow it)."""
    if not NAME_PATTERN.match(name):
        raise UserError(f"--name {name!r}: use lower-case letters, digits, '.', '_' and '-' (e.g. qwen3-8b)")
    if registered_model(name) is not None:
        raise UserError(f"model {name!r} is already registered; `matrixstack model remove {name}` first")
    model = RegisteredModel(
        name=name,
        folder=str(folder.resolve()),
        architecture=(config.get("architectures") or [config["model_type"]])[0],
        model_type=config["model_type"],
        lanes=lanes,
        engine_blockers=blockers,
    )
    home = models_dir() / name
    home.mkdir(parents=True, exist_ok=True)
    (home / ARCH_FILE).write_text(arch_yaml)
    (home / RECORD_FILE).write_text(yaml.safe_dump(model.model_dump(), sort_keys=False))
    return model


def remove_model(name: str) -> None:
    """Forget the registered model `name` (its Hugging Face folder stays); returns None."""
    shutil.rmtree(models_dir() / name)
