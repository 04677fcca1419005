"""A LoRA adapter in memory (`LoraAdapter`) and on disk in PEFT's format (`write_peft`, `read_peft`).

The adapter changes each targeted linear `y = x W^T` of the base model into `y = x W^T + scaling * (x A^T) B^T`
with A [rank, in_features], B [out_features, rank] and `scaling = alpha / rank` (PEFT's LoRA without rsLoRA or
DoRA). Modules are named by the engine's module path (`layers.0.self_attn.q_proj`, Hugging Face's minus the leading
`model.`, see `engine.weights`); `lora_modules(arch)` lists the linears an arch has, with their shapes.

The folder is what `peft` saves (`PeftModel.save_pretrained`) for the Hugging Face export of the base model
(`engine.hf_export`), so `peft` and vLLM load it too:

- `adapter_config.json`: `peft_type` "LORA", `task_type` "CAUSAL_LM", `r`, `lora_alpha`, `target_modules` (PEFT
  short names, e.g. ["q_proj", "v_proj"]), `lora_dropout`, `bias` "none", `fan_in_fan_out` false, `use_rslora`
  false, `use_dora` false, `base_model_name_or_path`, and the other fields PEFT writes at their defaults;
- `adapter_model.safetensors`: `base_model.model.model.<path>.lora_A.weight` [rank, in] and `...lora_B.weight`
  [out, rank] for each module path (the names `peft.get_peft_model_state_dict` gives).

`read_peft` refuses with a `UserError` naming what is wrong and the fix: no folder or no files, not a LoRA
adapter, PEFT options the engine does not apply (rsLoRA, DoRA, per-module ranks, biases, modules_to_save,
fan_in_fan_out), a tensor for a module the arch does not have, a shape that does not fit, a rank over the limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from matrixstack.arch.spec import Arch
from matrixstack.engine.adapter_dir import CONFIG_FILE
from matrixstack.errors import UserError

WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model."  # PeftModel -> the CausalLM's `model` -> the engine's module paths
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
# options PEFT writes whose non-default values the engine does not apply: field -> (value it must have, why)
UNSUPPORTED_OPTIONS = {
    "use_rslora": (False, "rsLoRA scales by alpha / sqrt(r)"),
    "use_dora": (False, "DoRA adds a magnitude vector"),
    "fan_in_fan_out": (False, "fan_in_fan_out stores the base weights transposed"),
    "bias": ("none", "bias trains the base biases"),
    "lora_bias": (False, "lora_bias adds a bias to lora_B"),
    "modules_to_save": (None, "modules_to_save replaces whole modules"),
    "rank_pattern": ({}, "rank_pattern gives modules their own ranks"),
    "alpha_pattern": ({}, "alpha_pattern gives modules their own alphas"),
    "layers_to_transform": (None, "layers_to_transform limits the layers"),
}


@dataclass
class LoraAdapter:
    """A LoRA adapter: `weights` maps an engine module path (`layers.0.self_attn.q_proj`) to (A [rank, in],
    B [out, rank]); `target_modules` are PEFT short names (`q_proj`); the delta is scaling * B @ A."""

    name: str
    rank: int
    alpha: float
    target_modules: list[str]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def scaling(self) -> float:
        """Return the factor of the low-rank delta: alpha / rank."""
        return self.alpha / self.rank


def _ffn_linears(prefix: str, hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """Return the (in, out) of a SwiGLU's gate/up/down projections under `prefix`."""
    return {
        f"{prefix}.gate_proj": (hidden, intermediate),
        f"{prefix}.up_proj": (hidden, intermediate),
        f"{prefix}.down_proj": (intermediate, hidden),
    }


def _attention_linears(arch: Arch) -> dict[str, tuple[int, int]]:
    """Return the (in, out) of one layer's attention projections, by name under `self_attn`."""
    a, hidden = arch.attention, arch.hidden_size
    if a.mla is None:
        q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
        return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden)}
    m = a.mla
    query = (
        {"q_proj": (hidden, a.heads * a.head_dim)}
        if m.q_lora_rank is None
        else {"q_a_proj": (hidden, m.q_lora_rank), "q_b_proj": (m.q_lora_rank, a.heads * a.head_dim)}
    )
    return {
        **query,
        "kv_a_proj_with_mqa": (hidden, m.kv_lora_rank + m.qk_rope_head_dim),
        "kv_b_proj": (m.kv_lora_rank, a.heads * (m.qk_nope_head_dim + m.v_head_dim)),
        "o_proj": (a.heads * m.v_head_dim, hidden),
    }


def lora_modules(arch: Arch) -> dict[str, tuple[int, int]]:
    """Return every linear of `arch` a LoRA adapter may target: engine module path -> (in_features,
    out_features), the decoder layers' projections (attention, dense FFN, routed and shared experts)."""
    hidden, moe = arch.hidden_size, arch.ffn.moe
    modules: dict[str, tuple[int, int]] = {}
    for i in range(arch.layers):
        modules.update({f"layers.{i}.self_attn.{n}": shape for n, shape in _attention_linears(arch).items()})
        if not arch.is_moe_layer(i):
            modules.update(_ffn_linears(f"layers.{i}.mlp", hidden, arch.ffn.dense_intermediate))
            continue
        for e in range(moe.routed_experts):
            modules.update(_ffn_linears(f"layers.{i}.mlp.experts.{e}", hidden, moe.expert_intermediate))
        if moe.shared_experts:
            modules.update(
                _ffn_linears(f"layers.{i}.mlp.shared_experts", hidden, moe.shared_experts * moe.expert_intermediate)
            )
    return modules


