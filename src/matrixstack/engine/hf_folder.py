"""Which lanes can serve a Hugging Face folder: the builtin engine where its model is one `engine.model` runs
exactly, vLLM for every architecture MatrixStack imports (`arch.hf_import`).

The arch import keeps what planning needs (dims, experts, attention kind); the builtin engine also needs what
the `Arch` spec does not carry to be the same function, so a config.json asking for any of these is not one it
runs: RoPE scaling (yarn, llama3, ...), partial rotary embeddings (GLM's default rotates half of each head),
sliding-window attention, quantized weights (fp8 and others), an activation other than SiLU; nor is a tokenizer
the engine's `Tokenizer` cannot use (it needs MatrixStack's special tokens for its chat template).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matrixstack.engine import TOKENIZER_FILE
from matrixstack.engine.tokenizer import Tokenizer
from matrixstack.errors import UserError

ENGINE, VLLM = "engine", "vllm"
DEFAULT_PARTIAL_ROTARY = {"glm4_moe": 0.5}  # model_types whose config defaults to rotating part of each head


def _rope_blockers(config: dict[str, Any]) -> list[str]:
    """Return why the engine's RoPE (unscaled, over the whole head) is not the config's."""
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or rope.get("rope_type") or "default"
    reasons = [] if kind == "default" else [f"RoPE scaling {kind!r} (the engine's RoPE is unscaled)"]
    default = DEFAULT_PARTIAL_ROTARY.get(config.get("model_type"), 1.0)
    partial = config.get("partial_rotary_factor", rope.get("partial_rotary_factor", default))
    if partial != 1.0:
        reasons.append(f"partial rotary factor {partial} (the engine rotates the whole head)")
    return reasons


def engine_blockers(config: dict[str, Any], folder: Path) -> list[str]:
    """Return why the builtin engine cannot run the model of this config.json and folder (empty when it can)."""
    reasons = _rope_blockers(config)
    if config.get("use_sliding_window") or ("use_sliding_window" not in config and config.get("sliding_window")):
        reasons.append(f"sliding-window attention ({config['sliding_window']} tokens)")
    quant = config.get("quantization_config")
    if quant:
        reasons.append(f"quantized weights ({quant.get('quant_method', 'unknown method')})")
    if config.get("hidden_act", "silu") != "silu":
        reasons.append(f"activation {config['hidden_act']!r} (the engine's FFNs are SwiGLU)")
    try:
        Tokenizer.from_file(folder / TOKENIZER_FILE)
    except UserError as exc:
        reasons.append(f"its tokenizer: {exc}")
    return reasons


def lanes_for(config: dict[str, Any], folder: Path) -> tuple[list[str], list[str]]:
    """Return (the lanes that can serve the folder's model, why the builtin engine cannot) for an importable
    config.json: engine and vllm, or vllm alone."""
    blockers = engine_blockers(config, folder)
    return ([VLLM] if blockers else [ENGINE, VLLM]), blockers
