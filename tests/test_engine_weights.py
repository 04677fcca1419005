"""Engine weights (safetensors under Hugging Face names), the tokenizer and the packaged tiny-moe."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_engine_model import ARCHS, MLA_ARCH, randomized

from matrixstack.engine import ASSETS_DIR
from matrixstack.engine.loading import load_model
from matrixstack.engine.model import MoETransformer, greedy_generate
from matrixstack.engine.tokenizer import Tokenizer
from matrixstack.engine.weights import load_weights, save_weights
from matrixstack.errors import UserError

ASSETS_LIMIT_BYTES = 20 * 1024 * 1024
TINY_MOE_DIR = ASSETS_DIR / "tiny-moe"
SAMPLE_PROMPT = (
    'The "for" statement is used to iterate over the elements of a sequence\n'
    "(such as a string, tuple or list) or other iterable object:"
)


def checkpoint(path) -> dict[str, torch.Tensor]:
    """Return every tensor of a safetensors file by name."""
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_save_load_round_trip(tmp_path, name):
    source = randomized(ARCHS[name], seed=1)
    path = save_weights(source, tmp_path / "model.safetensors")
    target = MoETransformer(ARCHS[name])
    load_weights(target, path)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, atol=0, rtol=0)


def test_saved_names_follow_the_hugging_face_map(tmp_path):
    names = set(checkpoint(save_weights(MoETransformer(MLA_ARCH), tmp_path / "mla.safetensors")))
    assert {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.self_attn.q_a_proj.weight",
        "model.layers.0.self_attn.q_a_layernorm.weight",
        "model.layers.0.self_attn.q_b_proj.weight",
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.0.self_attn.kv_a_layernorm.weight",
        "model.layers.0.self_attn.kv_b_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.1.mlp.experts.7.down_proj.weight",
        "model.layers.1.mlp.shared_experts.up_proj.weight",
    } <= names
    tied = set(checkpoint(save_weights(MoETransformer(ARCHS["tiny-moe"]), tmp_path / "tied.safetensors")))
    assert "lm_head.weight" not in tied and "model.layers.0.self_attn.k_proj.weight" in tied
    qwen = set(checkpoint(save_weights(MoETransformer(ARCHS["qwen"]), tmp_path / "qwen.safetensors")))
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_norm.weight"} <= qwen


def test_subset_load_reads_only_held_experts(tmp_path):
    source = randomized(ARCHS["tiny-moe"], seed=1)
    path = save_weights(source, tmp_path / "model.safetensors")
    part = MoETransformer(ARCHS["tiny-moe"], expert_ids={2, 5})
    load_weights(part, path)
    full = source.state_dict()
    for key, value in part.state_dict().items():
        torch.testing.assert_close(value, full[key], atol=0, rtol=0)
    narrowed = MoETransformer(ARCHS["tiny-moe"], expert_ids={2, 5})
    load_weights(narrowed, path, expert_ids={2})
    experts = narrowed.layers[1].mlp.experts
    assert torch.equal(experts[2].up_proj.weight, full["layers.1.mlp.experts.2.up_proj.weight"])
    assert not torch.equal(experts[5].up_proj.weight, full["layers.1.mlp.experts.5.up_proj.weight"])  # not read
    with pytest.raises(UserError, match=r"experts \[3\]"):
        load_weights(part, path, expert_ids={2, 3})


def test_missing_or_misshaped_tensor_is_a_user_error(tmp_path):
    tensors = checkpoint(save_weights(MoETransformer(ARCHS["tiny-moe"]), tmp_path / "full.safetensors"))
    missing = dict(tensors)
    del missing["model.layers.2.mlp.experts.3.up_proj.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(
        UserError,
        match=r"missing tensor 'model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight' "
        r"\(expected shape \[128, 256\]\)",
    ):
        load_weights(MoETransformer(ARCHS["tiny-moe"]), tmp_path / "missing.safetensors")
    # A worker that does not hold expert 3 does not need it.
    load_weights(MoETransformer(ARCHS["tiny-moe"], expert_ids={0, 1}), tmp_path / "missing.safetensors")
    bad = dict(tensors, **{"model.norm.weight": torch.ones(255)})
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match=r"'model\.norm\.weight' has shape \[255\], expected \[256\]"):
        load_weights(MoETransformer(ARCHS["tiny-moe"]), tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="no safetensors weights"):
        load_weights(MoETransformer(ARCHS["tiny-moe"]), tmp_path / "nowhere")


def test_sharded_folder_and_mixtral_names_load(tmp_path):
    source = randomized(ARCHS["qwen"], seed=3)
    tensors = checkpoint(save_weights(source, tmp_path / "one.safetensors"))
    renamed = {
        name.replace(".mlp.", ".block_sparse_moe.")
        .replace("gate_proj", "w1")
        .replace("up_proj", "w3")
        .replace("down_proj", "w2"): value
        for name, value in tensors.items()
    }
    names = sorted(renamed)
    shards = tmp_path / "shards"
    shards.mkdir()
    save_file({n: renamed[n] for n in names[::2]}, str(shards / "model-00001-of-00002.safetensors"))
    save_file({n: renamed[n] for n in names[1::2]}, str(shards / "model-00002-of-00002.safetensors"))
    target = MoETransformer(ARCHS["qwen"])
    load_weights(target, shards)
    ids = torch.arange(9)
    torch.testing.assert_close(target.reference_forward(ids), source.reference_forward(ids), atol=0, rtol=0)


def test_tokenizer_round_trip_and_chat_template():
    tokenizer = Tokenizer.from_file(TINY_MOE_DIR / "tokenizer.json")
    assert tokenizer.vocab_size == ARCHS["tiny-moe"].vocab_size
    for text in ["The for statement is used to iterate.", "  tabs\tand\nnewlines ", "Ünïcödé ✓ 漢字 🙂", ""]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.encode("hello", add_bos=True)
    assert ids[0] == tokenizer.bos_id and tokenizer.decode(ids) == "hello"
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert prompt == "<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\nHi<|eos|>\n<|assistant|>\n"
    encoded = tokenizer.encode(prompt)
    assert encoded[0] == tokenizer.bos_id and tokenizer.eos_id in encoded
    assert tokenizer.decode(encoded, skip_special_tokens=False) == prompt
    with pytest.raises(UserError, match="role 'tool'"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}])


def test_packaged_tiny_moe_generates_deterministically():
    model, tokenizer = load_model("tiny-moe")
    prompt = SAMPLE_PROMPT
    first = greedy_generate(model, tokenizer.encode(prompt, add_bos=True), 20)
    assert len(first) == 20
    assert greedy_generate(model, tokenizer.encode(prompt, add_bos=True), 20) == first
    corpus = (ASSETS_DIR / "corpus" / "python-reference.txt").read_text()
    continuation = corpus[corpus.index(prompt) + len(prompt) :]
    assert continuation.startswith(tokenizer.decode(first))  # it recites the text it was trained on


def test_packaged_assets_are_small():
    total = sum(f.stat().st_size for f in ASSETS_DIR.rglob("*") if f.is_file())
    assert total < ASSETS_LIMIT_BYTES
    assert (TINY_MOE_DIR / "model.safetensors").is_file()


@pytest.mark.slow
def test_matches_hugging_face_deepseek_v3(tmp_path, hf_reference):
    """Same checkpoint, same logits as transformers' DeepseekV3ForCausalLM (run in vLLM's venv)."""
    m = MLA_ARCH.attention.mla
    moe = MLA_ARCH.ffn.moe
    config = dict(
        model_type="deepseek_v3",
        architectures=["DeepseekV3ForCausalLM"],
        vocab_size=MLA_ARCH.vocab_size,
        hidden_size=MLA_ARCH.hidden_size,
        intermediate_size=MLA_ARCH.ffn.dense_intermediate,
        moe_intermediate_size=moe.expert_intermediate,
        num_hidden_layers=MLA_ARCH.layers,
        num_attention_heads=MLA_ARCH.attention.heads,
        num_key_value_heads=MLA_ARCH.attention.heads,
        n_shared_experts=moe.shared_experts,
        n_routed_experts=moe.routed_experts,
        routed_scaling_factor=moe.routed_scaling_factor,
        kv_lora_rank=m.kv_lora_rank,
        q_lora_rank=m.q_lora_rank,
        qk_rope_head_dim=m.qk_rope_head_dim,
        v_head_dim=m.v_head_dim,
        qk_nope_head_dim=m.qk_nope_head_dim,
        n_group=moe.groups,
        topk_group=moe.topk_groups,
        num_experts_per_tok=moe.experts_per_token,
        first_k_dense_replace=1,
        norm_topk_prob=moe.norm_topk_prob,
        rope_theta=MLA_ARCH.rope_theta,
        rms_norm_eps=MLA_ARCH.rms_norm_eps,
        tie_word_embeddings=False,
        max_position_embeddings=MLA_ARCH.max_position_embeddings,
    )
    ours = randomized(MLA_ARCH, seed=5)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_weights(ours, tmp_path / "model.safetensors")
    ids = torch.arange(17) % MLA_ARCH.vocab_size
    hf_reference({"folder": str(tmp_path), "logits": {"ids": ids.tolist(), "out": str(tmp_path / "hf.safetensors")}})
    with torch.no_grad():
        expected = ours.reference_forward(ids)
    torch.testing.assert_close(checkpoint(tmp_path / "hf.safetensors")["logits"], expected, atol=1e-4, rtol=0)


def test_weights_default_to_the_packaged_ones_and_an_arch_without_them_says_how_to_give_them(tmp_path):
    from matrixstack.engine import PACKAGED_WEIGHTS, weights_or_packaged

    assert weights_or_packaged("tiny-moe", None, "unused") == PACKAGED_WEIGHTS["tiny-moe"]
    assert weights_or_packaged("deepseek-v3", str(tmp_path), "unused") == tmp_path
    with pytest.raises(UserError, match=r"^arch deepseek-v3 ships no weights; pass --weights DIR$"):
        weights_or_packaged("deepseek-v3", None, "pass --weights DIR")
