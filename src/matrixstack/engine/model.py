"""The decoder: a transformer built from an `Arch` (gpt-fast / nano-vllm style), run over a paged KV cache.

Layers: RMSNorm; RoPE (`rope_theta`; half-split pairs as Llama/Qwen for GQA/MHA, adjacent pairs on the rope part
of q/k only for MLA, as DeepSeek); attention GQA/MHA (optional qkv bias and Qwen3 qk-norm) or MLA (DeepSeek);
a dense SwiGLU FFN or an MoE block (`engine.moe`). Module names follow Hugging Face checkpoints (see
`engine.weights`), with the `model.` prefix dropped: `embed_tokens`, `layers[i].self_attn`, `layers[i].mlp`,
`norm`, `lm_head`.

KV cache per layer (`allocate_kv_cache`, head-major as `engine.attention` explains): GQA/MHA stacks K and V, [2,
kv_heads, num_blocks, block_size, head_dim]; MLA stores the normalised compressed latent and the rotated rope key
per token, [1, num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]. MLA attends over that latent directly,
with the key/value up-projections absorbed into the query and the output ("weight absorption");
`reference_forward` instead up-projects K and V per head, so the tests compare two independent formulations.

Without a cache (the reference and training path) attention is full causal over a padded batch [B, T], or over a
`PackedBatch`: the flat tokens [N] of several sequences without padding, placed in the padded batch for the
attention kernel alone (training: every other op runs on the real tokens only; same numbers within round-off).

Serving fast paths (no gradients wanted; training and gradient checks take the plain module calls, so every
parameter gets its gradient): q/k/v run as one GEMM and gate/up as one (`moe.FusedLinears`, the linears'
weights are views into the fused tensor, checkpoint names unchanged); RoPE factors are computed once per forward
(`RopeAngles`) and q and k are rotated together; linear weights are stored input-major (`moe.input_major_`),
which reads them faster for the few rows of a decode step, and a tied lm_head keeps an input-major copy of the
embedding for the logits of one or two rows; RMSNorm is one fused op in float32. Results match the plain paths
within float32 round-off (tests/test_engine_fastpaths.py).

Batched LoRA (serving): `forward(..., lora=LoraBatch)` adds each token's own adapter delta (`engine.lora_batch`) at
the serving sites of GQA/MHA attention (the fused q/k/v GEMM, o_proj) and of the dense and shared-expert FFNs (the
fused gate/up GEMM, down_proj). Each such module knows its path (`lora_site`, set at construction) to look its
weights up. MLA projections and routed experts have no LoRA site (`engine.lora_slots` refuses adapters on them);
the reference and training paths never take a `LoraBatch`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from matrixstack.arch.spec import Arch
from matrixstack.engine.attention import AttentionMetadata, build_metadata, paged_attention, write_cache
from matrixstack.engine.lora_batch import LoraBatch
from matrixstack.engine.moe import (
    ExpertExecutor,
    FusedLinears,
    LocalExperts,
    MoEBlock,
    Router,
    SwiGLU,
    input_major_,
    wants_grad,
)

INIT_STD = 0.02  # normal init of projections and embeddings (GPT-2 / Llama convention)
TIED_COPY_MAX_BYTES = 256 * 2**20  # largest tied embedding given an input-major copy for the logits
# the copy is read for at most this many rows: tiny-moe's 256 x 4096 logits GEMM on one core took 70 vs 125 us for
# 1 row, 137 vs 200 us for 2, and was slower from 4 rows on (258 vs 222 us; 1,899 vs 1,603 us for 32)
TIED_COPY_MAX_ROWS = 2


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in float32 (Llama / DeepSeek)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the normalised `x`, same shape and dtype (one fused op in float32)."""
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RopeAngles(NamedTuple):
    """One forward pass's RoPE factors in the model dtype, shaped [..., T, 1, d] to broadcast over heads: `cos`
    and `sin` (d = rotary dim / 2, for the interleaved layout), `cos2` = cat(cos, cos) and `sin2` =
    cat(-sin, sin) (d = rotary dim, for the half-split layout: x * cos2 + cat(x2, x1) * sin2)."""

    cos: torch.Tensor
    sin: torch.Tensor
    cos2: torch.Tensor
    sin2: torch.Tensor


