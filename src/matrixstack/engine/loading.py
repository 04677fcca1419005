"""`load_model`: an arch, its weights and its tokenizer in one call."""

from __future__ import annotations

from pathlib import Path

import torch

from matrixstack.arch import load_arch
from matrixstack.engine import TOKENIZER_FILE, weights_or_packaged
from matrixstack.engine.model import MoETransformer
from matrixstack.engine.tokenizer import Tokenizer
from matrixstack.engine.weights import load_weights


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
    weights_dir = weights_or_packaged(arch.name, weights_dir, "pass the folder of its safetensors and tokenizer")
    model = MoETransformer(arch, dtype=dtype, expert_ids=expert_ids)
    load_weights(model, weights_dir)
    return model.eval(), Tokenizer.from_file(weights_dir / TOKENIZER_FILE)
