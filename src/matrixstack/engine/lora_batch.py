"""One step's batched LoRA (Punica / S-LoRA style): which tokens run through which adapter slot, laid out once per
step, and `LoraBatch.add(site, x, out)`, which adds every token's own adapter delta to a projection's output.

Layout (`layout`). The step's tokens that have an adapter (slot > 0) are grouped by slot: `tokens` [N] lists them
slot by slot (the U distinct slots ascending), `counts` [U] how many each slot has. Base tokens (slot 0) are not in
the layout at all: their outputs are never touched, so in a mixed batch they are exactly what the base model gives.

Two ways to run a site, the same numbers (as `engine.moe` runs experts): two `bmm`s over a padded [U, W] batch,
W = the busiest slot's count (`gather` [U * W] names the token of each padded row, pad rows repeating the first
adapter token, whose results are never read; `rows` [N] the padded row of each of `tokens`), or two grouped GEMMs
(`torch.nn.functional.grouped_mm`, one group per slot, no padding). The padded batch is one batched GEMM call, the
cheapest for decode steps (a few tokens per adapter; on a CPU `grouped_mm` runs one GEMM per group: with 16 rank-16
adapters on every projection of tiny-moe, decode steps took 27 ms against 11 ms for the base, one thread); padding
wastes work when one slot has many more tokens than another (a long prefill beside decodes), so a step whose
padded batch would exceed PADDED_MAX_WASTE times its adapter tokens runs grouped where `grouped_mm` runs for the
device and dtype (`moe.grouped_mm_available`).

Per site (a projection call of the serving fast path: the fused q/k/v GEMM, o_proj, the fused gate/up GEMM,
down_proj; `engine.lora_slots`) the weights of the active slots are a pair a [U, in, n * R] (each fused module's
A^T side by side, zero-padded to the rank limit R) and b [U, n * R, out] (block-diagonal: each module's scaling * B^T
over its own slice of the output). One pair of batched GEMMs then gives every token the delta of its adapter:
out[t] += scaling * (x[t] @ A^T) @ B^T, for each fused module on its slice. The cost is a constant number of ops per
site whatever the number of adapters in the batch (gather, two GEMMs, [select,] index_add).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from matrixstack.engine.moe import grouped_mm_available

PADDED_MAX_WASTE = 2.0  # most padded rows per adapter token before a step runs grouped (where it can)


@dataclass
class LoraLayout:
    """A step's adapter tokens grouped by slot (see the module docstring); `slots` are the active adapter slots,
    ascending, one group each, and `width` the busiest one's token count."""

    slots: tuple[int, ...]
    counts: list[int]
    tokens: list[int]

    @property
    def width(self) -> int:
        """Return the rows per slot of the padded batch: the busiest slot's token count."""
        return max(self.counts)

    def padded(self) -> tuple[list[int], list[int]]:
        """Return (gather: the token of each padded row, rows: the padded row of each of `tokens`)."""
        width, rows = self.width, []
        for group, count in enumerate(self.counts):
            rows.extend(range(group * width, group * width + count))
        gather = [self.tokens[0]] * (len(self.slots) * width)
        for token, row in zip(self.tokens, rows, strict=True):
            gather[row] = token
        return gather, rows


def layout(seq_slots: list[int], seq_tokens: list[int]) -> LoraLayout | None:
    """Return the padded layout of a step whose sequence i has `seq_tokens[i]` consecutive tokens through adapter
    slot `seq_slots[i]` (0: the base); None when no token has an adapter."""
    by_slot: dict[int, list[int]] = {}
    start = 0
    for slot, n in zip(seq_slots, seq_tokens, strict=True):
        if slot:
            by_slot.setdefault(slot, []).extend(range(start, start + n))
        start += n
    if not by_slot:
        return None
    slots = tuple(sorted(by_slot))
    return LoraLayout(slots, [len(by_slot[s]) for s in slots], [t for s in slots for t in by_slot[s]])


class LoraBatch:
    """A step's layout as tensors on the model's device plus the active slots' weights by site (`weights[site]` =
    (a, b), see the module docstring); sites no active adapter targets are absent. `grouped` says which way the
    sites run (module docstring)."""

    def __init__(self, plan: LoraLayout, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], device, dtype):
        self.weights = weights
        self.tokens = torch.tensor(plan.tokens, dtype=torch.int64, device=device)
        padded_rows = len(plan.slots) * plan.width
        wasteful = padded_rows > PADDED_MAX_WASTE * len(plan.tokens)
        self.grouped = wasteful and grouped_mm_available(torch.device(device), dtype)
        if self.grouped:
            self.offs = torch.tensor(plan.counts, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
        else:
            gather, rows = plan.padded()
            self.groups, self.width = len(plan.slots), plan.width
            self.gather = torch.tensor(gather, dtype=torch.int64, device=device)
            self.rows = torch.tensor(rows, dtype=torch.int64, device=device)

    def add(self, site: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Return `out` [T, out] with each adapter token's delta at `site` added in place (x is the site's input,
        [T, in]); `out` unchanged when no active adapter targets the site."""
        pair = self.weights.get(site)
        if pair is None:
            return out
        a, b = pair
        if self.grouped:
            delta = F.grouped_mm(F.grouped_mm(x.index_select(0, self.tokens), a, offs=self.offs), b, offs=self.offs)
        else:
            padded = x.index_select(0, self.gather).view(self.groups, self.width, -1)
            delta = torch.bmm(torch.bmm(padded, a), b).view(self.groups * self.width, -1).index_select(0, self.rows)
        return out.index_add_(0, self.tokens, delta)
