"""Arch specs: published parameter totals, KV-cache and weight bytes, FLOPs per token, validation, HF import."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from matrixstack.arch import BYTES_PER_ELEMENT, Arch, arch_names, load_arch
from matrixstack.arch.hf_import import import_hf_config, sourced_arch
from matrixstack.errors import SpecError, UnknownNameError, UserError
from matrixstack.specio import validate_spec

HF_CONFIGS = Path(__file__).parent / "data" / "hf_configs"
BUILT_IN = [
    "deepseek-r1",
    "deepseek-v3",
    "llama-3.1-70b",
    "llama-3.1-8b",
    "mixtral-8x7b",
    "qwen3-235b-a22b",
    "qwen3-30b-a3b",
    "tiny-moe",
]


def non_embedding_params(arch: Arch) -> int:
    return arch.total_params() - arch.embedding_params() - arch.lm_head_params()


def test_catalog_lists_every_required_arch():
    assert arch_names() == BUILT_IN
    for name in BUILT_IN:
        assert load_arch(name).name == name


# (arch, what, published figure, relative tolerance, where the figure is published)
PUBLISHED = [
    ("deepseek-v3", "total", 671e9, 0.01, "DeepSeek-V3 README / paper: 671B total"),
    ("deepseek-v3", "active_matmul", 36.7e9, 0.01, "DeepSeek-V3 README_WEIGHTS.md: 36.7B activated"),
    ("deepseek-v3", "mtp", 11.5e9, 0.01, "README_WEIGHTS.md: MTP 11.5B unique parameters"),
    ("qwen3-235b-a22b", "total", 235e9, 0.01, "model card: 235B in total"),
    ("qwen3-235b-a22b", "active", 22e9, 0.01, "model card: 22B activated"),
    ("qwen3-235b-a22b", "non_embedding", 234e9, 0.01, "model card: 234B non-embedding"),
    ("qwen3-30b-a3b", "total", 30.5e9, 0.01, "model card: 30.5B in total"),
    ("qwen3-30b-a3b", "non_embedding", 29.9e9, 0.01, "model card: 29.9B non-embedding"),
    # The card's "3.3B" has two significant figures; the count is 3.353B (3.04B without the embedding
    # table and LM head, so no other convention fits better). 2% covers the card's truncation.
    ("qwen3-30b-a3b", "active", 3.3e9, 0.02, "model card: 3.3B activated"),
    ("llama-3.1-70b", "total", 70.6e9, 0.01, "Hugging Face: 70.6B params"),
    ("llama-3.1-8b", "total", 8.03e9, 0.01, "Hugging Face: 8.03B params"),
    ("mixtral-8x7b", "total", 46.7e9, 0.01, "Mistral: 46.7B total parameters"),
    ("mixtral-8x7b", "active", 12.9e9, 0.01, "Mistral: 12.9B parameters per token"),
]
COUNTS = {
    "total": Arch.total_params,
    "active": Arch.active_params,
    "active_matmul": Arch.active_matmul_params,
    "mtp": Arch.mtp_params,
    "non_embedding": non_embedding_params,
}


@pytest.mark.parametrize(("name", "what", "published", "rel", "where"), PUBLISHED)
def test_parameter_counts_match_published_figures(name, what, published, rel, where):
    counted = COUNTS[what](load_arch(name))
    assert counted == pytest.approx(published, rel=rel), f"{name} {what}: {counted / 1e9:.3f}B vs {where}"


def test_deepseek_v3_headline_figures_and_mtp_accounting():
    ds = load_arch("deepseek-v3")
    # Headline "37B activated": DeepSeek's count leaves out the embedding table (36.6B, rounds to 37B);
    # MatrixStack's active_params keeps it, as Mixtral and Qwen count (37.6B).
    assert round(ds.active_matmul_params() / 1e9) == 37
    assert ds.active_params() - ds.active_matmul_params() == pytest.approx(ds.embedding_params(), rel=0.01)
    # Hugging Face lists 685B: main model + MTP module + the MTP's own copy of embedding and head.
    hf_listed = ds.total_params() + ds.mtp_params() + ds.embedding_params() + ds.vocab_size * ds.hidden_size
    assert hf_listed == pytest.approx(685e9, rel=0.01)


def test_deepseek_v3_components():
    ds = load_arch("deepseek-v3")
    assert ds.expert_params() == 3 * 7168 * 2048
    assert ds.shared_expert_params() == ds.expert_params()
    assert ds.router_params() == 7168 * 256
    assert ds.dense_ffn_params() == 3 * 7168 * 18432
    q = 7168 * 1536 + 1536 * 128 * 192
    kv = 7168 * (512 + 64) + 512 * 128 * (128 + 128)
    o = 128 * 128 * 7168
    assert ds.attention_params_per_layer() == q + kv + o + 1536 + 512  # + the two latent norms
    assert ds.embedding_params() == ds.lm_head_params() == 129280 * 7168
    assert (ds.moe_layer_count(), ds.dense_layer_count()) == (58, 3)
    assert not ds.is_moe_layer(2) and ds.is_moe_layer(3)


def test_deepseek_r1_has_the_deepseek_v3_shape():
    v3, r1 = load_arch("deepseek-v3"), load_arch("deepseek-r1")
    assert r1.model_dump(exclude={"name", "source"}) == v3.model_dump(exclude={"name", "source"})
    assert r1.total_params() == v3.total_params()


@pytest.mark.parametrize("name", ["llama-3.1-70b", "llama-3.1-8b"])
def test_dense_models_activate_every_parameter(name):
    arch = load_arch(name)
    assert arch.ffn.moe is None
    assert arch.active_params() == arch.total_params()
    assert (arch.routed_experts(), arch.experts_per_token(), arch.moe_layer_count()) == (0, 0, 0)


def test_tiny_moe_fits_cpu_workers():
    tiny = load_arch("tiny-moe")
    assert tiny.ffn.moe is not None and tiny.ffn.moe.shared_experts == 1
    assert tiny.routed_experts() == 8 and tiny.experts_per_token() == 2
    assert tiny.moe_layer_count() == 3 and not tiny.is_moe_layer(0)
    assert tiny.weight_bytes("bf16") < 12e6  # ~9.8 MB, well under 20 MB
    assert tiny.tie_embeddings and tiny.lm_head_params() == 0


def test_kv_bytes_per_token_mla_latent_vs_gqa_heads():
    ds, llama70, qwen = load_arch("deepseek-v3"), load_arch("llama-3.1-70b"), load_arch("qwen3-235b-a22b")
    assert ds.kv_bytes_per_token("bf16") == 61 * (512 + 64) * 2
    assert llama70.kv_bytes_per_token("bf16") == 80 * 2 * 8 * 128 * 2
    assert qwen.kv_bytes_per_token("bf16") == 94 * 2 * 4 * 128 * 2
    # MLA caches one latent per token: under a quarter of a 10x smaller GQA model's cache ...
    assert ds.kv_bytes_per_token() < llama70.kv_bytes_per_token() / 4
    # ... and ~57x less than caching full K and V for every one of its 128 heads.
    full_heads = ds.layers * 2 * ds.attention.heads * ds.attention.head_dim * 2
    assert full_heads / ds.kv_bytes_per_token() > 50


def test_bytes_scale_with_dtype():
    llama = load_arch("llama-3.1-8b")
    assert llama.kv_bytes_per_token("fp8") * 2 == llama.kv_bytes_per_token("bf16")
    assert llama.kv_bytes_per_token("fp4") * 4 == llama.kv_bytes_per_token("bf16")
    assert llama.weight_bytes("bf16") == 2 * llama.total_params()
    assert llama.weight_bytes("fp32") == 4 * llama.total_params()
    assert llama.weight_bytes() == llama.weight_bytes("bf16")  # native dtype
    # Quantized: linear layers narrow, embedding / head / norms / routers stay bf16.
    high = llama.high_precision_params()
    assert high == 2 * 128256 * 4096 + 4096 + 32 * 2 * 4096
    assert llama.weight_bytes("fp8") == llama.total_params() - high + 2 * high
    assert llama.weight_bytes("fp4") < llama.weight_bytes("fp8") < llama.weight_bytes("bf16")
    assert set(BYTES_PER_ELEMENT) == {"fp32", "bf16", "fp16", "fp8", "int8", "fp4"}


def test_deepseek_native_fp8_weights():
    ds = load_arch("deepseek-v3")
    assert ds.native_dtype == "fp8"
    assert ds.weight_bytes() == ds.weight_bytes("fp8")
    assert ds.weight_bytes() == pytest.approx(ds.total_params(), rel=0.01)  # ~1 byte per parameter


def test_decode_flops_grow_with_context():
    for name in BUILT_IN:
        arch = load_arch(name)
        flops = [arch.flops_per_token("decode", c) for c in (1, 1024, 8192, 65536)]
        assert flops == sorted(flops) and flops[-1] > flops[0], name
        assert flops[0] == pytest.approx(2 * arch.active_matmul_params(), rel=0.01)


def test_attention_flops_formulas():
    llama = load_arch("llama-3.1-70b")
    assert llama.attention_flops_per_token("decode", 4096) == 80 * 2 * 64 * (128 + 128) * 4096
    assert llama.attention_flops_per_token("prefill", 4096) == 80 * 2 * 64 * (128 + 128) * 4097 / 2
    ds = load_arch("deepseek-v3")
    # MLA decode attends over the absorbed latent: scores on 512 + 64 dims, values on 512.
    assert ds.attention_flops_per_token("decode", 1000) == 61 * 2 * 128 * (576 + 512) * 1000
    # MLA prefill decompresses K and V per head: scores on 128 + 64 dims, values on 128.
    assert ds.attention_flops_per_token("prefill", 999) == 61 * 2 * 128 * (192 + 128) * 500
    assert ds.flops_per_token("prefill", 4096) == 2 * ds.active_matmul_params() + ds.attention_flops_per_token(
        "prefill", 4096
    )
    # A 70B dense model needs more FLOPs per token than a 37B-active MoE at short context.
    assert llama.flops_per_token("decode", 128) > ds.flops_per_token("decode", 128)


def test_a_yaml_path_loads_like_the_built_in_name(tmp_path):
    source = Path(__file__).parents[1] / "src" / "matrixstack" / "arch" / "catalog" / "mixtral-8x7b.yaml"
    copy = tmp_path / "my-mixtral.yaml"
    shutil.copy(source, copy)
    assert load_arch(str(copy)) == load_arch("mixtral-8x7b")


def test_unknown_name_lists_the_built_ins():
    with pytest.raises(UnknownNameError) as info:
        load_arch("gpt-5")
    assert "gpt-5" in str(info.value)
    for name in BUILT_IN:
        assert name in str(info.value)


def _broken(change) -> dict:
    data = load_arch("deepseek-v3").model_dump()
    change(data)
    return data


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.update(layers="many"), ["layers", "integer count of transformer layers"]),
        (lambda d: d["ffn"]["moe"].update(routed_experts=0), ["ffn.moe.routed_experts", "integer count of routed"]),
        (lambda d: d["attention"].update(kind="gqa", mla=None, kv_heads=5), ["kv_heads (5) to divide heads"]),
        (lambda d: d["attention"].update(mla=None), ["attention.mla is required"]),
        (lambda d: d["ffn"]["moe"].update(experts_per_token=300), ["experts_per_token (300) exceeds"]),
        (lambda d: d["ffn"]["moe"].update(dense_layers=[0, 61]), ["dense_layers must be layer indices in [0, 61)"]),
        (lambda d: d["ffn"].update(dense_intermediate=None), ["dense_intermediate is required"]),
        (lambda d: d.update(native_dtype="fp6"), ["native_dtype", "one of fp32, bf16"]),
        (lambda d: d["ffn"]["moe"].update(experts=3), ["ffn.moe.experts", "Extra inputs are not permitted"]),
    ],
)
def test_invalid_specs_name_the_field_and_the_expected_unit(change, expected):
    with pytest.raises(SpecError) as info:
        validate_spec(Arch, _broken(change), "arch file bad.yaml")
    message = str(info.value)
    assert message.startswith("arch file bad.yaml")
    for text in expected:
        assert text in message


# ---- Hugging Face import ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "built_in"),
    [
        ("deepseek-v3.json", "deepseek-v3"),
        ("qwen3-235b-a22b.json", "qwen3-235b-a22b"),
        ("llama-3.1-70b.json", "llama-3.1-70b"),
        ("mixtral-8x7b.json", "mixtral-8x7b"),
    ],
)
def test_import_gives_the_built_in_arch(config, built_in, tmp_path):
    imported, text = import_hf_config(HF_CONFIGS / config)
    expected = load_arch(built_in)
    assert imported.name == built_in  # named after the file
    assert imported.model_dump(exclude={"name", "source"}) == expected.model_dump(exclude={"name", "source"})
    assert (imported.total_params(), imported.active_params()) == (expected.total_params(), expected.active_params())
    # The YAML round-trips, and every figure names its config.json source in a comment.
    path = tmp_path / f"{built_in}.yaml"
    path.write_text(text)
    assert load_arch(str(path)) == imported
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "  # " in line, line


@pytest.mark.parametrize(
    ("config", "total", "non_embedding"),
    [
        ("qwen2.5-7b-instruct.json", 7.61e9, 6.53e9),  # Qwen2.5-7B model card
        ("qwen3-8b.json", 8.2e9, 6.95e9),  # Qwen3-8B model card
        ("deepseek-v2-lite.json", 15.7e9, None),  # DeepSeek-V2-Lite model card: 15.7B total
    ],
)
def test_import_other_families_matches_model_cards(config, total, non_embedding):
    arch, _ = import_hf_config(HF_CONFIGS / config)
    assert arch.total_params() == pytest.approx(total, rel=0.01)
    if non_embedding is not None:
        assert non_embedding_params(arch) == pytest.approx(non_embedding, rel=0.01)


def test_import_family_details():
    qwen2, _ = import_hf_config(HF_CONFIGS / "qwen2.5-7b-instruct.json")
    assert qwen2.attention.qkv_bias and not qwen2.attention.qk_norm and qwen2.attention.head_dim == 128
    qwen3, _ = import_hf_config(HF_CONFIGS / "qwen3-8b.json")
    assert qwen3.attention.qk_norm and not qwen3.attention.qkv_bias
    lite, _ = import_hf_config(HF_CONFIGS / "deepseek-v2-lite.json")
    assert lite.attention.mla is not None and lite.attention.mla.q_lora_rank is None
    assert lite.ffn.moe is not None and lite.ffn.moe.gating == "softmax" and lite.ffn.moe.shared_experts == 2
    assert lite.ffn.moe.dense_layers == [0]


def _config(name: str, **changes) -> dict:
    data = json.loads((HF_CONFIGS / name).read_text())
    data.update(changes)
    return data


def _import_dict(config: dict, tmp_path: Path, name: str = "config.json") -> Arch:
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return import_hf_config(path)[0]


def test_import_layer_patterns(tmp_path):
    qwen = _import_dict(_config("qwen3-235b-a22b.json", decoder_sparse_step=2, mlp_only_layers=[5]), tmp_path)
    assert qwen.ffn.moe is not None
    assert qwen.ffn.moe.dense_layers == [*range(0, 5, 2), 5, *range(6, 94, 2)]  # (i + 1) % 2 != 0, plus 5
    ds = _import_dict(_config("deepseek-v3.json", first_k_dense_replace=1, moe_layer_freq=2), tmp_path)
    assert ds.ffn.moe is not None and ds.ffn.moe.dense_layers == [0, *range(1, 61, 2)]
    assert ds.moe_layer_count() == 30


def test_import_default_name_is_the_folder_of_a_config_json(tmp_path):
    folder = tmp_path / "Llama-3.1-70B"
    folder.mkdir()
    arch = _import_dict(_config("llama-3.1-70b.json"), folder)
    assert arch.name == "llama-3.1-70b"
    assert import_hf_config(HF_CONFIGS / "llama-3.1-70b.json", name="my-llama")[0].name == "my-llama"


def test_import_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="model_type 'gpt2' is not supported; supported: deepseek_v2"):
        sourced_arch({"model_type": "gpt2"}, "x", "gpt2.json")
    missing = _config("mixtral-8x7b.json")
    del missing["num_local_experts"]
    with pytest.raises(SpecError, match="field 'num_local_experts' is missing"):
        _import_dict(missing, tmp_path)
    with pytest.raises(SpecError, match="field 'num_hidden_layers' is 'many'; expected an integer"):
        _import_dict(_config("deepseek-v3.json", num_hidden_layers="many"), tmp_path)
    with pytest.raises(SpecError, match="malformed JSON at line 1"):
        bad = tmp_path / "bad.json"
        bad.write_text("{oops")
        import_hf_config(bad)
    with pytest.raises(SpecError, match="does not exist"):
        import_hf_config(tmp_path / "missing.json")
    assert yaml.safe_load(import_hf_config(HF_CONFIGS / "qwen3-8b.json")[1])["ffn"]["moe"] is None
