"""engine layer: the MoE transformer runtime (PyTorch), its weights and tokenizer.

Public API:

- `MoETransformer(arch, dtype, expert_ids, experts)`: the decoder (`engine.model`), run over a paged KV cache
  described by `AttentionMetadata` (`engine.attention`; `build_metadata` makes one);
- `ExpertExecutor`, `LocalExperts`, `apply_experts` (`engine.moe`): how routed experts run, pluggable for
  expert parallelism;
- `load_weights`, `save_weights` (`engine.weights`): safetensors under Hugging Face tensor names;
- `Tokenizer` (`engine.tokenizer`): byte-level BPE with `<|bos|>` / `<|eos|>` and a chat template;
- `load_model(arch, weights_dir)` (`engine.loading`): an arch, its weights and its tokenizer in one call;
  `tiny-moe` ships its own weights in `engine/assets/tiny-moe` (made by `scripts/make_tiny_moe.py`).

These names are imported on first use (PEP 562), so that importing the package, or a torch-free module in it
(`engine.http`, `engine.openai_types`, `engine.external`, which the portal uses), does not import torch.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matrixstack.engine.attention import AttentionMetadata, build_metadata
    from matrixstack.engine.loading import load_model
    from matrixstack.engine.model import MoETransformer, greedy_generate
    from matrixstack.engine.moe import ExpertExecutor, LocalExperts, apply_experts
    from matrixstack.engine.tokenizer import Tokenizer
    from matrixstack.engine.weights import load_weights, save_weights

ASSETS_DIR = Path(__file__).parent / "assets"
PACKAGED_WEIGHTS = {"tiny-moe": ASSETS_DIR / "tiny-moe"}
TOKENIZER_FILE = "tokenizer.json"


def weights_or_packaged(arch_name: str, weights_dir: str | Path | None, how: str) -> Path:
    """Return `weights_dir` as a Path, or the weights packaged for `arch_name` when it is None; UserError (saying
    `how` to give them) when that arch ships none."""
    if weights_dir is not None:
        return Path(weights_dir)
    if arch_name not in PACKAGED_WEIGHTS:
        from matrixstack.errors import UserError

        raise UserError(f"arch {arch_name} ships no weights; {how}")
    return PACKAGED_WEIGHTS[arch_name]


_LAZY = {  # public name -> the module that defines it
    "AttentionMetadata": "matrixstack.engine.attention",
    "build_metadata": "matrixstack.engine.attention",
    "ExpertExecutor": "matrixstack.engine.moe",
    "LocalExperts": "matrixstack.engine.moe",
    "apply_experts": "matrixstack.engine.moe",
    "MoETransformer": "matrixstack.engine.model",
    "greedy_generate": "matrixstack.engine.model",
    "Tokenizer": "matrixstack.engine.tokenizer",
    "load_weights": "matrixstack.engine.weights",
    "save_weights": "matrixstack.engine.weights",
    "load_model": "matrixstack.engine.loading",
}


def __getattr__(name: str) -> Any:
    """Return the public name `name`, importing its module on first use (and caching it in this module)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """Return the module's names, the lazy ones included."""
    return sorted({*globals(), *_LAZY})


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