def peft_config(adapter: LoraAdapter, base_model_name_or_path: str) -> dict:
    """Return the adapter_config.json (a dict) PEFT writes for `adapter`'s LoraConfig."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "target_modules": sorted(adapter.target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def write_peft(adapter: LoraAdapter, folder: str | Path, base_model_name_or_path: str) -> Path:
    """Write `adapter` as a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors, see the module
    docstring); returns the folder. The weights are written first and the config last, each to a temporary name
    then renamed, so a folder with a config always has its weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, (a, b) in adapter.weights.items():
        tensors[PEFT_PREFIX + path + LORA_A] = a.detach().to("cpu").contiguous()
        tensors[PEFT_PREFIX + path + LORA_B] = b.detach().to("cpu").contiguous()
    partial = folder / f".{WEIGHTS_FILE}.partial"
    save_file(tensors, str(partial), metadata={"format": "pt"})
    partial.replace(folder / WEIGHTS_FILE)
    partial = folder / f".{CONFIG_FILE}.partial"
    partial.write_text(json.dumps(peft_config(adapter, base_model_name_or_path), indent=2) + "\n")
    partial.replace(folder / CONFIG_FILE)
    return folder


def _read_config(folder: Path) -> dict:
    """Return the adapter_config.json of `folder`; UserError when it is missing, unreadable or not LoRA."""
    if not folder.is_dir():
        raise UserError(f"adapter folder {folder} does not exist; give a PEFT LoRA folder (adapter_config.json)")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UserError(
            f"{folder} has no {CONFIG_FILE}: not a PEFT adapter folder; save it with PEFT's save_pretrained"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); write it again with PEFT's save_pretrained") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise UserError(f"{path}: peft_type is {kind!r}, not 'LORA'; only LoRA adapters are served")
    for field, (wanted, why) in UNSUPPORTED_OPTIONS.items():
        if config.get(field) and config[field] != wanted:  # absent, null, false and {} are PEFT's defaults
            raise UserError(
                f"{path}: {field}={config[field]!r} is not supported ({why}); train it with {field}={wanted!r}"
            )
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), int | float) or config[field] <= 0:
            raise UserError(f"{path}: {field} must be a positive number, got {config.get(field)!r}")
    return config


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Return the tensors of `folder`'s adapter_model.safetensors; UserError when missing or unreadable."""
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{folder} has no {WEIGHTS_FILE}; save the adapter with PEFT (safe_serialization=True)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); write the adapter again") from None


def _module_pairs(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Return module path -> {"A": tensor, "B": tensor} from PEFT tensor names; UserError on a foreign name."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        which = "A" if key.endswith(LORA_A) else "B" if key.endswith(LORA_B) else None
        if which is None or not key.startswith(PEFT_PREFIX):
            raise UserError(
                f"{path}: tensor {key!r} is not a LoRA weight of the base model "
                f"(expected {PEFT_PREFIX}<module>{LORA_A} or {LORA_B})"
            )
        pairs.setdefault(key[len(PEFT_PREFIX) : -len(LORA_A)], {})[which] = tensor
    return pairs


def read_peft(folder: str | Path, arch: Arch, max_rank: int, name: str | None = None) -> LoraAdapter:
    """Return the LoRA adapter saved by PEFT (or `write_peft`) in `folder`, for a base model of `arch`, named
    `name` (default: the folder's name); UserError naming what is wrong (module docstring) when it cannot be
    served: no folder, not LoRA, an unsupported option, a module `arch` lacks, a bad shape, rank over `max_rank`."""
    folder = Path(folder)
    config = _read_config(folder)
    rank, path = int(config["r"]), folder / WEIGHTS_FILE
    if rank > max_rank:
        raise UserError(f"adapter {folder.name} has rank {rank}, above the limit {max_rank}; raise --max-lora-rank")
    pairs = _module_pairs(_read_tensors(folder), path)
    if not pairs:
        raise UserError(f"{path} holds no LoRA weights; save the trained adapter again")
    shapes = lora_modules(arch)
    weights = {}
    for module, pair in sorted(pairs.items()):
        if module not in shapes:
            raise UserError(f"{path}: module {module!r} is not a linear of arch {arch.name}; train it for {arch.name}")
        if set(pair) != {"A", "B"}:
            raise UserError(f"{path}: module {module!r} has lora_{next(iter(pair))} without its pair")
        fan_in, fan_out = shapes[module]
        a, b = pair["A"], pair["B"]
        if list(a.shape) != [rank, fan_in] or list(b.shape) != [fan_out, rank]:
            raise UserError(
                f"{path}: module {module!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; arch {arch.name} "
                f"with r={rank} needs [{rank}, {fan_in}] and [{fan_out}, {rank}]"
            )
        weights[module] = (a, b)
    targets = config.get("target_modules")
    if not isinstance(targets, list):  # PEFT also allows a regex; name what the weights actually target
        targets = sorted({module.rsplit(".", 1)[-1] for module in weights})
    return LoraAdapter(name or folder.name, rank, config["lora_alpha"], list(targets), weights)
