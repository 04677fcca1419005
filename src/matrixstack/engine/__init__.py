"""engine layer: the MoE transformer runtime (PyTorch), its weights and tokenizer.

Public API:

- `MoETransformer(arch, dtype, expert_ids, experts)`: the decoder (`engine.model`), run over a paged KV cache
  described by `AttentionMetadata` (`engine.attention`; `build_metadata` makes one);
- `ExpertExecutor`, `LocalExperts`, `apply_experts` (`engine.moe`): how routed experts run, pluggable for
  expert parallelism;
- `load_weights`, `save_weights` (`engine.weights`): safetensors under Hugging Face tensor names;
- `Tokenizer` (`engine.tokenizer`): byte-level BPE with `<|bos|>` / `<|eos|>` and a chat template;
- `load_model(arch, weights_dir)`: an arch, its weights and its tokenizer in one call; `tiny-moe` ships its own
  weights in `engine/assets/tiny-moe` (made by `scripts/make_tiny_moe.py`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from matrixstack.arch import load_arch
from matrixstack.engine.attention import AttentionMetadata, build_metadata
from matrixstack.engine.model import MoETransformer, greedy_generate
from matrixstack.engine.moe import ExpertExecutor, LocalExperts, apply_experts
from matrixstack.engine.tokenizer import Tokenizer
from matrixstack.engine.weights import load_weights, save_weights
from matrixstack.errors import UserError

ASSETS_DIR = Path(__file__).parent / "assets"
PACKAGED_WEIGHTS = {"tiny-moe": ASSETS_DIR / "tiny-moe"}
TOKENIZER_FILE = "tokenizer.json"


def load_model(
    arch_name_or_path: str = "tiny-moe",
    weights_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    expert_ids: set[int] | None = None,
) -> tuple[MoETransformer, Tokenizer]:
    """Return (model in eval mode with its weights loaded, tokenizer) for an arch name or YAML path.

    `weights_dir` holds the *.safetensors and tokenizer.json; it defaults to the packaged weights, which exist for
    tiny-moe only. `expert_ids` materialises and loads only those routed experts.
    """
    arch = load_arch(arch_name_or_path)
    if weights_dir is None:
        if arch.name not in PACKAGED_WEIGHTS:
            raise UserError(f"arch {arch.name} ships no weights; pass the folder of its safetensors and tokenizer")
        weights_dir = PACKAGED_WEIGHTS[arch.name]
    weights_dir = Path(weights_dir)
    model = MoETransformer(arch, dtype=dtype, expert_ids=expert_ids)
    load_weights(model, weights_dir)
    return model.eval(), Tokenizer.from_file(weights_dir / TOKENIZER_FILE)


__all__ = [
    "AttentionMetadata",
    "ExpertExecutor",
    "LocalExperts",
    "MoETransformer",
    "Tokenizer",
    "apply_experts",
    "build_metadata",
    "greedy_generate",
    "load_model",
    "load_weights",
    "save_weights",
]
