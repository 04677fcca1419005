"""Turn a Hugging Face `config.json` (a local file; nothing is downloaded) into an arch YAML.

Supported `model_type`s: deepseek_v2, deepseek_v3 (MLA + DeepSeek MoE), glm4_moe (GQA + DeepSeek MoE), qwen3_moe,
mixtral (MoE), qwen2, qwen3, llama (dense GQA/MHA). Configs written by transformers 5 (`rope_parameters`,
`dtype`) read as well as older ones (`rope_theta`, `torch_dtype`). The YAML names, in a comment on every line,
the config.json field each figure comes from, so it reads like a built-in catalog file and loads back with
`load_arch(PATH)`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from matrixstack.arch.spec import Arch
from matrixstack.errors import SpecError, UserError
from matrixstack.specio import read_mapping, validate_spec

_MISSING = object()
_COMMENT_COLUMN = 36
_TORCH_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class Sourced:
    """A value for the arch YAML and the note saying where in config.json it comes from."""

    value: Any
    note: str


class ConfigReader:
    """Reads fields of one config.json, each returned with its source note; a missing field is a SpecError."""

    def __init__(self, config: dict[str, Any], path: str) -> None:
        self.config = config
        self.path = path

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        """Return config[key], `default` when absent, or raise SpecError naming the file and the field."""
        value = self.config.get(key, default)
        if value is _MISSING:
            model_type = self.config.get("model_type")
            raise SpecError(f"config {self.path}: field {key!r} is missing (needed for model_type {model_type!r})")
        return value

    def count(self, key: str, default: Any = _MISSING, minimum: int = 1) -> int:
        """Return config[key] (or `default`) as an integer >= `minimum`, or raise SpecError naming the field."""
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise SpecError(f"config {self.path}: field {key!r} is {value!r}; expected an integer >= {minimum}")
        return value

    def take(self, key: str, default: Any = _MISSING) -> Sourced:
        """Return config[key] with the note `config.json "key"` (noting when the default was used)."""
        if key in self.config:
            return Sourced(self.config[key], f'config.json "{key}"')
        return Sourced(self.raw(key, default), f'config.json "{key}" absent: default')

    def head_dim(self) -> Sourced:
        """Return the per-head dims: "head_dim" when present, else hidden_size / num_attention_heads."""
        if self.config.get("head_dim") is not None:
            return self.take("head_dim")
        hidden, heads = self.count("hidden_size"), self.count("num_attention_heads")
        return Sourced(hidden // heads, 'config.json "hidden_size" / "num_attention_heads"')

    def native_dtype(self) -> Sourced:
        """Return the released weight dtype: fp8 for an fp8 quantization_config, else from "torch_dtype"."""
        quant = self.config.get("quantization_config") or {}
        if quant.get("quant_method") == "fp8":
            return Sourced("fp8", 'config.json "quantization_config" "quant_method": "fp8"')
        field = "torch_dtype" if "torch_dtype" in self.config else "dtype"
        torch_dtype = self.config.get(field, "bfloat16")
        if torch_dtype not in _TORCH_DTYPES:
            raise SpecError(
                f"config {self.path}: field {field!r} is {torch_dtype!r}; expected one of {', '.join(_TORCH_DTYPES)}"
            )
        return Sourced(_TORCH_DTYPES[torch_dtype], f'config.json "{field}": "{torch_dtype}"')

    def rope_theta(self) -> Sourced:
        """Return the RoPE base: "rope_theta", else "rope_parameters" "rope_theta" (transformers 5), else 1e4."""
        rope = self.config.get("rope_parameters") or {}
        if "rope_theta" not in self.config and "rope_theta" in rope:
            return Sourced(rope["rope_theta"], 'config.json "rope_parameters" "rope_theta"')
        return self.take("rope_theta", 10000.0)

    def common(self) -> dict[str, Any]:
        """Return the top-level fields every family shares (name and attention/ffn are added by the caller)."""
        return {
            "hidden_size": self.take("hidden_size"),
            "layers": self.take("num_hidden_layers"),
            "vocab_size": self.take("vocab_size"),
            "tie_embeddings": self.take("tie_word_embeddings", False),
            "mtp_layers": self.take("num_nextn_predict_layers", 0),
            "native_dtype": self.native_dtype(),
            "rope_theta": self.rope_theta(),
            "max_position_embeddings": self.take("max_position_embeddings"),
            "rms_norm_eps": self.take("rms_norm_eps"),
        }

    def gqa_attention(self, qkv_bias: Sourced, qk_norm: Sourced) -> dict[str, Any]:
        """Return an MHA/GQA attention block from num_attention_heads / num_key_value_heads / head_dim."""
        heads = self.count("num_attention_heads")
        kv_heads = self.take("num_key_value_heads", heads)
        kind = "mha" if kv_heads.value == heads else "gqa"
        return {
            "kind": Sourced(
                kind, f'config.json "num_key_value_heads" {"==" if kind == "mha" else "<"} "num_attention_heads"'
            ),
            "heads": self.take("num_attention_heads"),
            "kv_heads": kv_heads,
            "head_dim": self.head_dim(),
            "qkv_bias": qkv_bias,
            "qk_norm": qk_norm,
        }


def _deepseek(cfg: ConfigReader) -> dict[str, Any]:
    nope, rope = cfg.count("qk_nope_head_dim"), cfg.count("qk_rope_head_dim")
    attention = {
        "kind": Sourced("mla", "DeepSeek multi-head latent attention"),
        "heads": cfg.take("num_attention_heads"),
        "kv_heads": Sourced(cfg.count("num_attention_heads"), 'config.json "num_attention_heads" (MLA: one per head)'),
        "head_dim": Sourced(nope + rope, 'config.json "qk_nope_head_dim" + "qk_rope_head_dim"'),
        "qkv_bias": cfg.take("attention_bias", False),
        "qk_norm": Sourced(False, "no per-head q/k norm in DeepSeek attention"),
        "mla": {
            "q_lora_rank": cfg.take("q_lora_rank", None),
            "kv_lora_rank": cfg.take("kv_lora_rank"),
            "qk_nope_head_dim": cfg.take("qk_nope_head_dim"),
            "qk_rope_head_dim": cfg.take("qk_rope_head_dim"),
            "v_head_dim": cfg.take("v_head_dim"),
        },
    }
    moe: Any = Sourced(None, 'config.json "n_routed_experts" is null: dense model')
    if cfg.raw("n_routed_experts", None):
        layers, first_dense = cfg.count("num_hidden_layers"), cfg.count("first_k_dense_replace", 0, minimum=0)
        freq = cfg.count("moe_layer_freq", 1)
        dense = [i for i in range(layers) if i < first_dense or i % freq]
        moe = {
            "routed_experts": cfg.take("n_routed_experts"),
            "experts_per_token": cfg.take("num_experts_per_tok"),
            "shared_experts": cfg.take("n_shared_experts", 0),
            "expert_intermediate": cfg.take("moe_intermediate_size"),
            "gating": cfg.take("scoring_func", "softmax"),
            "groups": cfg.take("n_group", 1),
            "topk_groups": cfg.take("topk_group", 1),
            "norm_topk_prob": cfg.take("norm_topk_prob", False),
            "routed_scaling_factor": cfg.take("routed_scaling_factor", 1.0),
            "dense_layers": Sourced(
                dense, f'config.json "first_k_dense_replace": {first_dense}, "moe_layer_freq": {freq}'
            ),
        }
    return {"attention": attention, "ffn": {"dense_intermediate": cfg.take("intermediate_size"), "moe": moe}}


def _glm4_moe(cfg: ConfigReader) -> dict[str, Any]:
    attention = cfg.gqa_attention(cfg.take("attention_bias", False), cfg.take("use_qk_norm", False))
    first_dense = cfg.count("first_k_dense_replace", 1, minimum=0)
    moe = {
        "routed_experts": cfg.take("n_routed_experts", 128),
        "experts_per_token": cfg.take("num_experts_per_tok", 8),
        "shared_experts": cfg.take("n_shared_experts", 1),
        "expert_intermediate": cfg.take("moe_intermediate_size"),
        "gating": Sourced("sigmoid", "GLM-4.5 router: sigmoid with a score-correction bias"),
        "groups": cfg.take("n_group", 1),
        "topk_groups": cfg.take("topk_group", 1),
        "norm_topk_prob": cfg.take("norm_topk_prob", True),
        "routed_scaling_factor": cfg.take("routed_scaling_factor", 1.0),
        "dense_layers": Sourced(list(range(first_dense)), f'config.json "first_k_dense_replace": {first_dense}'),
    }
    return {"attention": attention, "ffn": {"dense_intermediate": cfg.take("intermediate_size"), "moe": moe}}


def _qwen3_moe(cfg: ConfigReader) -> dict[str, Any]:
    attention = cfg.gqa_attention(cfg.take("attention_bias", False), Sourced(True, "Qwen3 q_norm / k_norm"))
    layers, step = cfg.count("num_hidden_layers"), cfg.count("decoder_sparse_step", 1)
    mlp_only = cfg.raw("mlp_only_layers", [])
    if not isinstance(mlp_only, list):
        raise SpecError(f"config {cfg.path}: field 'mlp_only_layers' is {mlp_only!r}; expected a list of layer indices")
    dense = [i for i in range(layers) if i in mlp_only or (i + 1) % step]
    moe = {
        "routed_experts": cfg.take("num_experts"),
        "experts_per_token": cfg.take("num_experts_per_tok"),
        "shared_experts": Sourced(0, "no shared experts in Qwen3 MoE"),
        "expert_intermediate": cfg.take("moe_intermediate_size"),
        "gating": Sourced("softmax", "Qwen3 MoE router: softmax"),
        "groups": Sourced(1, "no group-limited routing"),
        "topk_groups": Sourced(1, "no group-limited routing"),
        "norm_topk_prob": cfg.take("norm_topk_prob", False),
        "routed_scaling_factor": Sourced(1.0, "no routed scaling"),
        "dense_layers": Sourced(dense, f'config.json "mlp_only_layers": {mlp_only}, "decoder_sparse_step": {step}'),
    }
    return {"attention": attention, "ffn": {"dense_intermediate": cfg.take("intermediate_size"), "moe": moe}}


def _mixtral(cfg: ConfigReader) -> dict[str, Any]:
    attention = cfg.gqa_attention(Sourced(False, "no biases in Mixtral attention"), Sourced(False, "no q/k norm"))
    moe = {
        "routed_experts": cfg.take("num_local_experts"),
        "experts_per_token": cfg.take("num_experts_per_tok"),
        "shared_experts": Sourced(0, "no shared experts in Mixtral"),
        "expert_intermediate": cfg.take("intermediate_size"),
        "gating": Sourced("softmax", "Mixtral router: softmax"),
        "groups": Sourced(1, "no group-limited routing"),
        "topk_groups": Sourced(1, "no group-limited routing"),
        "norm_topk_prob": Sourced(True, "Mixtral renormalises the top-k weights"),
        "routed_scaling_factor": Sourced(1.0, "no routed scaling"),
        "dense_layers": Sourced([], "every Mixtral layer is MoE"),
    }
    return {"attention": attention, "ffn": {"dense_intermediate": Sourced(None, "no dense layers"), "moe": moe}}


def _dense(qkv_bias: Callable[[ConfigReader], Sourced], qk_norm: bool) -> Callable[[ConfigReader], dict[str, Any]]:
    def build(cfg: ConfigReader) -> dict[str, Any]:
        norm_note = "q_norm / k_norm" if qk_norm else "no per-head q/k norm"
        attention = cfg.gqa_attention(qkv_bias(cfg), Sourced(qk_norm, norm_note))
        return {
            "attention": attention,
            "ffn": {"dense_intermediate": cfg.take("intermediate_size"), "moe": Sourced(None, "dense model")},
        }

    return build


FAMILIES: dict[str, Callable[[ConfigReader], dict[str, Any]]] = {
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
    "glm4_moe": _glm4_moe,
    "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral,
    "qwen2": _dense(lambda cfg: Sourced(True, "Qwen2 always has q/k/v biases"), qk_norm=False),
    "qwen3": _dense(lambda cfg: cfg.take("attention_bias", False), qk_norm=True),
    "llama": _dense(lambda cfg: cfg.take("attention_bias", False), qk_norm=False),
}


def read_hf_config(path: Path | str) -> dict[str, Any]:
    """Return the JSON object in a config.json file, or raise SpecError naming the file and the problem."""
    path = Path(path)
    hint = "give the path to a Hugging Face config.json"
    return read_mapping(path, f"config file {path}", hint, json.loads, "a JSON object of fields")


def default_name(path: Path | str) -> str:
    """Return the arch name for a config file: its stem, or its folder's name when the file is config.json."""
    path = Path(path).resolve()
    stem = path.parent.name if path.stem == "config" else path.stem
    return stem.lower()


