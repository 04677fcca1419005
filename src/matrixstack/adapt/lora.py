"""LoRA for training the engine's model: one adapter, dense, with gradients, wrapped around its linears from outside.

`attach_lora(model, targets, rank, alpha, generator)` freezes every parameter of a `MoETransformer` and replaces each
targeted attention projection `layers.{i}.self_attn.{q,k,v,o}_proj` by a `LoraLinear`: the frozen linear plus
`scaling * B(A(x))`, `scaling = alpha / rank`, initialised as PEFT initialises LoRA (A kaiming-uniform with
a = sqrt(5), B zeros: the adapted model starts as the base). The engine's serving fast paths (fused q/k/v,
stacked experts) run only when no gradient is wanted (engine/model.py's contract), so training with the wrappers
takes the plain module path and every LoRA parameter gets its gradient; without gradients (evaluation, greedy
decoding) the fast paths read the base weights only, which is why evaluation runs inside `merged(model)`: the
deltas `scaling * B @ A` added to the base weights in place (the fused tensors see them: the linears' weights
are views into them) and the wrappers passing the base output through, restored bit for bit on exit.

Targets are PEFT's short names of the attention projections; a user writes `q,k,v,o` (or the full names). Routed
experts are refused: the engine stacks them (engine/moe.py) and transformers' Glm4Moe, the HF export, holds them as
fused 3-D parameters, which PEFT adapts only through `target_parameters`, not as the `lora_A`/`lora_B` modules of
a standard adapter that PEFT and vLLM load.

Routed experts stay frozen, and `FrozenExperts` runs them grouped during training (the engine's grouped path,
differentiated through the hidden states) instead of the per-expert module loop the engine takes with gradients on.

`adapter_of(model, name)` returns the trained adapter as engine/lora_adapter.py's `LoraAdapter` (weights keyed by
engine module path, A [rank, in], B [out, rank]); `load_adapter(model, adapter)` puts an adapter's weights into
attached wrappers (the PEFT-equivalence test runs the engine with an adapter read back from its folder).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from matrixstack.engine.lora_adapter import LoraAdapter, lora_modules
from matrixstack.engine.model import MoETransformer
from matrixstack.engine.moe import ExpertList
from matrixstack.errors import UserError

TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}  # short name -> PEFT's module name
MAX_RANK = 64  # the largest LoRA rank a tune job trains (serving reserves per-adapter room up to its max rank)
KAIMING_A = math.sqrt(5)  # PEFT's (and nn.Linear's) kaiming-uniform slope for lora_A


class LoraLinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update: base(x) + scaling * x A^T B^T."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=weight.dtype, device=weight.device))
        with torch.no_grad():
            cpu_a = torch.empty(rank, base.in_features)
            nn.init.kaiming_uniform_(cpu_a, a=KAIMING_A, generator=generator)
            self.lora_A.copy_(cpu_a)
        self.scaling = alpha / rank
        self.merged = False  # True while `merged` has added the update to the base weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the base output plus the scaled low-rank update (already in the base weight while merged), same
        shape as `base(x)`."""
        if self.merged:
            return self.base(x)
        return self.base(x) + F.linear(F.linear(x, self.lora_A) * self.scaling, self.lora_B)  # scaled at width r

    def delta(self) -> torch.Tensor:
        """Return scaling * B @ A, [out, in]: what merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling


class FrozenExperts:
    """An expert executor for training with frozen experts: each MoE layer's routed experts run grouped
    (`ExpertList.grouped`: one sort, two grouped GEMMs over the stacked weights, one scatter), with autograd through
    the hidden states and routing weights only, in place of the engine's per-expert module loop, which it takes
    whenever gradients are on so that expert weights get theirs. The stacked weights carry no gradient, so the
    LoRA gradients are the loop's (within float round-off). A layer whose experts are not all held here, are stacked
    on another device or were edited since stacking runs the engine's executor."""

    def __init__(self, model: MoETransformer):
        self.fallback = model.expert_executor
        self.experts_by_layer = {
            i: layer.mlp.experts
            for i, layer in enumerate(model.layers)
            if isinstance(getattr(layer.mlp, "experts", None), ExpertList)
        }

    def __call__(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """Return the weighted sum of the routed experts' outputs for `layer`, [T, H]."""
        experts = self.experts_by_layer.get(layer)
        stale = experts is None or experts.w13 is None or not experts.is_stacked()
        if stale or not experts.holds_all or experts.w13.device != hidden.device:
            return self.fallback(layer, hidden, topk_ids, topk_weights)
        return experts.grouped(hidden, topk_ids, topk_weights)


def parse_targets(text: str) -> list[str]:
    """Return PEFT module names for a comma-separated `--target` (q,k,v,o or q_proj,...), in q,k,v,o order;
    UserError for `experts` (why: module docstring) and for anything unknown."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UserError("--target is empty; give attention projections, e.g. --target q,k,v,o")
    if "experts" in names:
        raise UserError(
            "--target experts is not supported: the HF export (transformers' Glm4Moe) holds routed experts as fused "
            "3-D parameters, which a standard PEFT LoRA adapter (lora_A/lora_B modules, what PEFT and vLLM load) "
            "cannot express; adapt the attention with --target q,k,v,o"
        )
    full = {short: name for short, name in TARGETS.items()} | {name: name for name in TARGETS.values()}
    unknown = [n for n in names if n not in full]
    if unknown:
        raise UserError(f"--target {','.join(unknown)}: unknown; choose from q, k, v, o (or q_proj, ..., o_proj)")
    chosen = {full[n] for n in names}
    return [name for name in TARGETS.values() if name in chosen]


def check_rank(rank: int, alpha: float) -> None:
    """Raise UserError unless 1 <= rank <= MAX_RANK and alpha > 0."""
    if not 1 <= rank <= MAX_RANK:
        raise UserError(f"--rank {rank} is outside 1..{MAX_RANK}; pick a rank in that range (8 or 16 are usual)")
    if alpha <= 0:
        raise UserError(f"--alpha {alpha:g} must be positive (scaling = alpha / rank; 2 x rank is usual)")


def target_paths(modules: dict[str, tuple[int, int]], base: str, targets: list[str]) -> list[str]:
    """Return the engine module paths `layers.{i}.self_attn.{name}` of `targets` among `modules` (the base's
    `lora_modules(arch)`, engine/lora_adapter.py), layer by layer; UserError naming what the attention has when a
    layer lacks a target."""
    layers = sorted({int(path.split(".")[1]) for path in modules})
    paths = []
    for i in layers:
        for name in targets:
            if f"layers.{i}.self_attn.{name}" not in modules:
                prefix = f"layers.{i}.self_attn."
                have = sorted(p.removeprefix(prefix) for p in modules if p.startswith(prefix))
                raise UserError(
                    f"base {base} has no {name} in layer {i}'s attention (it has {', '.join(have)}); "
                    "LoRA targets q,k,v,o need GQA/MHA attention: pick --target among those it has"
                )
            paths.append(f"layers.{i}.self_attn.{name}")
    return paths


def attach_lora(
    model: MoETransformer, targets: list[str], rank: int, alpha: float, generator: torch.Generator
) -> dict[str, LoraLinear]:
    """Freeze `model` and wrap each targeted linear in a `LoraLinear` (A drawn from `generator`, in path order);
    return engine module path -> wrapper. UserError when a target is missing (`target_paths`) or the rank is out of
    range (`check_rank`, and no larger than the linear's smaller side)."""
    check_rank(rank, alpha)
    paths = target_paths(lora_modules(model.arch), model.arch.name, targets)
    model.requires_grad_(False)
    wrappers = {}
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        base = getattr(parent, name)
        if rank > min(base.in_features, base.out_features):
            raise UserError(f"--rank {rank} exceeds {path}'s smaller side ({base.in_features} x {base.out_features})")
        wrappers[path] = LoraLinear(base, rank, alpha, generator)
        setattr(parent, name, wrappers[path])
    return wrappers


def lora_parameters(wrappers: dict[str, LoraLinear]) -> list[nn.Parameter]:
    """Return the trainable parameters in a fixed order: A then B of each wrapper, by path order."""
    return [p for w in wrappers.values() for p in (w.lora_A, w.lora_B)]


def adapter_of(wrappers: dict[str, LoraLinear], name: str, rank: int, alpha: float, targets: list[str]) -> LoraAdapter:
    """Return the wrappers' weights as a `LoraAdapter` named `name` (CPU float32 copies)."""
    weights = {
        path: (w.lora_A.detach().float().cpu().clone(), w.lora_B.detach().float().cpu().clone())
        for path, w in wrappers.items()
    }
    return LoraAdapter(name=name, rank=rank, alpha=alpha, target_modules=list(targets), weights=weights)


def load_adapter(wrappers: dict[str, LoraLinear], adapter: LoraAdapter) -> None:
    """Copy `adapter`'s A and B into the attached wrappers of the same paths; UserError when the paths differ."""
    if set(adapter.weights) != set(wrappers):
        raise UserError(f"adapter {adapter.name} covers other modules than the ones attached; attach its targets")
    with torch.no_grad():
        for path, (a, b) in adapter.weights.items():
            wrappers[path].lora_A.copy_(a)
            wrappers[path].lora_B.copy_(b)


@contextlib.contextmanager
def merged(wrappers: dict[str, LoraLinear]) -> Iterator[None]:
    """Add each wrapper's delta to its base weight in place for the duration (the fast paths then serve the
    adapted model), and put the exact base weights back afterwards."""
    saved = []
    with torch.no_grad():
        for w in wrappers.values():
            saved.append(w.base.weight.detach().clone())
            w.base.weight.add_(w.delta().to(w.base.weight.dtype))
            w.merged = True
    try:
        yield
    finally:
        with torch.no_grad():
            for w, original in zip(wrappers.values(), saved, strict=True):
                w.base.weight.copy_(original)
                w.merged = False
