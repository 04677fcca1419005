"""What the engine checks of a generation request before it tokenises it, without torch, so that a child process of
`openai.body_pool` can run it on a large body and answer only the verdict.

`Admission(model_id, max_model_len, max_token_chars, adapters, serves_adapters)` holds what the checks need of a
deployment (picklable):

- `admit(endpoint, typed, raw)`: the request body `raw` validated as FastAPI validates the route's body model
  (`Endpoint.validate_as_route`: its 400s worded as FastAPI's), then checked in this order: the model is this
  deployment's or one of its adapters (404 `model_not_found`; an adapter asked of a deployment that serves none, as
  expert parallel, a 400), every field is one the engine honours and its sampling settings are valid
  (400 naming the field), the prompt can fit the context (400 `context_length_exceeded`, judged by its length in
  characters against `max_model_len` times the most characters a token spans: a prompt that cannot fit is refused
  without tokenising). Returns (the validated body, its `SamplingParams`, with `lora` the adapter it names).
- `check_model(model)`: the adapter `model` names (None for the deployment's own id), or its 404 / 400 (GET
  /v1/models/{model} too). Adapters are looked up on disk each time (`engine.adapter_dir`): one written while the
  engine runs is served at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pydantic

from matrixstack.engine.adapter_dir import AdapterDirectory, UnknownAdapter
from matrixstack.engine.config import TOP_K_OFF, SamplingParams
from matrixstack.openai.endpoints import Endpoint
from matrixstack.openai.errors import OpenAIError, validation_error
from matrixstack.openai.types import SamplingFields


@dataclass(frozen=True)
class Admission:
    """The checks of one deployment (see the module docstring)."""

    model_id: str
    max_model_len: int
    max_token_chars: int  # the most characters one token of the tokenizer spans
    adapters: AdapterDirectory
    serves_adapters: bool  # False for an expert-parallel deployment (no adapter slots)

    def admit(self, endpoint: Endpoint, typed: bool, raw: bytes) -> tuple[SamplingFields, SamplingParams]:
        """Return (the validated body, its SamplingParams) of the request body `raw` at `endpoint`; raise the
        OpenAIError (400 / 404) of the first check it fails."""
        body = endpoint.validate_as_route(raw, typed)
        lora = self.check_model(body.model)
        params = sampling_params(endpoint, body, lora)
        self.check_prompt_fits(endpoint, body)
        return body, params

    def check_model(self, model: str) -> str | None:
        """Return the adapter `model` names (None for this deployment's id); raise a 404 when it is neither, a 400
        when it is an adapter and this deployment serves none."""
        if model == self.model_id:
            return None
        try:
            self.adapters.folder(model)
        except UnknownAdapter as exc:
            raise OpenAIError(
                404,
                f"The model `{model}` does not exist: this server serves `{self.model_id}` and its adapters "
                f"(see GET /v1/models); {exc}",
                "model",
                "model_not_found",
            ) from None
        if not self.serves_adapters:
            raise OpenAIError(
                400,
                f"`{model}` is a LoRA adapter, and this deployment runs expert parallel (--workers > 1), which serves "
                "no adapters; serve the adapter on a deployment with --workers 1",
                "model",
            )
        return model

    def check_prompt_fits(self, endpoint: Endpoint, body: SamplingFields) -> None:
        """Raise a 400 `context_length_exceeded` when the prompt cannot fit the context whatever its tokens: at
        least one token per `max_token_chars` characters, before anything is tokenised."""
        chars, ids = body.prompt_size()
        least = ids + math.ceil(chars / self.max_token_chars)
        if least >= self.max_model_len:
            size = f"{chars} characters, at least {least} tokens," if chars else f"{ids} tokens"
            raise OpenAIError(
                400,
                f"the prompt is {size} but this model's context is max_model_len={self.max_model_len} tokens for "
                "prompt and output together; shorten the prompt",
                endpoint.prompt_param,
                "context_length_exceeded",
            )


def sampling_params(endpoint: Endpoint, body: SamplingFields, lora: str | None = None) -> SamplingParams:
    """Return the request's SamplingParams through adapter `lora` (the route's default max_tokens when it sets none);
    a 400 naming the field for anything refused."""
    for param, message in body.unsupported_fields():
        raise OpenAIError(400, message, param)
    max_tokens = body.requested_max_tokens
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=TOP_K_OFF if body.top_k in (None, 0) else body.top_k,
            seed=body.seed,
            max_tokens=endpoint.default_max_tokens if max_tokens is None else max_tokens,
            stop=body.stop or [],
            stop_token_ids=body.stop_token_ids or [],
            ignore_eos=body.ignore_eos,
            lora=lora,
        )
    except pydantic.ValidationError as exc:
        raise validation_error(exc.errors()) from None
