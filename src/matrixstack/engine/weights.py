"""Load and save `MoETransformer` weights as safetensors, under Hugging Face tensor names.

Tensor-name map (checkpoint name -> module; `{i}` a layer, `{e}` a routed expert). The checkpoint name is the
module's state-dict name with `model.` in front, except `lm_head.weight`:

| checkpoint tensor                                                | shape                                           |
|------------------------------------------------------------------|-------------------------------------------------|
| `model.embed_tokens.weight`                                      | [vocab, hidden]                                 |
| `model.layers.{i}.input_layernorm.weight`                        | [hidden]                                        |
| `model.layers.{i}.post_attention_layernorm.weight`               | [hidden]                                        |
| GQA / MHA (Llama, Qwen, Mixtral)                                 |                                                 |
| `model.layers.{i}.self_attn.q_proj.weight` (`.bias`)             | [heads * head_dim, hidden] ([heads * head_dim]) |
| `model.layers.{i}.self_attn.k_proj.weight` (`.bias`)             | [kv_heads * head_dim, hidden]                   |
| `model.layers.{i}.self_attn.v_proj.weight` (`.bias`)             | [kv_heads * head_dim, hidden]                   |
| `model.layers.{i}.self_attn.o_proj.weight`                       | [hidden, heads * head_dim]                      |
| `model.layers.{i}.self_attn.q_norm.weight`, `k_norm.weight`      | [head_dim] (qk_norm, Qwen3)                     |
| MLA (DeepSeek-V2/V3)                                             |                                                 |
| `model.layers.{i}.self_attn.q_a_proj.weight`                     | [q_lora_rank, hidden]                           |
| `model.layers.{i}.self_attn.q_a_layernorm.weight`                | [q_lora_rank]                                   |
| `model.layers.{i}.self_attn.q_b_proj.weight`                     | [heads * (nope + rope), q_lora_rank]            |
| `model.layers.{i}.self_attn.q_proj.weight` (no q_lora_rank)      | [heads * (nope + rope), hidden]                 |
| `model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight`           | [kv_lora_rank + rope, hidden]                   |
| `model.layers.{i}.self_attn.kv_a_layernorm.weight`               | [kv_lora_rank]                                  |
| `model.layers.{i}.self_attn.kv_b_proj.weight`                    | [heads * (nope + v_head_dim), kv_lora_rank]     |
| `model.layers.{i}.self_attn.o_proj.weight`                       | [hidden, heads * v_head_dim]                    |
| dense FFN layer                                                  |                                                 |
| `model.layers.{i}.mlp.{gate_proj,up_proj}.weight`                | [dense_intermediate, hidden]                    |
| `model.layers.{i}.mlp.down_proj.weight`                          | [hidden, dense_intermediate]                    |
| MoE FFN layer                                                    |                                                 |
| `model.layers.{i}.mlp.gate.weight`                               | [routed_experts, hidden]                        |
| `model.layers.{i}.mlp.gate.e_score_correction_bias`              | [routed_experts] (sigmoid gating only)          |
| `model.layers.{i}.mlp.experts.{e}.{gate_proj,up_proj}.weight`    | [expert_intermediate, hidden]                   |
| `model.layers.{i}.mlp.experts.{e}.down_proj.weight`              | [hidden, expert_intermediate]                   |
| `model.layers.{i}.mlp.shared_experts.{gate_proj,up_proj}.weight` | [shared * expert_intermediate, hidden]          |
| `model.layers.{i}.mlp.shared_experts.down_proj.weight`           | [hidden, shared * expert_intermediate]          |
| `model.norm.weight`                                              | [hidden]                                        |
| `lm_head.weight`                                                 | [vocab, hidden] (absent when tied)              |

Aliases read on load (Mixtral): `model.layers.{i}.block_sparse_moe.gate.weight` for `mlp.gate.weight` and
`model.layers.{i}.block_sparse_moe.experts.{e}.{w1,w3,w2}.weight` for `mlp.experts.{e}.{gate_proj,up_proj,
down_proj}.weight`. Tensors the model does not use (MTP layers, rotary caches, other experts) are ignored.
Saving writes the names above, only the experts the model holds, and no `lm_head.weight` when tied.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from matrixstack.engine.model import MoETransformer
from matrixstack.errors import UserError

CHECKPOINT_PREFIX = "model."
EXPERT_NAME = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.")
MIXTRAL_EXPERT = re.compile(r"^(.*)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
MIXTRAL_PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def checkpoint_name(module_name: str) -> str:
    """Return the Hugging Face checkpoint name of a model state-dict entry (see the module docstring)."""
    return module_name if module_name.startswith("lm_head.") else CHECKPOINT_PREFIX + module_name


def _mixtral_alias(name: str) -> str | None:
    """Return the Mixtral checkpoint name of a MoE router or expert tensor, or None when it has none."""
    if name.endswith(".mlp.gate.weight"):
        return name.removesuffix(".mlp.gate.weight") + ".block_sparse_moe.gate.weight"
    match = MIXTRAL_EXPERT.match(name)
    if match is None:
        return None
    layer, expert, proj = match.groups()
    return f"{layer}.block_sparse_moe.experts.{expert}.{MIXTRAL_PROJ[proj]}.weight"


def _expert_of(module_name: str) -> int | None:
    """Return the routed-expert id a state-dict entry belongs to, or None when it is not a routed expert."""
    match = EXPERT_NAME.match(module_name)
    return int(match.group(2)) if match else None


def _checkpoint_files(path: Path) -> list[Path]:
    """Return the safetensors files at `path` (one file, or every *.safetensors in a folder)."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise UserError(f"no safetensors weights at {path}; give a .safetensors file or a folder of them")
    return files


