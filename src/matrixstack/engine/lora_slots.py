"""LoRA adapters for serving: found by name on disk (`engine.adapter_dir`) and held in a fixed number of device slots
with LRU eviction (`LoraSlots`), from which each step's `LoraBatch` takes the weights of the adapters it runs.

Names and folders: `engine.adapter_dir` (`AdapterDirectory`; unknown names raise `UnknownAdapter`).

Slots. `max_loras` adapters are on the model's device at once, in slots 1..max_loras of stacked tensors (slot 0 is
the base: zeros, never written); `acquire` gives a sequence its adapter's slot, loading the adapter into a free slot
or into the least recently used one that no sequence holds; an adapter some running sequence holds is never evicted
(`acquire` returns None instead and the scheduler keeps the request waiting until a slot frees). `release` lets go.
Adapters are read from disk (`read_peft`) when a request for them is added (`prepare`, so a bad folder fails that
request with a clear UserError, before it waits), and the last `max_loras` read stay in host memory for reuse.

Sites. The serving sites are those of `engine.model` (the fused q/k/v GEMM and o_proj of GQA/MHA attention, the
fused gate/up GEMM and down_proj of the dense and shared-expert FFNs). Per site and slot the stacks hold a
[in, n * R] (A^T of each of the site's n modules side by side, rank zero-padded to R = max_lora_rank) and b
[n * R, out] (block-diagonal scaling * B^T), the layout `engine.lora_batch` multiplies. An adapter with weights on
another module (a routed expert, an MLA projection) is refused when it is prepared. `batch` compacts the stacks to
the slots a step uses (cached while the same slots stay active, so steady decoding copies nothing).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch

from matrixstack.engine.adapter_dir import AdapterDirectory
from matrixstack.engine.config import EngineConfig
from matrixstack.engine.lora_adapter import LoraAdapter, read_peft
from matrixstack.engine.lora_batch import LoraBatch, layout
from matrixstack.engine.model import GQAAttention, MoETransformer
from matrixstack.engine.moe import SwiGLU
from matrixstack.errors import UserError


@dataclass(frozen=True)
class Site:
    """One LoRA site: the engine module paths fused there (in output order), its input width, their out widths."""

    modules: tuple[str, ...]
    in_features: int
    out_features: tuple[int, ...]


def serving_sites(model: MoETransformer) -> dict[str, Site]:
    """Return the model's LoRA sites by key (`<module path>.qkv`, `.o_proj`, `.gate_up`, `.down_proj`)."""
    sites = {}
    for path, m in model.named_modules():
        if isinstance(m, GQAAttention):
            linears = {"qkv": (m.q_proj, m.k_proj, m.v_proj), "o_proj": (m.o_proj,)}
            names = {"qkv": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",)}
        elif isinstance(m, SwiGLU) and m.fused is not None:
            linears = {"gate_up": (m.gate_proj, m.up_proj), "down_proj": (m.down_proj,)}
            names = {"gate_up": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
        else:
            continue
        for key, group in linears.items():
            sites[f"{path}.{key}"] = Site(
                tuple(f"{path}.{n}" for n in names[key]),
                group[0].in_features,
                tuple(lin.out_features for lin in group),
            )
    return sites


class LoraSlots:
    """The device slots of one model's adapters, LRU-evicted, with the host copies they load from (module
    docstring)."""

    def __init__(self, model: MoETransformer, config: EngineConfig):
        self.model = model
        self.max_loras, self.max_rank = config.max_loras, config.max_lora_rank
        self.directory = AdapterDirectory.of(config)
        self.sites = serving_sites(model)
        self._where = {module: (key, j) for key, site in self.sites.items() for j, module in enumerate(site.modules)}
        self._host: OrderedDict[str, LoraAdapter] = OrderedDict()  # the last max_loras adapters read, LRU order
        self.names: list[str | None] = [None] * (self.max_loras + 1)  # slot -> adapter name (slot 0: the base)
        self.holders = [0] * (self.max_loras + 1)  # slot -> sequences holding it
        self._last_used = [0] * (self.max_loras + 1)
        self._clock = itertools.count(1)
        self._targets: dict[str, set[int]] = {key: set() for key in self.sites}  # site -> slots with weights there
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # made on first load
        self._compact: tuple[tuple[int, ...], dict] | None = None  # (active slots, their weights by site)
        self.loads = 0  # adapters written into a slot, for tests and metrics

    def loaded(self) -> list[str]:
        """Return the names of the adapters in device slots."""
        return sorted(n for n in self.names if n is not None)

    def prepare(self, name: str) -> LoraAdapter:
        """Return adapter `name` read for serving (from a slot's or the host copy, else from disk); UnknownAdapter
        when there is no such adapter, UserError when its folder is bad or it targets a module without a site."""
        if name in self._host:
            self._host.move_to_end(name)
            return self._host[name]
        adapter = read_peft(self.directory.folder(name), self.model.arch, self.max_rank, name)
        unserved = sorted(m for m in adapter.weights if m not in self._where)
        if unserved:
            raise UserError(
                f"adapter {name!r} has weights on {unserved[0]}"
                f"{f' and {len(unserved) - 1} more modules' if len(unserved) > 1 else ''}: the builtin engine serves "
                "LoRA on GQA/MHA attention (q/k/v/o_proj) and on dense and shared-expert FFNs (gate/up/down_proj), "
                "not on routed experts or MLA projections; train it on those modules (--target q,k,v,o)"
            )
        self._host[name] = adapter
        while len(self._host) > self.max_loras:
            self._host.popitem(last=False)
        return adapter

    def acquire(self, adapter: LoraAdapter) -> int | None:
        """Return the slot holding `adapter` for one more sequence, loading it into a free or the least recently
        used unheld slot; None when every slot is held by running sequences (the caller waits)."""
        slot = self.names.index(adapter.name) if adapter.name in self.names else None
        if slot is None:
            free = [s for s in range(1, self.max_loras + 1) if self.holders[s] == 0]
            if not free:
                return None
            slot = min(free, key=lambda s: (self.names[s] is not None, self._last_used[s]))
            self._load(slot, adapter)
        self.holders[slot] += 1
        self._last_used[slot] = next(self._clock)
        return slot

    def release(self, slot: int) -> None:
        """Let go of `slot` for one sequence (it stays loaded until evicted)."""
        self.holders[slot] -= 1

    def _allocate(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Return zeroed stacks for every site: a [slots, in, n R], b [slots, n R, out] on the model's device."""
        weight = self.model.embed_tokens.weight
        stacks = {}
        for key, site in self.sites.items():
            width = len(site.modules) * self.max_rank
            a = torch.zeros(self.max_loras + 1, site.in_features, width, dtype=weight.dtype, device=weight.device)
            b = torch.zeros(self.max_loras + 1, width, sum(site.out_features), dtype=weight.dtype, device=weight.device)
            stacks[key] = (a, b)
        return stacks

    @torch.inference_mode()
    def _load(self, slot: int, adapter: LoraAdapter) -> None:
        """Write `adapter` into `slot` (evicting what was there)."""
        if self._stacks is None:
            self._stacks = self._allocate()
        for key, (a, b) in self._stacks.items():
            if slot in self._targets[key]:
                a[slot].zero_()
                b[slot].zero_()
                self._targets[key].discard(slot)
        for module, (lora_a, lora_b) in adapter.weights.items():
            key, j = self._where[module]
            site, (a, b) = self.sites[key], self._stacks[key]
            rank, start = lora_a.shape[0], sum(site.out_features[:j])
            cols = slice(j * self.max_rank, j * self.max_rank + rank)
            a[slot, :, cols] = lora_a.t().to(a.dtype)
            b[slot, cols, start : start + site.out_features[j]] = (lora_b * adapter.scaling).t().to(b.dtype)
            self._targets[key].add(slot)
        self.names[slot] = adapter.name
        self._compact = None
        self.loads += 1

    def batch(self, seq_slots: list[int], seq_tokens: list[int]) -> LoraBatch | None:
        """Return the step's `LoraBatch` for sequences with `seq_tokens[i]` tokens through slot `seq_slots[i]`, or
        None when no token has an adapter."""
        plan = layout(seq_slots, seq_tokens)
        if plan is None:
            return None
        if self._compact is None or self._compact[0] != plan.slots:
            self._compact = (plan.slots, self._weights(plan.slots))
        weight = self.model.embed_tokens.weight
        return LoraBatch(plan, self._compact[1], weight.device, weight.dtype)

    def _weights(self, slots: tuple[int, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Return the stacks of `slots` by site, for the sites one of them targets (views when they are all the
        slots in order, else copies)."""
        every = slots == tuple(range(1, self.max_loras + 1))
        index = torch.tensor(slots, device=self.model.embed_tokens.weight.device)
        out = {}
        for key, (a, b) in self._stacks.items():
            if self._targets[key].isdisjoint(slots):
                continue
            out[key] = (a[1:], b[1:]) if every else (a.index_select(0, index), b.index_select(0, index))
        return out
