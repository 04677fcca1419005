"""The FFN side of a layer: SwiGLU (dense FFN, experts, shared experts), the router and the MoE block.

Routing follows DeepSeek-V3 (Hugging Face `DeepseekV3MoE`) and covers Qwen-MoE and Mixtral as special cases:

1. scores = sigmoid(logits) or softmax(logits) over the routed experts (`Moe.gating`), in float32;
2. selection scores = scores + `e_score_correction_bias` (sigmoid gating only; DeepSeek-V3's load-balancing
   bias, which steers the choice but not the weights);
3. group-limited routing when `groups > 1`: each group scores as the sum of its top-2 selection scores (sigmoid,
   DeepSeek-V3) or its best score (softmax, DeepSeek-V2); only the experts of the best `topk_groups` groups stay;
4. top-k experts by selection score; their weights are the unbiased scores, renormalised to sum to 1 when
   `norm_topk_prob`, then multiplied by `routed_scaling_factor`.

Expert execution goes through an `ExpertExecutor`, so expert parallelism can replace the in-process default
(`LocalExperts`) without touching the block. A block holds all its routed experts in `experts` (an
`nn.ModuleList` indexed by expert id); experts this process does not hold are `MissingExpert` placeholders
without weights.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from matrixstack.arch.spec import Moe

SIGMOID_GROUP_TOP = 2  # DeepSeek-V3 scores a group by the sum of its best two experts


class SwiGLU(nn.Module):
    """A gated FFN: down_proj(silu(gate_proj(x)) * up_proj(x)), no biases."""

    def __init__(self, hidden_size: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the FFN output, same shape as `x`."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MissingExpert(nn.Module):
    """Stands in for a routed expert another process holds; calling it is an error."""

    def __init__(self, layer: int, expert: int):
        super().__init__()
        self.layer, self.expert = layer, expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raise: this process has no weights for the expert."""
        raise RuntimeError(
            f"expert {self.expert} of layer {self.layer} is not held by this process; "
            "route its tokens through an expert-parallel executor"
        )


def route(logits: torch.Tensor, moe: Moe, correction_bias: torch.Tensor | None = None):
    """Return (topk_ids int64 [T, k], topk_weights float32 [T, k]) for router logits [T, routed_experts].

    See the module docstring for the rule; `correction_bias` [routed_experts] applies to sigmoid gating only.
    """
    logits = logits.float()
    scores = logits.sigmoid() if moe.gating == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if moe.groups > 1:
        grouped = choice.view(choice.shape[0], moe.groups, -1)
        if moe.gating == "sigmoid":
            group_scores = grouped.topk(min(SIGMOID_GROUP_TOP, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        kept = group_scores.topk(moe.topk_groups, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
    topk_ids = choice.topk(moe.experts_per_token, dim=-1).indices
    topk_weights = scores.gather(1, topk_ids)
    if moe.norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_ids, topk_weights * moe.routed_scaling_factor


class Router(nn.Module):
    """The MoE gate: a hidden -> routed_experts projection (`weight`) plus, for sigmoid gating,
    DeepSeek-V3's `e_score_correction_bias`."""

    def __init__(self, hidden_size: int, moe: Moe):
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.empty(moe.routed_experts, hidden_size))
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(moe.routed_experts), requires_grad=False) if moe.gating == "sigmoid" else None
        )

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (topk_ids int64 [T, k], topk_weights float32 [T, k]) for `hidden` [T, H]."""
        logits = F.linear(hidden.float(), self.weight.float())
        return route(logits, self.moe, self.e_score_correction_bias)


class ExpertExecutor(Protocol):
    """Runs the routed experts of one MoE layer and combines their outputs."""

    def __call__(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """Return sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden[t]), [T, H]."""
        ...


def apply_experts(
    experts: nn.ModuleList, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Return the weighted sum of routed-expert outputs [T, H], running each expert that received tokens once."""
    out = torch.zeros_like(hidden)
    for expert in topk_ids.unique().tolist():
        tokens, slot = (topk_ids == expert).nonzero(as_tuple=True)
        weights = topk_weights[tokens, slot].to(hidden.dtype)[:, None]
        out.index_add_(0, tokens, experts[expert](hidden[tokens]) * weights)
    return out


class LocalExperts:
    """The default executor: every expert of every MoE layer in this process (`experts_by_layer[layer]`)."""

    def __init__(self, experts_by_layer: dict[int, nn.ModuleList]):
        self.experts_by_layer = experts_by_layer

    def __call__(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """Return the weighted sum of the routed experts' outputs for layer `layer`, [T, H]."""
        return apply_experts(self.experts_by_layer[layer], hidden, topk_ids, topk_weights)


class MoEBlock(nn.Module):
    """An MoE FFN: `gate` (router), `experts` (routed, by id) and `shared_experts` (one SwiGLU, or None).

    DeepSeek stores the shared experts as one SwiGLU of width shared_experts x expert_intermediate.
    """

    def __init__(self, layer: int, hidden_size: int, moe: Moe, expert_ids: set[int] | None = None):
        super().__init__()
        self.layer = layer
        self.gate = Router(hidden_size, moe)
        held = set(range(moe.routed_experts)) if expert_ids is None else expert_ids
        self.experts = nn.ModuleList(
            SwiGLU(hidden_size, moe.expert_intermediate) if e in held else MissingExpert(layer, e)
            for e in range(moe.routed_experts)
        )
        self.shared_experts = (
            SwiGLU(hidden_size, moe.shared_experts * moe.expert_intermediate) if moe.shared_experts else None
        )

    def held_expert_ids(self) -> list[int]:
        """Return the ids of the routed experts whose weights this process holds, ascending."""
        return [e for e, expert in enumerate(self.experts) if not isinstance(expert, MissingExpert)]

    def forward(self, x: torch.Tensor, executor: ExpertExecutor) -> torch.Tensor:
        """Return the MoE output for `x` [..., H]: routed experts through `executor` plus the shared experts."""
        flat = x.reshape(-1, x.shape[-1])
        topk_ids, topk_weights = self.gate(flat)
        out = executor(self.layer, flat, topk_ids, topk_weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(x.shape)
