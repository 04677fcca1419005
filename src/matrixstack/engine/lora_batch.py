"""One step's batched LoRA (Punica / S-LoRA style): which tokens run through which adapter slot, laid out once per
step, and `LoraBatch.add(site, x, out)`, which adds every token's own adapter delta to a projection's output.

Layout (`layout`). The step's tokens that have an adapter (slot > 0) are grouped by slot: the U distinct slots,
ascending, each get W rows of a padded [U, W] batch, W = the busiest slot's token count. `gather` [U * W] names the
token of each padded row (pad rows repeat the first adapter token; their results are never read), `dst` [N] the
padded row of each adapter token `src` [N]. Base tokens (slot 0) are not in the layout at all: their outputs are
never touched, so in a mixed batch they are exactly what the base model gives.

Per site (a projection call of the serving fast path: the fused q/k/v GEMM, o_proj, the fused gate/up GEMM,
down_proj; `engine.lora_slots`) the weights of the active slots are a pair a [U, in, n * R] (each fused module's
A^T side by side, zero-padded to the rank limit R) and b [U, n * R, out] (block-diagonal: each module's scaling * B^T
over its own slice of the output). One pair of batched GEMMs then gives every token the delta of its adapter:
out[t] += scaling * (x[t] @ A^T) @ B^T, for each fused module on its slice. The cost is a constant number of ops per
site whatever the number of adapters in the batch (gather, two bmm, select, index_add).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoraLayout:
    """Where a step's adapter tokens go in the padded batch (see the module docstring); `slots` are the active
    adapter slots, ascending, one group each."""

    slots: tuple[int, ...]
    width: int
    gather: list[int]
    src: list[int]
    dst: list[int]


def layout(seq_slots: list[int], seq_tokens: list[int]) -> LoraLayout | None:
    """Return the padded layout of a step whose sequence i has `seq_tokens[i]` consecutive tokens through adapter
    slot `seq_slots[i]` (0: the base); None when no token has an adapter."""
    counts: dict[int, int] = {}
    for slot, n in zip(seq_slots, seq_tokens, strict=True):
        if slot:
            counts[slot] = counts.get(slot, 0) + n
    if not counts:
        return None
    slots = tuple(sorted(counts))
    width = max(counts.values())
    next_row = {slot: group * width for group, slot in enumerate(slots)}
    src: list[int] = []
    dst: list[int] = []
    start = 0
    for slot, n in zip(seq_slots, seq_tokens, strict=True):
        if slot:
            src.extend(range(start, start + n))
            dst.extend(range(next_row[slot], next_row[slot] + n))
            next_row[slot] += n
        start += n
    gather = [src[0]] * (len(slots) * width)
    for token, row in zip(src, dst, strict=True):
        gather[row] = token
    return LoraLayout(slots, width, gather, src, dst)


class LoraBatch:
    """A step's layout as tensors on the model's device plus the active slots' weights by site (`weights[site]` =
    (a, b), see the module docstring); sites no active adapter targets are absent."""

    def __init__(self, plan: LoraLayout, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], device):
        self.groups, self.width = len(plan.slots), plan.width
        self.gather = torch.tensor(plan.gather, dtype=torch.int64, device=device)
        self.src = torch.tensor(plan.src, dtype=torch.int64, device=device)
        self.dst = torch.tensor(plan.dst, dtype=torch.int64, device=device)
        self.weights = weights

    def add(self, site: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Return `out` [T, out] with each adapter token's delta at `site` added in place (x is the site's input,
        [T, in]); `out` unchanged when no active adapter targets the site."""
        pair = self.weights.get(site)
        if pair is None:
            return out
        a, b = pair
        rows = x.index_select(0, self.gather).view(self.groups, self.width, -1)
        delta = torch.bmm(torch.bmm(rows, a), b).view(self.groups * self.width, -1)
        return out.index_add_(0, self.src, delta.index_select(0, self.dst))