class Rotary(nn.Module):
    """RoPE angles: `forward(positions)` returns (cos, sin), each [..., T, dim / 2], float32 whatever the model
    dtype (the frequencies are not a buffer, so `model.to(bfloat16)` cannot round them); `angles(positions,
    dtype)` returns them as `RopeAngles`, computed once per forward pass and shared by every layer."""

    def __init__(self, dim: int, theta: float):
        super().__init__()
        self.dim, self.theta = dim, theta

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (cos, sin) of position x frequency for integer `positions` [..., T]."""
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float32, device=positions.device) / self.dim
        angles = positions.float()[..., None] / self.theta**exponents
        return angles.cos(), angles.sin()

    def angles(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeAngles:
        """Return the `RopeAngles` of `positions` [..., T] in `dtype`."""
        cos, sin = self(positions)
        cos, sin = cos[..., None, :].to(dtype), sin[..., None, :].to(dtype)
        return RopeAngles(cos, sin, torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1))


def apply_rope(x: torch.Tensor, rope: RopeAngles, interleaved: bool) -> torch.Tensor:
    """Return `x` [..., T, heads, dim] rotated by position; pairs are (i, i + dim/2), or (2i, 2i + 1) when
    `interleaved` (DeepSeek's rope layout). The half-split form x * cos2 + cat(x2, x1) * sin2 is the same
    arithmetic, bit for bit, as cat(x1 cos - x2 sin, x2 cos + x1 sin)."""
    if interleaved:
        cos, sin = rope.cos, rope.sin
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * rope.cos2 + torch.cat((x2, x1), dim=-1) * rope.sin2


class PackedBatch(NamedTuple):
    """Sequences of different lengths laid flat, without padding (the training path's layout): flat token n is
    position `index[n] % width` of row `index[n] // width` of the right-padded [rows, width] batch, `index` [N]
    int64 ascending."""

    index: torch.Tensor
    rows: int
    width: int

    def pad(self, flat: torch.Tensor) -> torch.Tensor:
        """Return flat tokens [N, ...] placed in a zero-padded [rows, width, ...] batch."""
        padded = flat.new_zeros(self.rows * self.width, *flat.shape[1:]).index_copy(0, self.index, flat)
        return padded.unflatten(0, (self.rows, self.width))

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """Return the tokens [N, ...] of a padded batch [rows, width, ...] (the inverse of `pad`)."""
        return padded.flatten(0, 1).index_select(0, self.index)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, packed: PackedBatch | None = None
) -> torch.Tensor:
    """Return full causal attention for q [B, T, heads, d], k/v [B, T, kv_heads, d] as [B, T, heads, dv]; with
    `packed`, for the flat tokens of its sequences, q [N, heads, d], k/v [N, kv_heads, d], as [N, heads, dv]
    (each sequence attends to itself only: right padding comes after every token that could see it)."""
    if packed is not None:
        return packed.unpad(causal_attention(packed.pad(q), packed.pad(k), packed.pad(v), scale))
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2)


class GQAAttention(nn.Module):
    """Multi-head / grouped-query attention with optional qkv biases and per-head q/k RMSNorm (Qwen3); LoRA sites
    `<lora_site>.qkv` and `<lora_site>.o_proj` on the serving path."""

    lora_site = ""  # the module's path in the model, set by MoETransformer

    def __init__(self, arch: Arch):
        super().__init__()
        a = arch.attention
        self.heads, self.kv_heads, self.head_dim = a.heads, a.kv_heads, a.head_dim
        self.q_proj = nn.Linear(arch.hidden_size, a.heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(arch.hidden_size, a.kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(arch.hidden_size, a.kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.heads * a.head_dim, arch.hidden_size, bias=False)
        self.q_norm = RMSNorm(a.head_dim, arch.rms_norm_eps) if a.qk_norm else None
        self.k_norm = RMSNorm(a.head_dim, arch.rms_norm_eps) if a.qk_norm else None
        self.scale = a.head_dim**-0.5
        self.qkv = FusedLinears(self.q_proj, self.k_proj, self.v_proj)

    def _apply(self, fn, recurse=True):
        """Convert as `nn.Module` does, then fuse q/k/v again (the conversion gave each its own tensor)."""
        super()._apply(fn, recurse)
        self.qkv.refresh()
        return self

    def _project(
        self, x: torch.Tensor, rope: RopeAngles, lora: LoraBatch | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (rotated q [..., heads, d], rotated k [..., kv_heads, d], v [..., kv_heads, d]).

        Without gradients, one GEMM for q, k and v (plus the step's LoRA deltas on their slices) and one RoPE call
        for q and k together."""
        if wants_grad(self, x):
            q = self.q_proj(x).unflatten(-1, (self.heads, self.head_dim))
            k = self.k_proj(x).unflatten(-1, (self.kv_heads, self.head_dim))
            v = self.v_proj(x).unflatten(-1, (self.kv_heads, self.head_dim))
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            return apply_rope(q, rope, interleaved=False), apply_rope(k, rope, interleaved=False), v
        qkv = self.qkv(x)
        if lora is not None:
            qkv = lora.add(f"{self.lora_site}.qkv", x, qkv)
        qkv = qkv.unflatten(-1, (self.heads + 2 * self.kv_heads, self.head_dim))
        qk, v = qkv.split([self.heads + self.kv_heads, self.kv_heads], dim=-2)
        if self.q_norm is not None:
            q, k = qk.split([self.heads, self.kv_heads], dim=-2)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=-2)
        q, k = apply_rope(qk, rope, interleaved=False).split([self.heads, self.kv_heads], dim=-2)
        return q, k, v

    def forward(
        self,
        x,
        rope: RopeAngles,
        meta: AttentionMetadata | PackedBatch | None,
        cache: torch.Tensor | None,
        lora: LoraBatch | None = None,
    ) -> torch.Tensor:
        """Return the attention output, same shape as `x`: over the paged `cache` when `meta` is an
        `AttentionMetadata` (x is [T, H]; `lora` adds the step's adapter deltas), else full causal attention
        without cache (x is [B, T, H], or the flat [N, H] tokens of a `PackedBatch` `meta`)."""
        q, k, v = self._project(x, rope, lora)
        if meta is None or isinstance(meta, PackedBatch):
            out = causal_attention(q, k, v, self.scale, meta)
        else:
            write_cache(cache[0], meta.slot_mapping, k)
            write_cache(cache[1], meta.slot_mapping, v)
            out = paged_attention(q, cache[0], cache[1], meta, self.scale)
        out = out.flatten(-2)
        projected = self.o_proj(out)
        return projected if lora is None else lora.add(f"{self.lora_site}.o_proj", out, projected)


class MLAAttention(nn.Module):
    """DeepSeek multi-head latent attention: K and V come from one compressed latent per token."""

    def __init__(self, arch: Arch):
        super().__init__()
        a, m = arch.attention, arch.attention.mla
        self.heads, self.m = a.heads, m
        hidden, eps = arch.hidden_size, arch.rms_norm_eps
        if m.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, a.heads * a.head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, m.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, eps)
            self.q_b_proj = nn.Linear(m.q_lora_rank, a.heads * a.head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, m.kv_lora_rank + m.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, eps)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, a.heads * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = nn.Linear(a.heads * m.v_head_dim, hidden, bias=False)
        self.scale = a.head_dim**-0.5

    def _query(self, x: torch.Tensor, rope: RopeAngles) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (q_nope [..., heads, nope], rotated q_pe [..., heads, rope])."""
        q = self.q_proj(x) if self.m.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.unflatten(-1, (self.heads, -1))
        q_nope, q_pe = q.split([self.m.qk_nope_head_dim, self.m.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, rope, interleaved=True)

    def _latent(self, x: torch.Tensor, rope: RopeAngles) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (normalised latent [..., kv_lora_rank], rotated rope key [..., 1, rope]): what the cache keeps."""
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.m.kv_lora_rank, self.m.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(latent), apply_rope(k_pe[..., None, :], rope, interleaved=True)

    def forward(
        self, x, rope: RopeAngles, meta: AttentionMetadata | PackedBatch | None, cache, lora=None
    ) -> torch.Tensor:
        """Return the attention output, same shape as `x`: absorbed attention over the paged latent `cache`
        when `meta` is an `AttentionMetadata` (x is [T, H]), else the up-projected reference (x is [B, T, H], or
        the flat [N, H] tokens of a `PackedBatch` `meta`). MLA has no LoRA site: `lora` is accepted for a
        uniform call and unused (adapters on MLA projections are refused)."""
        q_nope, q_pe = self._query(x, rope)
        latent, k_pe = self._latent(x, rope)
        nope, lora = self.m.qk_nope_head_dim, self.m.kv_lora_rank
        if meta is None or isinstance(meta, PackedBatch):
            k_nope, v = self.kv_b_proj(latent).unflatten(-1, (self.heads, -1)).split([nope, self.m.v_head_dim], -1)
            k = torch.cat((k_nope, k_pe.expand(*k_nope.shape[:-1], -1)), dim=-1)
            out = causal_attention(torch.cat((q_nope, q_pe), dim=-1), k, v, self.scale, meta)
        else:
            write_cache(cache, meta.slot_mapping, torch.cat((latent[:, None], k_pe), dim=-1))
            w_kv_b = self.kv_b_proj.weight.view(self.heads, -1, lora)
            q_latent = torch.einsum("thn,hnc->thc", q_nope, w_kv_b[:, :nope])
            out_latent = paged_attention(torch.cat((q_latent, q_pe), -1), cache, None, meta, self.scale, lora)
            out = torch.einsum("thc,hvc->thv", out_latent, w_kv_b[:, nope:])
        return self.o_proj(out.flatten(-2))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(x)); the FFN is dense SwiGLU or MoE."""

    def __init__(self, arch: Arch, index: int, expert_ids: set[int] | None):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = MLAAttention(arch) if arch.attention.kind == "mla" else GQAAttention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        if arch.is_moe_layer(index):
            self.mlp = MoEBlock(index, arch.hidden_size, arch.ffn.moe, expert_ids)
        else:
            self.mlp = SwiGLU(arch.hidden_size, arch.ffn.dense_intermediate)

    def forward(self, x, rope: RopeAngles, meta, cache, executor: ExpertExecutor, lora=None) -> torch.Tensor:
        """Return the layer output, same shape as `x` (`lora`: the step's `LoraBatch`, or None)."""
        h = x + self.self_attn(self.input_layernorm(x), rope, meta, cache, lora)
        normed = self.post_attention_layernorm(h)
        return h + (self.mlp(normed, executor, lora) if isinstance(self.mlp, MoEBlock) else self.mlp(normed, lora))


class MoETransformer(nn.Module):
    """A decoder-only transformer for any `Arch` (dense or MoE; MHA, GQA or MLA).

    `expert_ids` materialises only those routed experts in every MoE layer (the rest are `MissingExpert`
    placeholders). `experts` runs the routed experts; it defaults to `LocalExperts` over this model's experts and
    is kept as `model.expert_executor`, which an expert-parallel runtime may set after construction.
    """

    def __init__(
        self,
        arch: Arch,
        dtype: torch.dtype = torch.float32,
        expert_ids: set[int] | None = None,
        experts: ExpertExecutor | None = None,
    ):
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, i, expert_ids) for i in range(arch.layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = None if arch.tie_embeddings else nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        a = arch.attention
        self.rotary = Rotary(a.mla.qk_rope_head_dim if a.mla else a.head_dim, arch.rope_theta)
        self.apply(_init_weights)
        self.to(dtype)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                input_major_(module)  # fused and stacked ones already are (their views are not contiguous)
        self._logits_weight: tuple | None = None  # (source key, input-major copy) of a tied lm_head
        for path, module in self.named_modules():
            if isinstance(module, GQAAttention | SwiGLU):
                module.lora_site = path
        moe_experts = {i: layer.mlp.experts for i, layer in enumerate(self.layers) if isinstance(layer.mlp, MoEBlock)}
        self.expert_executor: ExpertExecutor = LocalExperts(moe_experts) if experts is None else experts

    def _hidden(self, input_ids, positions, meta, kv_cache, lora: LoraBatch | None = None) -> torch.Tensor:
        """Return the final-normed hidden states for the tokens, [..., T, H]."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary.angles(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, meta, None if kv_cache is None else kv_cache[i], self.expert_executor, lora)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata | PackedBatch | None,
        kv_cache: list[torch.Tensor] | None,
        lora: LoraBatch | None = None,
    ) -> torch.Tensor:
        """Return the final-normed hidden states [T, H] of a flat batch of new tokens; writes their KV to the cache.

        `input_ids` and `positions` are [T] (int64), laid out as `meta.cu_seqlens_q` says; pick the rows to
        sample from and pass them to `compute_logits`. `lora` adds each token's adapter delta (module docstring).
        Without a cache (the training path): `meta` None takes a padded batch [B, T] (full causal attention), a
        `PackedBatch` the flat tokens [N] of its sequences (each attending to itself).
        """
        return self._hidden(input_ids, positions, meta, kv_cache, lora)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return float32 logits [..., vocab] for final-normed hidden states [..., H]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        rows = hidden.numel() // hidden.shape[-1]
        if self.lm_head is None and rows <= TIED_COPY_MAX_ROWS and not torch.is_grad_enabled():
            weight = self._tied_logits_weight(weight)
        logits = F.linear(hidden, weight)
        return logits if logits.dtype == torch.float32 else logits.float()

    def _tied_logits_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Return the tied embedding as an input-major [vocab, H] view of a kept copy (`input_major_`: faster for
        decode), made again whenever the embedding changed (pointer or in-place version); the embedding itself
        stays row-major for the lookup. Falls back to the embedding when the copy would exceed
        TIED_COPY_MAX_BYTES or when its version is not tracked (a model built under `torch.inference_mode`)."""
        if weight.numel() * weight.element_size() > TIED_COPY_MAX_BYTES or weight.is_inference():
            return weight
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._logits_weight is None or self._logits_weight[0] != key:
            with torch.inference_mode(False):
                self._logits_weight = (key, weight.detach().t().contiguous().t())
        return self._logits_weight[1]

    def reference_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Return float32 logits [T, V] (or [B, T, V]) of full causal attention over `input_ids` [T] (or [B, T]),
        without a KV cache: the test reference and the training path."""
        batch = input_ids if input_ids.dim() == 2 else input_ids[None]
        positions = torch.arange(batch.shape[-1], device=batch.device)
        logits = self.compute_logits(self._hidden(batch, positions, None, None))
        return logits if input_ids.dim() == 2 else logits[0]

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[torch.Tensor]:
        """Return one zeroed cache tensor per layer on the model's device and dtype (layout in the module doc)."""
        a = self.arch.attention
        shape = (
            (1, num_blocks, block_size, a.mla.kv_lora_rank + a.mla.qk_rope_head_dim)
            if a.mla
            else (2, a.kv_heads, num_blocks, block_size, a.head_dim)
        )
        weight = self.embed_tokens.weight
        return [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in self.layers]

    def kv_bytes_per_block(self, block_size: int) -> int:
        """Return the cache bytes of one block across all layers."""
        per_token = self.arch.attention.kv_elements_per_token_per_layer() * self.arch.layers
        return per_token * block_size * self.embed_tokens.weight.element_size()


def _init_weights(module: nn.Module) -> None:
    """Initialise projections, embeddings and routers from N(0, INIT_STD); biases start at zero."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, Router):
        nn.init.normal_(module.weight, std=INIT_STD)


@torch.inference_mode()
def greedy_generate(
    model: MoETransformer, prompt_ids: list[int], max_new_tokens: int, block_size: int = 16
) -> list[int]:
    """Return the `max_new_tokens` token ids that greedy decoding appends to `prompt_ids`.

    One sequence through the paged path: the prompt in one prefill step, then one token per decode step.
    """
    num_blocks = math.ceil((len(prompt_ids) + max_new_tokens) / block_size)
    cache = model.allocate_kv_cache(num_blocks, block_size)
    table = [list(range(num_blocks))]
    device = model.embed_tokens.weight.device
    tokens, new = list(prompt_ids), len(prompt_ids)
    for _ in range(max_new_tokens):
        meta = build_metadata(table, [len(tokens)], [new], block_size, device)
        ids = torch.tensor(tokens[-new:], device=device)
        hidden = model(ids, meta.positions(), meta, cache)
        tokens.append(int(model.compute_logits(hidden[-1]).argmax()))
        new = 1
    return tokens[len(prompt_ids) :]