def _index(files: list[Path]) -> dict[str, Path]:
    """Return the file holding each tensor name across the checkpoint's shards."""
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as shard:
            where.update(dict.fromkeys(shard.keys(), file))
    return where


def _resolve(module_name: str, expected: list[int], where: dict[str, Path], path: Path) -> str:
    """Return the checkpoint name holding a state-dict entry (its own name or its Mixtral alias)."""
    key = checkpoint_name(module_name)
    alias = _mixtral_alias(key)
    if key not in where and alias in where:
        return alias
    if key not in where:
        raise UserError(f"weights at {path}: missing tensor {key!r} (expected shape {expected})")
    return key


def load_weights(model: MoETransformer, path_or_dir: str | Path, expert_ids: set[int] | None = None) -> None:
    """Load a safetensors checkpoint (file or folder of shards) into `model` in place; returns None.

    Only the routed experts in `expert_ids` are read (default: every expert the model holds; the others keep
    their values). Raises `UserError` naming the tensor and its expected shape when one is missing or
    mis-shaped, or when `expert_ids` names an expert the model does not hold.
    """
    path = Path(path_or_dir)
    state = model.state_dict()
    held = {e for name in state if (e := _expert_of(name)) is not None}
    if expert_ids is not None and not expert_ids <= held:
        raise UserError(f"cannot load experts {sorted(expert_ids - held)}: the model does not hold them")
    files = _checkpoint_files(path)
    where = _index(files)
    plan = {
        name: _resolve(name, list(target.shape), where, path)
        for name, target in state.items()
        if expert_ids is None or _expert_of(name) in expert_ids | {None}
    }
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt") as shard:
                for name, key in plan.items():
                    if where[key] != file:
                        continue
                    tensor, target = shard.get_tensor(key), state[name]
                    if tensor.shape != target.shape:
                        raise UserError(
                            f"weights at {path}: tensor {key!r} has shape {list(tensor.shape)}, "
                            f"expected {list(target.shape)}"
                        )
                    target.copy_(tensor)


def save_weights(model: MoETransformer, path: str | Path) -> Path:
    """Write the model's weights to one safetensors file under checkpoint names; returns the file's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {checkpoint_name(name): t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
