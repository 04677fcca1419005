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
- `engine.lora_adapter`: `LoraAdapter`, `write_peft`, `read_peft`: LoRA adapters in PEFT's folder format;
- `engine.lora_slots`: `AdapterDirectory` (adapters by name on disk), `LoraSlots` (device slots, LRU); with
  `engine.lora_batch` (`LoraBatch`: one step's per-token adapters) the batched LoRA the model runner serves;
- `engine.hf_export`: `export_hf_folder`, an arch and its weights as a Hugging Face folder (`glm4_moe_config`);
- `engine.hf_folder`: `lanes_for`, whether the builtin engine runs a Hugging Face folder's model (else vLLM);
- here: `PACKAGED_WEIGHTS` (`tiny-moe` ships its own weights in `engine/assets/tiny-moe`, made by
  `scripts/make_tiny_moe.py`), `TOKENIZER_FILE`, and `weights_or_packaged` (which also finds the folder of a
  model registered with `matrixstack model add`, `arch.registry`).
"""

from __future__ import annotations

from pathlib import Path

from matrixstack.arch.registry import registered_model
from matrixstack.errors import UserError

ASSETS_DIR = Path(__file__).parent / "assets"
PACKAGED_WEIGHTS = {"tiny-moe": ASSETS_DIR / "tiny-moe"}
TOKENIZER_FILE = "tokenizer.json"


def weights_or_packaged(arch_name: str, weights_dir: str | Path | None, how: str) -> Path:
    """Return `weights_dir` as a Path, else the weights packaged for `arch_name`, else the folder of the registered
    model of that name; UserError (saying `how` to give them) when there are none, or naming the lanes that can
    serve a registered model the builtin engine cannot run."""
    if weights_dir is not None:
        return Path(weights_dir)
    if arch_name in PACKAGED_WEIGHTS:
        return PACKAGED_WEIGHTS[arch_name]
    model = registered_model(arch_name)
    if model is None:
        raise UserError(f"arch {arch_name} ships no weights; {how}")
    if "engine" not in model.lanes:
        raise UserError(
            f"model {model.name} ({model.architecture}) is not one the builtin engine runs: "
            f"{'; '.join(model.engine_blockers)}; lanes that can serve it: {', '.join(model.lanes)} "
            "(a shape deployment with engine: vllm)"
        )
    return Path(model.folder)
