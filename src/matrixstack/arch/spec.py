"""Model architectures as data (the `Arch` spec) and what follows from them: parameters, FLOPs, bytes.

Counting conventions (all parameter counts are element counts):

- Every FFN and expert is gated (SwiGLU): three hidden x intermediate matrices.
- `total_params` is the main model: embedding table, every layer, the final norm and the LM head (once
  when tied). DeepSeek's multi-token-prediction (MTP) module is NOT included: it is reported by
  `mtp_params` (DeepSeek-V3: 671B main model; Hugging Face lists 685B = main + MTP + MTP's copy of the
  embedding and head).
- `active_params` is `total_params` minus the routed experts a token does not use: the embedding table and
  LM head are counted in full. This is how Mistral (Mixtral 12.9B) and Qwen (Qwen3 22B / 3.3B) count.
- `active_matmul_params` is what a token multiplies by: attention projections, the dense FFN or the shared
  and top-k routed experts, the routers and the LM head (also when tied); not the embedding lookup, norms
  or biases. DeepSeek counts activated parameters this way (README_WEIGHTS.md: 36.7B), and twice this is the
  per-token matmul FLOPs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from matrixstack.dtypes import BYTES_PER_ELEMENT, Dtype, bytes_for
from matrixstack.specio import Strict

Phase = Literal["prefill", "decode"]

# Embeddings, LM head, norms, biases and router gates stay at least this wide when linear layers are narrower.
HIGH_PRECISION_DTYPE: Dtype = "bf16"
GATED_FFN_MATRICES = 3  # SwiGLU: gate, up and down projections


def gated_ffn_params(hidden_size: int, intermediate: int) -> int:
    """Return the parameters of one SwiGLU FFN (gate, up, down; no biases)."""
    return GATED_FFN_MATRICES * hidden_size * intermediate


class Mla(Strict, frozen=True):
    """Multi-head latent attention dimensions (DeepSeek-V2/V3): K and V are cached as one compressed latent."""

    q_lora_rank: int | None = Field(
        gt=0, description="integer rank of the query down-projection, or null for a full-rank query projection"
    )
    kv_lora_rank: int = Field(gt=0, description="integer width of the compressed KV latent (elements per token)")
    qk_nope_head_dim: int = Field(gt=0, description="integer per-head query/key dims without rotary embedding")
    qk_rope_head_dim: int = Field(gt=0, description="integer per-head query/key dims with rotary embedding")
    v_head_dim: int = Field(gt=0, description="integer per-head value dims")


class Attention(Strict, frozen=True):
    """One layer's attention: MHA (kv_heads == heads), GQA (kv_heads divides heads) or MLA."""

    kind: Literal["mha", "gqa", "mla"] = Field(description="one of mha, gqa, mla")
    heads: int = Field(gt=0, description="integer count of query heads")
    kv_heads: int = Field(gt=0, description="integer count of key/value heads (MLA: equal to heads)")
    head_dim: int = Field(
        gt=0, description="integer query/key dims per head (MLA: qk_nope_head_dim + qk_rope_head_dim)"
    )
    qkv_bias: bool = Field(False, description="true when the q, k and v projections have biases (Qwen2)")
    qk_norm: bool = Field(False, description="true when queries and keys get a per-head RMSNorm (Qwen3)")
    mla: Mla | None = Field(None, description="mapping of MLA dimensions; required when kind is mla")

    @model_validator(mode="after")
    def _consistent(self) -> Attention:
        if (self.kind == "mla") != (self.mla is not None):
            raise ValueError("attention.mla is required when kind is mla, and only then")
        if self.kind == "mha" and self.kv_heads != self.heads:
            raise ValueError(f"mha needs kv_heads == heads (got {self.kv_heads} and {self.heads}); use kind gqa")
        if self.kind == "gqa" and self.heads % self.kv_heads:
            raise ValueError(f"gqa needs kv_heads ({self.kv_heads}) to divide heads ({self.heads})")
        if self.mla is not None:
            if self.kv_heads != self.heads:
                raise ValueError(f"mla needs kv_heads == heads (got {self.kv_heads} and {self.heads})")
            if self.head_dim != self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim:
                raise ValueError("mla needs head_dim == mla.qk_nope_head_dim + mla.qk_rope_head_dim")
        return self

    def matrix_params(self, hidden_size: int) -> int:
        """Return the projection-matrix parameters of one layer's attention (no norms, no biases)."""
        if self.mla is None:
            q_and_o = 2 * hidden_size * self.heads * self.head_dim
            k_and_v = 2 * hidden_size * self.kv_heads * self.head_dim
            return q_and_o + k_and_v
        m = self.mla
        q_out = self.heads * self.head_dim
        q = hidden_size * q_out if m.q_lora_rank is None else m.q_lora_rank * (hidden_size + q_out)
        kv_down = hidden_size * (m.kv_lora_rank + m.qk_rope_head_dim)
        kv_up = m.kv_lora_rank * self.heads * (m.qk_nope_head_dim + m.v_head_dim)
        o = self.heads * m.v_head_dim * hidden_size
        return q + kv_down + kv_up + o

    def vector_params(self) -> int:
        """Return one layer's attention norm and bias parameters (MLA latent norms, q/k norms, qkv biases)."""
        count = 0
        if self.mla is not None:
            count += self.mla.kv_lora_rank + (self.mla.q_lora_rank or 0)
        if self.qk_norm:
            count += 2 * self.head_dim
        if self.qkv_bias:
            count += (self.heads + 2 * self.kv_heads) * self.head_dim
        return count

    def kv_elements_per_token_per_layer(self) -> int:
        """Return the KV-cache elements one token stores in one layer (MLA: latent + rotary key)."""
        if self.mla is not None:
            return self.mla.kv_lora_rank + self.mla.qk_rope_head_dim
        return 2 * self.kv_heads * self.head_dim

    def score_value_dims(self, phase: Phase) -> tuple[int, int]:
        """Return (dims per head of a query-key dot product, dims per head of the value sum) in `phase`.

        GQA/MHA: (head_dim, head_dim). MLA prefill decompresses K and V per head:
        (qk_nope + qk_rope, v_head_dim). MLA decode absorbs the up-projections into the query and output and
        attends over the cached latent: (kv_lora_rank + qk_rope, kv_lora_rank).
        """
        if self.mla is None:
            return self.head_dim, self.head_dim
        if phase == "prefill":
            return self.head_dim, self.mla.v_head_dim
        return self.mla.kv_lora_rank + self.mla.qk_rope_head_dim, self.mla.kv_lora_rank


