"""The engine's decoder: paged, chunked and decode attention against a cache-free reference; MoE routing."""

from __future__ import annotations

import math

import pytest
import torch

from matrixstack.arch import Arch, load_arch
from matrixstack.arch.spec import Moe
from matrixstack.engine import cpu_kernels
from matrixstack.engine.attention import build_metadata
from matrixstack.engine.model import MoETransformer
from matrixstack.engine.moe import LocalExperts, MissingExpert, route

ATOL = 1e-4

MLA_ARCH = Arch(
    name="tiny-mla",
    hidden_size=64,
    layers=2,
    vocab_size=97,
    tie_embeddings=False,
    native_dtype="fp32",
    rope_theta=10000.0,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    attention={
        "kind": "mla",
        "heads": 4,
        "kv_heads": 4,
        "head_dim": 24,
        "mla": {
            "q_lora_rank": 32,
            "kv_lora_rank": 16,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 12,
        },
    },
    ffn={
        "dense_intermediate": 96,
        "moe": {
            "routed_experts": 8,
            "experts_per_token": 2,
            "shared_experts": 1,
            "expert_intermediate": 32,
            "gating": "sigmoid",
            "groups": 4,
            "topk_groups": 2,
            "norm_topk_prob": True,
            "routed_scaling_factor": 2.5,
            "dense_layers": [0],
        },
    },
)

# Qwen3-MoE-like: MHA with qkv biases and qk-norm, softmax gating, no shared experts, untied head.
QWEN_ARCH = Arch(
    name="tiny-qwen",
    hidden_size=48,
    layers=2,
    vocab_size=61,
    tie_embeddings=False,
    native_dtype="fp32",
    rope_theta=1e6,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    attention={"kind": "mha", "heads": 3, "kv_heads": 3, "head_dim": 16, "qkv_bias": True, "qk_norm": True},
    ffn={
        "dense_intermediate": None,
        "moe": {
            "routed_experts": 4,
            "experts_per_token": 2,
            "expert_intermediate": 24,
            "gating": "softmax",
            "norm_topk_prob": True,
        },
    },
)

ARCHS = {"tiny-moe": load_arch("tiny-moe"), "mla": MLA_ARCH, "qwen": QWEN_ARCH}


