"""engine layer: the MoE transformer runtime (PyTorch), its weights and tokenizer.

Importers use the submodules directly; this package module imports no torch, so that the CLI and the stack can
read where the packaged weights are without loading the runtime:

- `engine.model`: `MoETransformer(arch, dtype, expert_ids, experts)`, the decoder, run over a paged KV cache
  described by `AttentionMetadata` (`engine.attention`; `build_metadata` makes one); `greedy_generate`;
- `engine.moe`: `ExpertExecutor`, `LocalExperts`, `apply_experts`: how routed experts run, pluggable for expert
  parallelism;
- `engine.weights`: `load_weights`, `save_weights`: safetensors under Hugging Face tensor names;
- `engine.tokenizer`: `Tokenizer`, byte-level BPE with `<|bos|>` / `<|eos|>` and a chat template;
- `engine.loading`: `load_model(arch, weights_dir)`, an arch, its weights and its tokenizer in one call;
- here: `PACKAGED_WEIGHTS` (`tiny-moe` ships its own weights in `engine/assets/tiny-moe`, made by
  `scripts/make_tiny_moe.py`), `TOKENIZER_FILE`, and `weights_or_packaged`.
"""

from __future__ import annotations

from pathlib import Path

from matrixstack.errors import UserError

ASSETS_DIR = Path(__file__).parent / "assets"
PACKAGED_WEIGHTS = {"tiny-moe": ASSETS_DIR / "tiny-moe"}
TOKENIZER_FILE = "tokenizer.json"


def weights_or_packaged(arch_name: str, weights_dir: str | Path | None, how: str) -> Path:
    """Return `weights_dir` as a Path, or the weights packaged for `arch_name` when it is None; UserError (saying
    `how` to give them) when that arch ships none."""
    if weights_dir is not None:
        return Path(weights_dir)
    if arch_name not in PACKAGED_WEIGHTS:
        raise UserError(f"arch {arch_name} ships no weights; {how}")
    return PACKAGED_WEIGHTS[arch_name]
