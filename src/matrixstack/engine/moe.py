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
(`LocalExperts`) without touching the block. A block holds all its routed experts in `experts` (an `ExpertList`,
an `nn.ModuleList` indexed by expert id); experts this process does not hold are `MissingExpert` placeholders
without weights.

Grouped execution. An `ExpertList` keeps the weights of the experts it holds stacked, input-major, `w13` [held,
hidden, 2 x intermediate] (gate columns, then up columns) and `w2` [held, intermediate, hidden], and each expert's
`gate_proj`, `up_proj` and `down_proj` weights are views into them: loading a checkpoint or editing one expert
writes the stack, state-dict names stay per expert, and the memory is not doubled. Any `.to()` / `.cuda()` / dtype
change re-stacks (`ExpertList._apply`), and so does a weight tensor replaced through `.data` (noticed by its
pointer); a replaced `Parameter` object is not noticed: edit weights in place. Without gradients (serving), a
layer's routed experts then run as a constant number of ops whatever the batch: the (token, expert) pairs sorted by
expert, the rows gathered once, two grouped GEMMs (`torch.nn.functional.grouped_mm`, one group per expert, no
padding), SwiGLU in between, the routing weight applied, and one `index_add_` back to the tokens. Decode-sized
batches on a multi-threaded CPU run the two GEMMs as `bmm`s over a padded [experts, busiest expert's rows, H] batch
instead (the batched GEMM spreads experts over threads; `expert_method`), as do devices and dtypes without
`grouped_mm` (probed once); beyond PADDED_MAX_ROWS rows those fall back to one pair of GEMMs per expert. With
gradients on (training) the per-expert module loop `apply_experts` runs, so gradients reach the parameters.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from matrixstack.arch.spec import Moe

SIGMOID_GROUP_TOP = 2  # DeepSeek-V3 scores a group by the sum of its best two experts


def wants_grad(module: nn.Module, x: torch.Tensor) -> bool:
    """Return True when autograd would record a call of `module` on `x` (training): the fused fast paths, whose
    weights are not the parameters autograd knows, must not run then."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def input_major_(linear: nn.Linear) -> None:
    """Store `linear`'s weight [out, in] input-major (column-major: its transpose is contiguous), in place.

    `F.linear` then multiplies by a contiguous [in, out] matrix, which for the few rows of a decode step reads
    the weight several times faster from memory than the row-major layout (measured 2.6x for a 1 x 256 x 4096
    product on a cold cache); the parameter keeps its shape and checkpoint name. Conversions (`.to()`) keep the
    layout (they preserve strides)."""
    if linear.weight.is_contiguous() and linear.weight.dim() == 2 and min(linear.weight.shape) > 1:
        with torch.no_grad():
            linear.weight.data = linear.weight.data.t().contiguous().t()


class FusedLinears:
    """Sibling `nn.Linear`s (same input, no bias or all biased) run as one GEMM: their weights are concatenated,
    input-major (`weight_t` [in, sum of out], see `input_major_`), and their biases once, and each linear's
    parameters become views into the result, so a checkpoint load or an in-place edit of one linear writes the
    fused tensor too, without doubling the memory. `refresh()` rebuilds it after a `.to()` (which gives each
    parameter its own tensor again) and whenever one of the linears' tensors was replaced."""

    def __init__(self, *linears: nn.Linear):
        self.linears = linears
        self.sizes = [lin.out_features for lin in linears]
        self.refresh()

    def _pointers(self) -> list[int]:
        return [t.data_ptr() for lin in self.linears for t in (lin.weight, lin.bias) if t is not None]

    def refresh(self) -> None:
        """Concatenate the linears' weights and biases and make the linears' parameters views into them, as
        inference tensors exactly when the parameters are (a model built under `torch.inference_mode`), so a
        refresh inside `inference_mode` does not turn a normal model's weights into inference tensors."""
        with torch.inference_mode(self.linears[0].weight.is_inference()), torch.no_grad():
            self.weight_t = torch.cat([lin.weight.t() for lin in self.linears], dim=1)
            biased = self.linears[0].bias is not None
            self.bias = torch.cat([lin.bias for lin in self.linears]) if biased else None
            start = 0
            for lin, size in zip(self.linears, self.sizes, strict=True):
                lin.weight.data = self.weight_t[:, start : start + size].t()
                if self.bias is not None:
                    lin.bias.data = self.bias[start : start + size]
                start += size
        self._expected = self._pointers()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Return the linears' outputs concatenated along the last dim, [..., sum of out_features]."""
        if self._pointers() != self._expected:
            self.refresh()
        return F.linear(x, self.weight_t.t(), self.bias)


class SwiGLU(nn.Module):
    """A gated FFN: down_proj(silu(gate_proj(x)) * up_proj(x)), no biases. With `fuse`, gate and up run as one
    GEMM when no gradient is wanted (`FusedLinears`); routed experts do not fuse (their `ExpertList` stacks
    their weights instead). A fused one has LoRA sites `<lora_site>.gate_up` and `<lora_site>.down_proj`
    (`engine.lora_batch`)."""

    lora_site = ""  # the module's path in the model, set by MoETransformer

    def __init__(self, hidden_size: int, intermediate: int, fuse: bool = True):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden_size, bias=False)
        self.intermediate = intermediate
        self.fused = FusedLinears(self.gate_proj, self.up_proj) if fuse else None

    def _apply(self, fn, recurse=True):
        """Convert as `nn.Module` does, then fuse again (the conversion gave each parameter its own tensor)."""
        super()._apply(fn, recurse)
        if self.fused is not None:
            self.fused.refresh()
        return self

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        """Return the FFN output, same shape as `x`; `lora` (a `LoraBatch`, fused path only, x [T, H]) adds the
        step's adapter deltas to the gate/up and down projections."""
        if self.fused is None or wants_grad(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate_up = self.fused(x)
        if lora is not None:
            gate_up = lora.add(f"{self.lora_site}.gate_up", x, gate_up)
        hidden = F.silu(gate_up[..., : self.intermediate]) * gate_up[..., self.intermediate :]
        out = self.down_proj(hidden)
        return out if lora is None else lora.add(f"{self.lora_site}.down_proj", hidden, out)


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
    logits = logits if logits.dtype == torch.float32 else logits.float()
    scores = logits.sigmoid() if moe.gating == "sigmoid" else logits.softmax(dim=-1)
    if correction_bias is not None and correction_bias.dtype != torch.float32:
        correction_bias = correction_bias.float()
    choice = scores if correction_bias is None else scores + correction_bias
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
    if moe.routed_scaling_factor != 1.0:
        topk_weights = topk_weights * moe.routed_scaling_factor
    return topk_ids, topk_weights


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
        weight = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        logits = F.linear(hidden if hidden.dtype == torch.float32 else hidden.float(), weight)
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
    """Return the weighted sum of routed-expert outputs [T, H], running each expert that received tokens once.

    Grouped (a constant number of ops) when `experts` is an `ExpertList` and no gradient is wanted; otherwise
    one module call per expert that received tokens (autograd-safe, works on any `nn.ModuleList`).
    """
    if isinstance(experts, ExpertList) and experts.holds_all and experts.can_group(hidden):
        return experts.grouped(hidden, topk_ids, topk_weights)
    out = torch.zeros_like(hidden)
    for expert in topk_ids.unique().tolist():
        tokens, slot = (topk_ids == expert).nonzero(as_tuple=True)
        weights = topk_weights[tokens, slot].to(hidden.dtype)[:, None]
        out.index_add_(0, tokens, experts[expert](hidden[tokens]) * weights)
    return out


_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Return True when `torch.nn.functional.grouped_mm` runs on this device type and dtype (probed once)."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM_WORKS:
        works = hasattr(F, "grouped_mm")
        if works:
            try:
                a = torch.zeros(2, 8, device=device, dtype=dtype)
                b = torch.zeros(2, 8, 8, device=device, dtype=dtype)
                F.grouped_mm(a, b.transpose(1, 2), offs=torch.tensor([1, 2], dtype=torch.int32, device=device))
            except (RuntimeError, NotImplementedError, TypeError):
                works = False
        _GROUPED_MM_WORKS[key] = works
    return _GROUPED_MM_WORKS[key]


PADDED_MAX_ROWS = 256  # the padded-batch expert path is used for at most this many (token, expert) rows


def expert_method(rows: torch.Tensor) -> str:
    """Return how `ExpertList.run_sorted` runs `rows`: "padded" for decode-sized batches on a multi-threaded CPU
    (or when there is no grouped kernel), "grouped" where `grouped_mm` runs, else "loop"."""
    small = rows.shape[0] <= PADDED_MAX_ROWS
    if small and rows.device.type == "cpu" and torch.get_num_threads() > 1:
        return "padded"
    if grouped_mm_available(rows.device, rows.dtype):
        return "grouped"
    return "padded" if small else "loop"


class ExpertList(nn.ModuleList):
    """The routed experts of one MoE layer by id (`SwiGLU` or `MissingExpert`), with the held experts' weights
    stacked for grouped execution (see the module docstring), input-major as `input_major_` explains: `w13`
    [held, H, 2I] (gate columns, then up columns), `w2` [held, I, H], and `local_index` [experts] (the row of each
    expert in the stack, -1 when not held)."""

    def __init__(self, experts):
        super().__init__(experts)
        self._stack()

    def _stack(self) -> None:
        """Stack the held experts' weights and make each expert's weights views into the stack (inference tensors
        exactly when the parameters are, as `FusedLinears.refresh`)."""
        held = [(e, m) for e, m in enumerate(self) if isinstance(m, SwiGLU)]
        self.held_ids = [e for e, _ in held]
        device = held[0][1].down_proj.weight.device if held else torch.device("cpu")
        inference = bool(held) and held[0][1].down_proj.weight.is_inference()
        with torch.inference_mode(inference), torch.no_grad():
            index = torch.full((len(self),), -1, dtype=torch.int64)
            index[self.held_ids] = torch.arange(len(held))
            self.local_index = index.to(device)
            self._weights = [p for _, m in held for p in (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)]
            if not held:
                self.w13 = self.w2 = None
                self._expected = []
                return
            self.w13 = torch.stack([torch.cat((m.gate_proj.weight.t(), m.up_proj.weight.t()), 1) for _, m in held])
            self.w2 = torch.stack([m.down_proj.weight.t() for _, m in held])
            inter = self.w2.shape[1]
            for j, (_, m) in enumerate(held):
                m.gate_proj.weight.data = self.w13[j, :, :inter].t()
                m.up_proj.weight.data = self.w13[j, :, inter:].t()
                m.down_proj.weight.data = self.w2[j].t()
        self._expected = [p.data_ptr() for p in self._weights]

    def _apply(self, fn, recurse=True):
        """Convert the experts as `nn.Module` does (`.to()`, `.cuda()`, dtype changes), then re-stack them."""
        super()._apply(fn, recurse)
        self._stack()
        return self

    def is_stacked(self) -> bool:
        """Return True while every held expert's weights are still the views into the stack made by `_stack`
        (nobody assigned a new tensor to one since)."""
        return [p.data_ptr() for p in self._weights] == self._expected

    @property
    def holds_all(self) -> bool:
        """Return True when this process holds every expert of the layer."""
        return len(self.held_ids) == len(self)

    def can_group(self, hidden: torch.Tensor) -> bool:
        """Return True when the grouped path applies: no gradients wanted and the stack matches `hidden`."""
        if wants_grad(self, hidden):
            return False
        if self.w13 is None or self.w13.device != hidden.device or self.w13.dtype != hidden.dtype:
            return False
        if not self.is_stacked():
            self._stack()
        return True

    def run_sorted(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Return SwiGLU outputs [N, H] of `rows` [N, H] sorted by stack row: the first `counts[0]` rows go
        through held expert 0, the next `counts[1]` through held expert 1, and so on (`counts` int64 [held]).

        Three ways, the same numbers (`expert_method`): `grouped_mm` (one GEMM per expert inside one call, no
        padding); a padded batch (rows scattered into [held, busiest expert's rows, H] and two `bmm`s: on a CPU
        with several threads the batched GEMM spreads the experts over the threads, which the grouped kernel
        does not, so decode steps run faster this way); or one pair of GEMMs per expert (no grouped kernel for
        this device and dtype, and too many rows to pad)."""
        if rows.shape[0] == 0:
            return rows.new_zeros(0, self.w2.shape[2])
        inter = self.w2.shape[1]
        method = expert_method(rows)
        if method == "grouped":
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            gate_up = F.grouped_mm(rows, self.w13, offs=offs)
            return F.grouped_mm(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], self.w2, offs=offs)
        if method == "padded":
            held, width = counts.shape[0], int(counts.max())
            expert = torch.repeat_interleave(torch.arange(held, device=rows.device), counts)
            slot = (
                expert * width + torch.arange(rows.shape[0], device=rows.device) - (counts.cumsum(0) - counts)[expert]
            )
            padded = rows.new_zeros(held * width, rows.shape[1]).index_copy_(0, slot, rows)
            gate_up = torch.bmm(padded.view(held, width, -1), self.w13)
            out = torch.bmm(F.silu(gate_up[..., :inter]) * gate_up[..., inter:], self.w2)
            return out.view(held * width, -1).index_select(0, slot)
        out = rows.new_empty(rows.shape[0], self.w2.shape[2])
        start = 0
        for j, n in enumerate(counts.tolist()):
            if n:
                gate_up = rows[start : start + n] @ self.w13[j]
                out[start : start + n] = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ self.w2[j]
            start += n
        return out

    def grouped(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Return sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden[t]), [T, H], in a constant number of
        ops (every expert in `topk_ids` must be held)."""
        k = topk_ids.shape[1]
        local = topk_ids.reshape(-1) if self.holds_all else self.local_index[topk_ids.reshape(-1)]
        order = torch.argsort(local, stable=True)
        counts = torch.bincount(local, minlength=self.w13.shape[0])
        tokens = order // k
        out = self.run_sorted(hidden.index_select(0, tokens), counts)
        out = out * topk_weights.reshape(-1)[order].to(hidden.dtype)[:, None]
        return torch.zeros_like(hidden).index_add_(0, tokens, out)

    def rows(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Return each row of `hidden` [N, H] through its expert `expert_ids[n]` (held by this list) times
        `weights[n]`, [N, H] in the input order: the expert-parallel workers' side of a dispatch."""
        local = self.local_index[expert_ids]
        order = torch.argsort(local, stable=True)
        counts = torch.bincount(local, minlength=self.w13.shape[0])
        out = self.run_sorted(hidden.index_select(0, order), counts)
        out = out * weights[order].to(hidden.dtype)[:, None]
        return torch.empty_like(out).index_copy_(0, order, out)


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
        self.experts = ExpertList(
            SwiGLU(hidden_size, moe.expert_intermediate, fuse=False) if e in held else MissingExpert(layer, e)
            for e in range(moe.routed_experts)
        )
        self.shared_experts = (
            SwiGLU(hidden_size, moe.shared_experts * moe.expert_intermediate) if moe.shared_experts else None
        )

    def held_expert_ids(self) -> list[int]:
        """Return the ids of the routed experts whose weights this process holds, ascending."""
        return [e for e, expert in enumerate(self.experts) if not isinstance(expert, MissingExpert)]

    def forward(self, x: torch.Tensor, executor: ExpertExecutor, lora=None) -> torch.Tensor:
        """Return the MoE output for `x` [..., H]: routed experts through `executor` plus the shared experts
        (with the step's adapter deltas when `lora`, a `LoraBatch`, is given)."""
        flat = x.reshape(-1, x.shape[-1])
        topk_ids, topk_weights = self.gate(flat)
        out = executor(self.layer, flat, topk_ids, topk_weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat, lora)
        return out.view(x.shape)