class Moe(Strict, frozen=True):
    """A mixture-of-experts FFN: routed experts (top-k per token), optional always-on shared experts."""

    routed_experts: int = Field(gt=0, description="integer count of routed experts per MoE layer")
    experts_per_token: int = Field(gt=0, description="integer count of routed experts each token uses (top-k)")
    shared_experts: int = Field(0, ge=0, description="integer count of shared experts every token uses")
    expert_intermediate: int = Field(
        gt=0, description="integer intermediate width of one routed or shared expert (elements)"
    )
    gating: Literal["softmax", "sigmoid"] = Field(description="router score function: softmax or sigmoid")
    groups: int = Field(1, gt=0, description="integer count of expert groups for group-limited routing")
    topk_groups: int = Field(1, gt=0, description="integer count of groups a token may route into")
    norm_topk_prob: bool = Field(description="true when the top-k routing weights are renormalised to sum to 1")
    routed_scaling_factor: float = Field(1.0, gt=0, description="number multiplying the routed experts' output")
    dense_layers: list[int] = Field(
        default_factory=list, description="list of 0-based layer indices that keep a dense FFN instead of MoE"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Moe:
        if self.experts_per_token > self.routed_experts:
            raise ValueError(
                f"experts_per_token ({self.experts_per_token}) exceeds routed_experts ({self.routed_experts})"
            )
        if self.routed_experts % self.groups:
            raise ValueError(f"groups ({self.groups}) must divide routed_experts ({self.routed_experts})")
        if self.topk_groups > self.groups:
            raise ValueError(f"topk_groups ({self.topk_groups}) exceeds groups ({self.groups})")
        if self.experts_per_token > self.topk_groups * (self.routed_experts // self.groups):
            raise ValueError("experts_per_token exceeds the experts in topk_groups groups")
        if len(set(self.dense_layers)) != len(self.dense_layers):
            raise ValueError("dense_layers lists a layer twice")
        return self


class Ffn(Strict, frozen=True):
    """The FFN of every layer: dense everywhere (moe null) or MoE except `moe.dense_layers`."""

    dense_intermediate: int | None = Field(
        gt=0, description="integer intermediate width of a dense FFN layer (null when no layer is dense)"
    )
    moe: Moe | None = Field(None, description="mapping of MoE settings, or null for a dense model")


class Arch(Strict, frozen=True):
    """A decoder-only transformer architecture; behaviour (counts, FLOPs, bytes) is in its methods."""

    name: str = Field(description="short name, e.g. deepseek-v3")
    source: str = Field("", description="where the figures come from (Hugging Face repo, paper)")
    hidden_size: int = Field(gt=0, description="integer model width (elements per token)")
    layers: int = Field(gt=0, description="integer count of transformer layers (MTP excluded)")
    vocab_size: int = Field(gt=0, description="integer count of tokens in the vocabulary")
    tie_embeddings: bool = Field(description="true when the LM head shares the embedding table")
    mtp_layers: int = Field(0, ge=0, description="integer count of multi-token-prediction modules (DeepSeek)")
    native_dtype: Dtype = Field(description="weight dtype as released: one of fp32, bf16, fp16, fp8, int8, fp4")
    rope_theta: float = Field(gt=0, description="number, rotary embedding base")
    max_position_embeddings: int = Field(gt=0, description="integer maximum context length in tokens")
    rms_norm_eps: float = Field(gt=0, description="number, RMSNorm epsilon")
    attention: Attention = Field(description="mapping describing one layer's attention")
    ffn: Ffn = Field(description="mapping describing the FFN layers")

    @model_validator(mode="after")
    def _consistent(self) -> Arch:
        moe = self.ffn.moe
        if moe is not None and any(not 0 <= i < self.layers for i in moe.dense_layers):
            raise ValueError(f"ffn.moe.dense_layers must be layer indices in [0, {self.layers})")
        if self.dense_layer_count() and self.ffn.dense_intermediate is None:
            raise ValueError("ffn.dense_intermediate is required when some layer has a dense FFN")
        return self

    # ---- layer structure -------------------------------------------------------------------------------

    def is_moe_layer(self, index: int) -> bool:
        """Return True when layer `index` (0-based) has an MoE FFN."""
        return self.ffn.moe is not None and index not in self.ffn.moe.dense_layers

    def moe_layer_count(self) -> int:
        """Return the number of layers with an MoE FFN."""
        if self.ffn.moe is None:
            return 0
        return self.layers - len({i for i in self.ffn.moe.dense_layers if 0 <= i < self.layers})

    def dense_layer_count(self) -> int:
        """Return the number of layers with a dense FFN."""
        return self.layers - self.moe_layer_count()

    def routed_experts(self) -> int:
        """Return the routed experts per MoE layer (0 for a dense model)."""
        return self.ffn.moe.routed_experts if self.ffn.moe else 0

    def experts_per_token(self) -> int:
        """Return the routed experts a token uses per MoE layer (0 for a dense model)."""
        return self.ffn.moe.experts_per_token if self.ffn.moe else 0

    # ---- parameters per component ------------------------------------------------------------------------

    def embedding_params(self) -> int:
        """Return the parameters of the input embedding table."""
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        """Return the parameters of the LM head that are not shared with the embedding (0 when tied)."""
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    def attention_params_per_layer(self) -> int:
        """Return one layer's attention parameters: projections plus their norms and biases."""
        return self.attention.matrix_params(self.hidden_size) + self.attention.vector_params()

    def layer_norm_params_per_layer(self) -> int:
        """Return one layer's RMSNorm parameters (before attention and before the FFN)."""
        return 2 * self.hidden_size

    def dense_ffn_params(self) -> int:
        """Return the parameters of one dense FFN layer (0 when the model has no dense layer)."""
        if not self.dense_layer_count():
            return 0
        return gated_ffn_params(self.hidden_size, self.ffn.dense_intermediate or 0)

    def expert_params(self) -> int:
        """Return the parameters of one routed expert (0 for a dense model)."""
        moe = self.ffn.moe
        return gated_ffn_params(self.hidden_size, moe.expert_intermediate) if moe else 0

    def shared_expert_params(self) -> int:
        """Return the parameters of all shared experts of one MoE layer together."""
        moe = self.ffn.moe
        return moe.shared_experts * self.expert_params() if moe else 0

    def router_params(self) -> int:
        """Return the parameters of one MoE layer's router (a hidden x routed_experts gate)."""
        return self.hidden_size * self.routed_experts()

    def moe_ffn_params(self) -> int:
        """Return the parameters of one MoE FFN layer: routed experts, shared experts and router."""
        return self.routed_experts() * self.expert_params() + self.shared_expert_params() + self.router_params()

    def moe_ffn_active_params(self) -> int:
        """Return the parameters of one MoE FFN layer that a token uses: top-k experts, shared, router."""
        return self.experts_per_token() * self.expert_params() + self.shared_expert_params() + self.router_params()

    def mtp_params(self) -> int:
        """Return the parameters of the MTP modules, excluding the embedding and head they share.

        One DeepSeek MTP module: two RMSNorms on its inputs, a 2*hidden -> hidden projection, one transformer
        layer with an MoE FFN, and a final RMSNorm.
        """
        module = (
            3 * self.hidden_size
            + 2 * self.hidden_size * self.hidden_size
            + self.attention_params_per_layer()
            + self.layer_norm_params_per_layer()
            + self.moe_ffn_params()
        )
        return self.mtp_layers * module

    # ---- totals ------------------------------------------------------------------------------------------

    def _model_params(self, moe_ffn: int) -> int:
        """Return embedding + LM head + final norm + all layers, counting `moe_ffn` per MoE FFN."""
        per_layer = self.attention_params_per_layer() + self.layer_norm_params_per_layer()
        return (
            self.embedding_params()
            + self.lm_head_params()
            + self.hidden_size
            + self.layers * per_layer
            + self.dense_layer_count() * self.dense_ffn_params()
            + self.moe_layer_count() * moe_ffn
        )

    def total_params(self) -> int:
        """Return the main model's parameters (embedding, layers, final norm, LM head; MTP excluded)."""
        return self._model_params(self.moe_ffn_params())

    def active_params(self) -> int:
        """Return the parameters a token activates: total minus the routed experts it does not use."""
        return self._model_params(self.moe_ffn_active_params())

    def active_matmul_params(self) -> int:
        """Return the matrix parameters one token multiplies by (LM head included, embedding lookup not)."""
        ffn = self.dense_layer_count() * self.dense_ffn_params() + self.moe_layer_count() * self.moe_ffn_active_params()
        attention = self.layers * self.attention.matrix_params(self.hidden_size)
        return attention + ffn + self.vocab_size * self.hidden_size

    def high_precision_params(self) -> int:
        """Return the parameters a quantized model keeps at bf16 or wider: embedding, LM head, norms, biases
        and routers (everything but the attention projections and the FFN / expert matrices)."""
        per_layer = self.layer_norm_params_per_layer() + self.attention.vector_params()
        outer = self.embedding_params() + self.lm_head_params() + self.hidden_size
        return outer + self.layers * per_layer + self.moe_layer_count() * self.router_params()

    # ---- bytes and FLOPs ---------------------------------------------------------------------------------

    def kv_bytes_per_token(self, dtype: Dtype = "bf16") -> int:
        """Return the KV-cache bytes one token occupies across all layers.

        MLA: layers x (kv_lora_rank + qk_rope_head_dim) x bytes. MHA/GQA: layers x 2 x kv_heads x head_dim x
        bytes. MTP layers are not counted.
        """
        return bytes_for(self.layers * self.attention.kv_elements_per_token_per_layer(), dtype)

    def weight_bytes(self, dtype: Dtype | None = None) -> int:
        """Return the bytes of the main model's weights with linear layers in `dtype` (default: native).

        Embedding, LM head, norms, biases and routers stay at bf16 when `dtype` is narrower than bf16 (fp32
        when `dtype` is fp32); quantization scales are not counted.
        """
        dtype = dtype or self.native_dtype
        wide: Dtype = dtype if BYTES_PER_ELEMENT[dtype] >= BYTES_PER_ELEMENT[HIGH_PRECISION_DTYPE] else "bf16"
        high = self.high_precision_params()
        return bytes_for(self.total_params() - high, dtype) + bytes_for(high, wide)

    def attention_flops_per_token(self, phase: Phase, context_len: int) -> float:
        """Return the score and value FLOPs (QK^T and AV, all layers) of one token.

        Per layer: 2 x heads x (score_dims + value_dims) x keys, with keys = context_len in decode (the token
        attends to a cache of context_len tokens) and (context_len + 1) / 2 in prefill (the mean over a causal
        prompt of context_len tokens). MLA decode uses the absorbed latent dims (see
        `Attention.score_value_dims`): 2 x heads x (2 x kv_lora_rank + qk_rope_head_dim) x context_len.
        """
        if phase not in ("prefill", "decode"):
            raise ValueError(f"phase must be prefill or decode, got {phase!r}")
        keys = context_len if phase == "decode" else (context_len + 1) / 2
        score_dims, value_dims = self.attention.score_value_dims(phase)
        return float(self.layers * 2 * self.attention.heads * (score_dims + value_dims) * keys)

    def flops_per_token(self, phase: Phase, context_len: int) -> float:
        """Return the FLOPs of one token: 2 x `active_matmul_params` + `attention_flops_per_token`."""
        return 2.0 * self.active_matmul_params() + self.attention_flops_per_token(phase, context_len)