def randomized(arch: Arch, seed: int = 0, **kwargs) -> MoETransformer:
    """Return a model whose weights are all random and large enough that errors show in the logits."""
    torch.manual_seed(seed)
    model = MoETransformer(arch, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return model.eval()


def run_step(model, cache, tokens, steps, block_tables, block_size):
    """Run one step: `steps` is [(seq, start, end)] slices of each sequence's tokens; returns {seq: logits}."""
    ids = torch.cat([tokens[s][a:b] for s, a, b in steps])
    meta = build_metadata(
        [block_tables[s] for s, _, _ in steps], [b for _, _, b in steps], [b - a for _, a, b in steps], block_size
    )
    logits = model.compute_logits(model(ids, meta.positions(), meta, cache))
    offsets = meta.cu_seqlens_q.tolist()
    return {s: logits[offsets[i] : offsets[i + 1]] for i, (s, _, _) in enumerate(steps)}


@pytest.mark.parametrize("native", [True, False], ids=["native-decode", "torch-decode"])
@pytest.mark.parametrize("name", sorted(ARCHS))
@torch.inference_mode()
def test_paged_chunked_and_decode_match_reference(name, native, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "1" if native else "0")
    if native and cpu_kernels.numba is None:
        pytest.skip("numba is not installed: only the PyTorch decode path exists")
    arch = ARCHS[name]
    model = randomized(arch)
    block_size = 4
    gen = torch.Generator().manual_seed(1)
    tokens = {
        0: torch.randint(0, arch.vocab_size, (21,), generator=gen),
        1: torch.randint(0, arch.vocab_size, (14,), generator=gen),
    }
    reference = {s: model.reference_forward(t) for s, t in tokens.items()}
    # Blocks of the two sequences interleave and come out of order, as a block manager hands them out.
    tables = {0: [9, 2, 7, 0, 11, 5], 1: [3, 10, 1, 8]}
    cache = model.allocate_kv_cache(12, block_size)
    schedule = [
        [(0, 0, 9), (1, 0, 6)],  # two prefill chunks, one of them ending mid-block
        [(1, 6, 13), (0, 9, 16)],  # second chunks in the other order
        [(0, 16, 17), (1, 13, 14)],  # decode one token each
        [(0, 17, 19)],  # MTP-style verification of two tokens
        [(0, 19, 21)],
    ]
    seen = {0: [], 1: []}
    for step in schedule:
        for seq, logits in run_step(model, cache, tokens, step, tables, block_size).items():
            seen[seq].append(logits)
    for seq, ref in reference.items():
        assert ref.abs().max() > 1.0  # the comparison is not vacuous
        torch.testing.assert_close(torch.cat(seen[seq]), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(ARCHS))
@torch.inference_mode()
def test_batched_reference_matches_single_sequences(name):
    model = randomized(ARCHS[name])
    ids = torch.randint(0, ARCHS[name].vocab_size, (3, 10), generator=torch.Generator().manual_seed(2))
    batched = model.reference_forward(ids)
    for row in range(3):
        torch.testing.assert_close(batched[row], model.reference_forward(ids[row]), atol=ATOL, rtol=0)


def test_kv_cache_layout_and_size():
    for arch in ARCHS.values():
        model = MoETransformer(arch)
        cache = model.allocate_kv_cache(num_blocks=3, block_size=8)
        assert len(cache) == arch.layers
        assert sum(t.numel() * t.element_size() for t in cache) == 3 * model.kv_bytes_per_block(8)
        assert model.kv_bytes_per_block(8) == 8 * arch.kv_bytes_per_token("fp32")
    mla = MoETransformer(MLA_ARCH).allocate_kv_cache(3, 8)[0]
    assert mla.shape == (1, 3, 8, 16 + 8)  # one head-major "head": latent + rope key per token


def naive_route(logits: torch.Tensor, moe: Moe, bias: torch.Tensor | None):
    """Route token by token in plain Python, following DeepSeek-V3's description."""
    all_ids, all_weights = [], []
    size = moe.routed_experts // moe.groups
    for row in logits.tolist():
        if moe.gating == "sigmoid":
            scores = [1 / (1 + math.exp(-x)) for x in row]
        else:
            scores = [math.exp(x) / sum(math.exp(y) for y in row) for x in row]
        choice = [s + (bias[e].item() if bias is not None else 0.0) for e, s in enumerate(scores)]
        groups = [choice[g * size : (g + 1) * size] for g in range(moe.groups)]
        group_score = [sum(sorted(g)[-2:]) if moe.gating == "sigmoid" else max(g) for g in groups]
        kept = sorted(range(moe.groups), key=lambda g: -group_score[g])[: moe.topk_groups]
        allowed = [e for e in range(moe.routed_experts) if e // size in kept]
        ids = sorted(allowed, key=lambda e: -choice[e])[: moe.experts_per_token]
        weights = [scores[e] for e in ids]
        if moe.norm_topk_prob:
            weights = [w / sum(weights) for w in weights]
        all_ids.append(ids)
        all_weights.append([w * moe.routed_scaling_factor for w in weights])
    return all_ids, all_weights


MOES = {
    "deepseek-v3-like": MLA_ARCH.ffn.moe,
    "qwen-like": QWEN_ARCH.ffn.moe,
    "softmax-groups": Moe(
        routed_experts=12,
        experts_per_token=3,
        expert_intermediate=8,
        gating="softmax",
        groups=3,
        topk_groups=2,
        norm_topk_prob=False,
        routed_scaling_factor=1.5,
    ),
}


@pytest.mark.parametrize("name", sorted(MOES))
def test_routing_matches_naive_reference(name):
    moe = MOES[name]
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(40, moe.routed_experts, generator=gen)
    bias = 0.1 * torch.randn(moe.routed_experts, generator=gen) if moe.gating == "sigmoid" else None
    ids, weights = route(logits, moe, bias)
    want_ids, want_weights = naive_route(logits, moe, bias)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    for token in range(len(logits)):
        order = ids[token].argsort()
        want = sorted(zip(want_ids[token], want_weights[token], strict=True))
        assert ids[token][order].tolist() == [e for e, _ in want]
        torch.testing.assert_close(weights[token][order], torch.tensor([w for _, w in want]))


def test_group_limited_routing_stays_in_chosen_groups():
    moe = Moe(
        routed_experts=32,
        experts_per_token=4,
        expert_intermediate=8,
        gating="sigmoid",
        groups=8,
        topk_groups=2,
        norm_topk_prob=True,
    )
    gen = torch.Generator().manual_seed(4)
    logits = 3 * torch.randn(500, 32, generator=gen)
    bias = torch.randn(32, generator=gen)
    ids, _ = route(logits, moe, bias)
    choice = (logits.sigmoid() + bias).view(500, 8, 4)
    best_groups = choice.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices
    for token in range(500):
        assert set((ids[token] // 4).tolist()) <= set(best_groups[token].tolist())


def test_expert_ids_materialise_only_those_experts():
    full = MoETransformer(ARCHS["tiny-moe"])
    part = MoETransformer(ARCHS["tiny-moe"], expert_ids={1, 6})
    for layer in part.layers[1:]:
        assert layer.mlp.held_expert_ids() == [1, 6]
        assert len(layer.mlp.experts) == 8 and isinstance(layer.mlp.experts[0], MissingExpert)
    names = {n for n in part.state_dict() if ".experts." in n}
    assert {n.split(".experts.")[1].split(".")[0] for n in names} == {"1", "6"}
    expert = ARCHS["tiny-moe"].expert_params()
    counted = sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in part.parameters())
    assert counted == 3 * 6 * expert  # 3 MoE layers x 6 experts not held
    with pytest.raises(RuntimeError, match=r"expert [0234-7] of layer 1 is not held"):  # which one: routing
        part.reference_forward(torch.arange(64))


@torch.inference_mode()
def test_custom_expert_executor_sees_every_moe_layer():
    base = randomized(ARCHS["mla"])
    calls = []

    def executor(layer, hidden, topk_ids, topk_weights):
        calls.append((layer, hidden.shape, topk_ids.shape))
        return LocalExperts({1: base.layers[1].mlp.experts})(layer, hidden, topk_ids, topk_weights)

    wrapped = randomized(ARCHS["mla"], experts=executor)
    ids = torch.arange(7)
    torch.testing.assert_close(wrapped.reference_forward(ids), base.reference_forward(ids))
    assert calls == [(1, torch.Size([7, 64]), torch.Size([7, 2]))]
