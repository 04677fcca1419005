"""Write an arch and its weights as a Hugging Face model folder that transformers and vLLM load, without
transformers: plain JSON files beside the engine's own safetensors and tokenizer.

The folder (`export_hf_folder`):

- `config.json`: transformers' `Glm4MoeForCausalLM` (`glm4_moe_config`, the mapping below);
- `model.safetensors` (or the shards and `model.safetensors.index.json`): the engine's checkpoint copied as is,
  its tensor names are already Hugging Face's (`engine.weights`), plus `lm_head.weight` when the arch ties it to
  the embedding: vLLM's Glm4Moe always reads its own LM head (it ignores `tie_word_embeddings` and would
  otherwise answer from an unloaded one); transformers ties it anyway, the engine ignores the extra tensor;
- `tokenizer.json`: the engine's, with a post-processor that puts `<|bos|>` first when a library encodes with
  special tokens (transformers by default, vLLM's completions), as the engine's server does for a text prompt;
  the engine itself encodes without special tokens, so it reads the exported file unchanged;
- `tokenizer_config.json`: `PreTrainedTokenizerFast` with the special tokens and the engine's chat template in
  Jinja (`engine.tokenizer.CHAT_TEMPLATE`), which vLLM's chat endpoint renders;
- `generation_config.json`: the bos/eos ids.

The mapping. An arch with GQA/MHA attention, a sigmoid-gated MoE with a score-correction bias (DeepSeek-V3's
router), at least one shared expert and dense layers only first (tiny-moe: 4 layers, the first dense) is
exactly `Glm4MoeForCausalLM` (GLM-4.5) with `first_k_dense_replace` = the dense layers,
`partial_rotary_factor=1.0` (GLM's default rotates half of each head; the engine rotates all of it, half-split
pairs as Llama), `attention_bias` = qkv_bias, `use_qk_norm` = qk_norm, `num_nextn_predict_layers=0`. Glm4Moe
is DeepSeek-V3's MoE block behind GQA attention, so nothing is approximated (`bench/engine_vs_hf.py` checks the
logits agree). Other archs are refused with what does not fit: `DeepseekV3ForCausalLM` is MLA-only;
`Qwen2MoeForCausalLM` routes by softmax without the correction bias and gates its shared expert;
`Qwen3MoeForCausalLM` has no shared expert.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from matrixstack.arch.spec import Arch
from matrixstack.engine import TOKENIZER_FILE
from matrixstack.engine.tokenizer import BOS, CHAT_TEMPLATE, EOS, Tokenizer
from matrixstack.errors import UserError

ARCHITECTURE = "Glm4MoeForCausalLM"
MODEL_TYPE = "glm4_moe"
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
HEADER_LENGTH_BYTES = 8  # a safetensors file starts with its JSON header's length, little-endian u64
INDEX_FILE = "model.safetensors.index.json"
EMBEDDING, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
HEADER_ALIGN_BYTES = 8  # safetensors pads its header with spaces to this alignment


def _misfits(arch: Arch) -> list[str]:
    """Return what keeps `arch` from being a Glm4MoeForCausalLM (empty when it is one)."""
    moe = arch.ffn.moe
    if arch.attention.kind == "mla":
        return ["attention is MLA; Glm4Moe has GQA/MHA attention"]
    if moe is None:
        return ["the arch is dense; Glm4Moe is a mixture of experts"]
    dense = moe.dense_layers
    problems = []
    if moe.gating != "sigmoid":
        problems.append(f"its router is {moe.gating}; Glm4Moe's is sigmoid with a score-correction bias")
    if moe.shared_experts < 1:
        problems.append("it has no shared expert; Glm4Moe has at least one")
    if dense != list(range(len(dense))):
        problems.append(f"its dense layers {dense} are not the first ones (Glm4Moe: first_k_dense_replace)")
    if arch.mtp_layers:
        problems.append(f"it has {arch.mtp_layers} MTP layers; the engine's checkpoints carry none")
    return problems


def glm4_moe_config(arch: Arch, dtype: str = "bfloat16") -> dict[str, Any]:
    """Return the config.json (a dict) of `arch` as transformers' Glm4MoeForCausalLM, weights in `dtype` (a torch
    dtype name); UserError naming what does not fit when the arch is not one (mapping in the module docstring)."""
    problems = _misfits(arch)
    if problems:
        raise UserError(f"arch {arch.name} cannot be exported as {ARCHITECTURE}: {'; '.join(problems)}")
    a, moe = arch.attention, arch.ffn.moe
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn.dense_intermediate or moe.expert_intermediate,
        "moe_intermediate_size": moe.expert_intermediate,
        "num_hidden_layers": arch.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "n_shared_experts": moe.shared_experts,
        "n_routed_experts": moe.routed_experts,
        "num_experts_per_tok": moe.experts_per_token,
        "routed_scaling_factor": moe.routed_scaling_factor,
        "n_group": moe.groups,
        "topk_group": moe.topk_groups,
        "norm_topk_prob": moe.norm_topk_prob,
        "first_k_dense_replace": len(moe.dense_layers),
        "attention_bias": a.qkv_bias,
        "use_qk_norm": a.qk_norm,
        # transformers 5 reads rope_parameters; older transformers and vLLM read the two top-level fields
        "rope_parameters": {"rope_type": "default", "rope_theta": arch.rope_theta, "partial_rotary_factor": 1.0},
        "rope_theta": arch.rope_theta,
        "partial_rotary_factor": 1.0,
        "rms_norm_eps": arch.rms_norm_eps,
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_embeddings,
        "num_nextn_predict_layers": 0,
        "hidden_act": "silu",
        "torch_dtype": dtype,
    }


def tokenizer_config(max_model_len: int) -> dict[str, Any]:
    """Return the tokenizer_config.json (a dict) of the engine's tokenizer for sequences of `max_model_len`."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "model_max_length": max_model_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def _hf_tokenizer_json(tokenizer: Tokenizer) -> str:
    """Return the tokenizer.json text of the engine's `tokenizer` with a post-processor adding `<|bos|>`."""
    backend: HFTokenizer = tokenizer.backend
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, tokenizer.bos_id)]
    )
    return backend.to_str(pretty=True)


