"""The engine's fast paths give the same results as the plain ones they replace.

Grouped expert execution (stacked weights, grouped GEMMs) against one module call per expert; fused q/k/v and
gate/up projections against the separate linears (also after `.to()` and after a weight tensor is replaced);
batched paged attention with decodes split by context length against full attention; the training path still
reaching every parameter; `detokenize=False`.
"""

from __future__ import annotations

import pydantic
import pytest
import torch
from torch import nn

from matrixstack.arch import load_arch
from matrixstack.engine import cpu_kernels
from matrixstack.engine import moe as moe_module
from matrixstack.engine.attention import (
    MIN_SPLIT_SAVING_KEYS,
    _decode_attention,
    _gather,
    _split_by_length,
    build_metadata,
)
from matrixstack.engine.config import EngineConfig, SamplingParams
from matrixstack.engine.llm_engine import LLMEngine
from matrixstack.engine.loading import load_model
from matrixstack.engine.model import MoETransformer
from matrixstack.engine.model_runner import ModelRunner
from matrixstack.engine.moe import ExpertList

ARCH = load_arch("tiny-moe")
ATOL = 1e-4


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """Leave torch's global random state as the test found it (other modules' tests depend on it)."""
    with torch.random.fork_rng(devices=[]):
        yield


def randomized(seed: int = 0, **kwargs) -> MoETransformer:
    """Return tiny-moe with large random weights (errors show in the outputs)."""
    torch.manual_seed(seed)
    model = MoETransformer(ARCH, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return model.eval()


def routed(tokens: int, seed: int = 0, experts: int = 8, k: int = 2):
    """Return (hidden [T, H], topk_ids [T, k], topk_weights [T, k]) with distinct experts per token."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, ARCH.hidden_size, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    return hidden, ids, torch.rand(tokens, k, generator=gen)


def module_loop(experts, hidden, ids, weights) -> torch.Tensor:
    """The plain reference: each token through its experts' modules, one at a time."""
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for j in range(ids.shape[1]):
            out[t] += weights[t, j] * experts[int(ids[t, j])](hidden[t : t + 1])[0]
    return out


@pytest.mark.parametrize("tokens", [1, 7, 64])
@torch.inference_mode()
def test_grouped_experts_match_one_call_per_expert(tokens, monkeypatch):
    experts = randomized().layers[1].mlp.experts
    assert isinstance(experts, ExpertList) and experts.holds_all
    hidden, ids, weights = routed(tokens)
    want = module_loop(experts, hidden, ids, weights)
    torch.testing.assert_close(moe_module.apply_experts(experts, hidden, ids, weights), want, atol=ATOL, rtol=0)
    plain = nn.ModuleList(list(experts))  # not an ExpertList: the per-expert loop
    torch.testing.assert_close(moe_module.apply_experts(plain, hidden, ids, weights), want, atol=ATOL, rtol=0)
    for method in ("grouped", "padded", "loop"):  # every way of running the sorted rows
        monkeypatch.setattr(moe_module, "expert_method", lambda rows, method=method: method)
        torch.testing.assert_close(experts.grouped(hidden, ids, weights), want, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_expert_weights_are_views_into_the_stack():
    model = randomized()
    experts = model.layers[1].mlp.experts
    start, end = experts.w13.data_ptr(), experts.w13.data_ptr() + experts.w13.numel() * 4
    assert all(start <= experts[e].up_proj.weight.data_ptr() < end for e in range(8))
    assert {n for n in model.state_dict() if n.startswith("layers.1.mlp.experts.3.")} == {
        f"layers.1.mlp.experts.3.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")
    }  # checkpoint names unchanged
    hidden, ids, weights = routed(16)
    experts[3].up_proj.weight.add_(0.5)  # an in-place edit (as load_weights does) reaches the stack
    torch.testing.assert_close(
        experts.grouped(hidden, ids, weights), module_loop(experts, hidden, ids, weights), atol=1e-4, rtol=0
    )
    experts[5].down_proj.weight.data = torch.randn(ARCH.hidden_size, 128)  # a replaced tensor: stacked again
    got = moe_module.apply_experts(experts, hidden, ids, weights)
    torch.testing.assert_close(got, module_loop(experts, hidden, ids, weights), atol=ATOL, rtol=0)
    model.to(torch.float64)  # a conversion stacks again, in the new dtype
    assert experts.w13.dtype == torch.float64 and experts[0].gate_proj.weight.data_ptr() == experts.w13.data_ptr()
    hidden = hidden.double()
    got = moe_module.apply_experts(experts, hidden, ids, weights)
    torch.testing.assert_close(got, module_loop(experts, hidden, ids, weights.double()), atol=ATOL, rtol=0)


@torch.inference_mode()
def test_an_expert_subset_stacks_only_its_experts():
    full = randomized()
    part = MoETransformer(ARCH, expert_ids={1, 6})
    part.load_state_dict(full.state_dict(), strict=False)
    experts = part.layers[2].mlp.experts
    assert experts.w13.shape[0] == 2 and not experts.holds_all
    assert experts.local_index.tolist() == [-1, 0, -1, -1, -1, -1, 1, -1]
    rows = torch.randn(5, ARCH.hidden_size)
    got = experts.run_sorted(rows, torch.tensor([2, 3]))  # rows 0-1 through expert 1, rows 2-4 through 6
    want = torch.cat([experts[1](rows[:2]), experts[6](rows[2:])])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # an expert-parallel worker's rows, in any order, each with its routing weight; and none at all
    expert_ids, weights = torch.tensor([6, 1, 6, 6, 1]), torch.rand(5)
    want = torch.stack([weights[n] * experts[int(e)](rows[n : n + 1])[0] for n, e in enumerate(expert_ids)])
    torch.testing.assert_close(experts.rows(rows, expert_ids, weights), want, atol=ATOL, rtol=0)
    assert experts.rows(rows[:0], expert_ids[:0], weights[:0]).shape == (0, ARCH.hidden_size)


def test_fused_projections_match_separate_linears_and_follow_weight_changes():
    model = randomized()
    ids = torch.arange(23) * 7 % ARCH.vocab_size
    with torch.inference_mode():
        fused = model.reference_forward(ids)  # fused q/k/v, gate/up, grouped experts
    separate = model.reference_forward(ids).detach()  # grad mode: every linear and expert module on its own
    torch.testing.assert_close(fused, separate, atol=1e-4, rtol=0)
    attn = model.layers[2].self_attn
    attn.k_proj.weight.data = torch.randn_like(attn.k_proj.weight)  # replaced, not edited: fused again
    model.layers[0].mlp.up_proj.weight.data = torch.randn_like(model.layers[0].mlp.up_proj.weight)
    with torch.inference_mode():
        fused = model.reference_forward(ids)
    torch.testing.assert_close(fused, model.reference_forward(ids).detach(), atol=1e-4, rtol=0)


def test_training_reaches_every_parameter():
    model = randomized().train()
    logits = model.reference_forward(torch.arange(12) % ARCH.vocab_size)
    logits.logsumexp(-1).sum().backward()
    experts = model.layers[1].mlp.experts
    assert model.layers[1].self_attn.k_proj.weight.grad is not None
    assert any(experts[e].gate_proj.weight.grad is not None for e in range(8))
    assert model.layers[0].mlp.up_proj.weight.grad is not None


def test_decodes_split_by_context_length():
    ctx = [20, 24, 400, 410, 30]
    groups = _split_by_length(list(range(5)), ctx, block_size=16)
    assert sorted(map(sorted, groups)) == [[0, 1, 4], [2, 3]]
    assert _split_by_length([0, 1, 2], [100, 101, 99], 16) == [[0, 1, 2]]  # no cut worth it: batch order
    assert MIN_SPLIT_SAVING_KEYS > 0


@pytest.mark.parametrize("native", [True, False], ids=["native-decode", "torch-decode"])
@torch.inference_mode()
def test_paged_decode_groups_and_chunks_match_the_reference(native, monkeypatch):
    """Decodes of very different lengths (several groups) next to a prefill chunk, against full attention."""
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "1" if native else "0")
    if native and cpu_kernels.numba is None:
        pytest.skip("numba is not installed: only the PyTorch decode path exists")
    model = randomized(seed=3)
    block_size = 16
    gen = torch.Generator().manual_seed(4)
    lengths = [9, 700, 715, 40]
    tokens = [torch.randint(0, ARCH.vocab_size, (n + 1,), generator=gen) for n in lengths]
    tables, next_block = [], 0
    for t in tokens:
        blocks = -(-len(t) // block_size)
        tables.append(list(range(next_block + blocks - 1, next_block - 1, -1)))  # out of order, as a pool would
        next_block += blocks
    cache = model.allocate_kv_cache(next_block, block_size)
    prefill = build_metadata(tables[:3], lengths[:3], lengths[:3], block_size)
    model(torch.cat([t[:n] for t, n in zip(tokens[:3], lengths[:3], strict=True)]), prefill.positions(), prefill, cache)
    # one step: three decodes (9, 700, 715 cached tokens) and the whole prompt of the fourth sequence
    step = build_metadata(tables, [n + 1 for n in lengths[:3]] + [lengths[3]], [1, 1, 1, lengths[3]], block_size)
    assert len(step.plan()) == 3  # decodes in two length groups, plus the chunk
    ids = torch.cat([tokens[0][-1:], tokens[1][-1:], tokens[2][-1:], tokens[3][: lengths[3]]])
    logits = model.compute_logits(model(ids, step.positions(), step, cache))
    for i in range(3):
        torch.testing.assert_close(logits[i], model.reference_forward(tokens[i])[-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[3:], model.reference_forward(tokens[3][: lengths[3]]), atol=1e-4, rtol=0)


def test_detokenize_false_returns_the_same_tokens_without_text():
    model, tokenizer = load_model("tiny-moe")
    config = EngineConfig(num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=256, max_model_len=256)
    prompt = tokenizer.encode("def main():", add_bos=True)
    texts = {}
    for detokenize in (True, False):
        engine = LLMEngine(ModelRunner(model, config), tokenizer, config)
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=detokenize)
        texts[detokenize] = engine.generate([prompt], params)[0]
    assert texts[True].token_ids == texts[False].token_ids and texts[True].text and texts[False].text == ""
    with pytest.raises(pydantic.ValidationError, match="stop strings need the output text"):
        SamplingParams(stop=["\n"], detokenize=False)


@pytest.fixture(params=["serial", "parallel"])
def kernel_threads(request, monkeypatch):
    """Run the native kernel as it decides (short contexts: one thread), or on two threads (`prange`) whatever the
    context: yields None, or the calls made to the parallel kernel (a list that grows)."""
    calls = []
    if request.param == "serial":
        yield None
        return
    if cpu_kernels.numba is None or cpu_kernels.numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba runs one thread here")
    scores = cpu_kernels._scores_parallel
    monkeypatch.setattr(cpu_kernels, "PARALLEL_MIN_KEYS", 1)
    monkeypatch.setattr(cpu_kernels, "_scores_parallel", lambda *args: calls.append(1) or scores(*args))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield calls
    torch.set_num_threads(threads)


@pytest.mark.skipif(cpu_kernels.numba is None, reason="numba is not installed")
@pytest.mark.parametrize(("kv_heads", "heads", "dim", "v_dim"), [(2, 4, 64, 64), (1, 4, 24, 16)], ids=["gqa", "mla"])
def test_native_decode_kernel_matches_the_torch_path(kv_heads, heads, dim, v_dim, kernel_threads):
    """The numba kernel, on one thread and on two, against `_decode_attention` over the same gathered blocks (MLA:
    values are a view)."""
    gen = torch.Generator().manual_seed(7)
    block_size, lengths = 16, [1, 17, 200, 64]
    width = -(-max(lengths) // block_size)
    key_cache = torch.randn(kv_heads, 64, block_size, dim, generator=gen)
    value_cache = key_cache[..., :v_dim] if v_dim < dim else torch.randn(kv_heads, 64, block_size, v_dim, generator=gen)
    order = torch.randperm(64, generator=gen)
    tables = [order[i * width : i * width + -(-n // block_size)].tolist() for i, n in enumerate(lengths)]
    meta = build_metadata(tables, lengths, [1] * len(lengths), block_size)
    queries = torch.randn(len(lengths), heads, dim, generator=gen)
    groups = meta.plan()
    assert groups and all(g.q_len == 1 and g.block_table.dtype == torch.int32 for g in groups)
    for group in groups:
        rows = queries if group.q_rows is None else queries[group.q_rows]
        ours = cpu_kernels.decode_attention(rows, key_cache, value_cache, group.block_table, group.context_lens, 0.3)
        keys = _gather(key_cache, group, "keys").clone()
        values = keys[..., :v_dim] if v_dim < dim else _gather(value_cache, group, "values")
        theirs = _decode_attention(rows, keys, values, group.hidden_keys, 0.3)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert kernel_threads is None or len(kernel_threads) == len(groups)
    with torch.inference_mode():
        assert cpu_kernels.enabled(queries, key_cache)
        assert not cpu_kernels.enabled(queries.bfloat16(), key_cache.bfloat16())  # bf16: the PyTorch path
    assert not cpu_kernels.enabled(queries, key_cache)  # gradients wanted: the PyTorch path