def sourced_arch(config: dict[str, Any], name: str, path: str) -> dict[str, Any]:
    """Return the arch fields (as Sourced values in nested dicts) for a config.json of a supported family."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(
            f"config {path}: model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}"
        )
    cfg = ConfigReader(config, path)
    tree: dict[str, Any] = {
        "name": Sourced(name, "--name, or the config file's name"),
        "source": Sourced(
            f"Hugging Face config.json ({Path(path).name}, model_type {model_type})",
            "the file this arch was imported from",
        ),
    }
    tree.update(cfg.common())
    tree.update(FAMILIES[model_type](cfg))
    return tree


def plain_values(tree: Sourced | dict[str, Any]) -> Any:
    """Return `tree` with every Sourced leaf replaced by its value."""
    if isinstance(tree, Sourced):
        return tree.value
    return {key: plain_values(value) for key, value in tree.items()}


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf).removesuffix("...\n").strip()


def _yaml_lines(tree: dict[str, Any], indent: int) -> list[str]:
    lines = []
    for key, value in tree.items():
        prefix = " " * indent + f"{key}:"
        if isinstance(value, dict):
            lines.append(prefix)
            lines.extend(_yaml_lines(value, indent + 2))
        else:
            text = f"{prefix} {_yaml_scalar(value.value)}"
            lines.append(f"{text:<{_COMMENT_COLUMN - 2}}  # {value.note}")
    return lines


def import_hf_config(path: Path | str, name: str | None = None) -> tuple[Arch, str]:
    """Return the arch a config.json describes and its YAML text (with a source comment on every figure).

    Raises SpecError for an unreadable file, a missing field or a figure that does not validate, and UserError
    for an unsupported model_type.
    """
    config = read_hf_config(path)
    name = name or default_name(path)
    tree = sourced_arch(config, name, str(path))
    arch = validate_spec(Arch, plain_values(tree), f"arch imported from config {path}")
    header = [
        f"# {name}: imported by `matrixstack arch import` from {Path(path).name}",
        f'# (config.json "model_type": "{config["model_type"]}"). Each comment names the config.json field.',
    ]
    return arch, "\n".join([*header, *_yaml_lines(tree, 0)]) + "\n"