def safetensors_header(path: Path) -> dict[str, Any]:
    """Return the JSON header of a safetensors file (tensor name -> dtype, shape, offsets; `__metadata__`)."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(HEADER_LENGTH_BYTES))
        return json.loads(file.read(length))


def _weights(weights_dir: Path) -> tuple[list[Path], dict[str, str], dict[str, list[int]], str]:
    """Return (safetensors files, tensor name -> file name, tensor name -> shape, the weights' dtype name) of a
    checkpoint folder."""
    files = sorted(weights_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"no *.safetensors weights in {weights_dir}; give --weights DIR, the engine's checkpoint")
    where, shapes, dtypes = {}, {}, set()
    for file in files:
        for name, entry in safetensors_header(file).items():
            if name != "__metadata__":
                where[name], shapes[name] = file.name, entry["shape"]
                dtypes.add(entry["dtype"])
    if len(dtypes) != 1 or next(iter(dtypes)) not in SAFETENSORS_DTYPES:
        raise UserError(f"weights in {weights_dir} hold dtypes {sorted(dtypes)}; expected one of F32, BF16, F16")
    return files, where, shapes, SAFETENSORS_DTYPES[dtypes.pop()]


def _copy_with_lm_head(source: Path, target: Path) -> None:
    """Copy the safetensors file `source` to `target` with `lm_head.weight` added, a copy of the embedding's bytes
    (written by hand: no torch needed, and numpy has no bfloat16)."""
    header = safetensors_header(source)
    with source.open("rb") as file:
        file.seek(HEADER_LENGTH_BYTES + struct.unpack("<Q", file.read(HEADER_LENGTH_BYTES))[0])
        data = file.read()
    embedding = header[EMBEDDING]
    start, end = embedding["data_offsets"]
    header[LM_HEAD] = {**embedding, "data_offsets": [len(data), len(data) + end - start]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % HEADER_ALIGN_BYTES)
    target.write_bytes(struct.pack("<Q", len(text)) + text + data + data[start:end])


def _check_shapes(arch: Arch, shapes: dict[str, list[int]], weights_dir: Path) -> None:
    """Raise UserError when the checkpoint's embedding is not the arch's [vocab, hidden]."""
    expected = [arch.vocab_size, arch.hidden_size]
    if shapes.get(EMBEDDING) != expected:
        raise UserError(
            f"weights in {weights_dir} are not arch {arch.name}'s: {EMBEDDING} is {shapes.get(EMBEDDING, 'missing')}, "
            f"expected {expected}; "
            "give --weights DIR of this arch"
        )


def export_hf_folder(arch: Arch, weights_dir: Path, out: Path, force: bool = False) -> list[Path]:
    """Write `arch` with the checkpoint and tokenizer in `weights_dir` as a Hugging Face folder at `out` (see the
    module docstring); returns the files written. UserError when `out` holds files and not `force`, or when the
    arch or the weights do not fit."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} exists and is not an empty folder; pick another or pass --force to overwrite")
    config = glm4_moe_config(arch)  # an arch that does not fit is refused before its weights are read
    files, where, shapes, dtype = _weights(weights_dir)
    _check_shapes(arch, shapes, weights_dir)
    tokenizer = Tokenizer.from_file(weights_dir / TOKENIZER_FILE)
    special_ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    documents = {
        "config.json": {**config, "torch_dtype": dtype, **special_ids},
        "generation_config.json": special_ids,
        "tokenizer_config.json": tokenizer_config(arch.max_position_embeddings),
    }
    names = {file: "model.safetensors" if len(files) == 1 else file.name for file in files}
    add_lm_head = arch.tie_embeddings and LM_HEAD not in where
    if add_lm_head:
        where[LM_HEAD] = where[EMBEDDING]
    if len(files) > 1:
        documents[INDEX_FILE] = {"metadata": {}, "weight_map": where}
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for file, name in names.items():
        if add_lm_head and file.name == where[EMBEDDING]:
            _copy_with_lm_head(file, out / name)
        else:
            shutil.copyfile(file, out / name)
        written.append(out / name)
    for name, document in documents.items():
        (out / name).write_text(json.dumps(document, indent=2) + "\n")
        written.append(out / name)
    (out / TOKENIZER_FILE).write_text(_hf_tokenizer_json(tokenizer))
    return [*written, out / TOKENIZER_FILE]
