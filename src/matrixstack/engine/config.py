"""Engine and request settings: `EngineConfig` (one deployment's serving limits, its LoRA adapter slots and where
adapters are found) and `SamplingParams` (one request, with the adapter it runs through).

Both are pydantic models; an invalid value raises `pydantic.ValidationError` whose message names the field and
the allowed range (a `ValueError`, so the HTTP layer maps it to a 400).
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from matrixstack.openai.types import MAX_SEED
from matrixstack.specio import Strict

TOP_K_OFF = -1
GREEDY_BELOW_TEMPERATURE = 1e-6  # a request this cold samples the argmax anyway (see SamplingParams.greedy)


class EngineConfig(Strict, frozen=True):
    """Limits of one engine instance: KV cache size, batch size, chunked-prefill token budget, context length."""

    block_size: int = Field(16, gt=0, description="tokens per KV cache block")
    num_kv_blocks: int = Field(
        1024, gt=0, description="KV cache blocks in the pool (the model runner may size this from free memory)"
    )
    max_num_seqs: int = Field(64, gt=0, description="most sequences in one step's batch")
    max_num_batched_tokens: int = Field(
        2048, gt=0, description="token budget per step: decode tokens plus prefill chunk tokens"
    )
    max_model_len: int = Field(2048, gt=0, description="most tokens (prompt + output) in one sequence")
    max_loras: int = Field(4, ge=1, description="LoRA adapters held on the device at once (slots, LRU-evicted)")
    max_lora_rank: int = Field(16, ge=1, description="highest LoRA rank an adapter may have")
    lora_modules: dict[str, str] = Field(
        default_factory=dict, description="adapter name -> PEFT folder, besides those under adapters_dir"
    )
    adapters_dir: str | None = Field(
        None, description="folder of adapters by name (<dir>/<name>/); null: <data dir>/adapters"
    )

    @property
    def kv_capacity_tokens(self) -> int:
        """Return how many tokens the whole KV cache holds."""
        return self.num_kv_blocks * self.block_size

    @model_validator(mode="after")
    def _limits_consistent(self) -> EngineConfig:
        if self.kv_capacity_tokens < self.max_model_len:
            raise ValueError(
                f"num_kv_blocks={self.num_kv_blocks} x block_size={self.block_size} = {self.kv_capacity_tokens} "
                f"tokens cannot hold one sequence of max_model_len={self.max_model_len} tokens; raise num_kv_blocks "
                f"to at least {-(-self.max_model_len // self.block_size)} or lower max_model_len"
            )
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is below max_num_seqs={self.max_num_seqs}: "
                "a step could not give every running sequence its decode token; raise max_num_batched_tokens"
            )
        return self


class SamplingParams(Strict, frozen=True):
    """How one request picks its tokens and when it stops (the OpenAI / vLLM fields of the same names)."""

    temperature: float = Field(1.0, ge=0.0, description="softmax temperature; 0 (or below 1e-6) means greedy (argmax)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus: keep the smallest top set with this mass")
    top_k: int = Field(TOP_K_OFF, description="keep the k most likely tokens; -1 keeps all")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="per-request random seed for reproducible sampling")
    max_tokens: int | None = Field(
        16, ge=1, description="most output tokens; null means as many as max_model_len leaves"
    )
    stop: list[str] = Field(default_factory=list, description="strings that end the output (not included in it)")
    stop_token_ids: list[int] = Field(default_factory=list, description="token ids that end the output")
    ignore_eos: bool = Field(False, description="keep generating after the end-of-sequence token")
    detokenize: bool = Field(
        True, description="assemble the output text; false returns token ids only (no stop strings then)"
    )
    lora: str | None = Field(None, description="name of the LoRA adapter to run the request through; null: the base")

    @field_validator("top_k")
    @classmethod
    def _top_k_on_or_off(cls, top_k: int) -> int:
        if top_k != TOP_K_OFF and top_k < 1:
            raise ValueError(f"top_k must be -1 (off) or at least 1, got {top_k}")
        return top_k

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, stop: object) -> object:
        return [stop] if isinstance(stop, str) else stop

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):
            raise ValueError("stop strings must not be empty")
        return stop

    @model_validator(mode="after")
    def _stop_needs_text(self) -> SamplingParams:
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need the output text: drop stop or set detokenize to true")
        return self

    @property
    def greedy(self) -> bool:
        """Return True when the request takes the most likely token every step: temperature 0, or one below
        GREEDY_BELOW_TEMPERATURE (sampling there is the argmax anyway, and logits / temperature overflow float32)."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE
