"""The two generation routes of the OpenAI API as objects: what differs between chat and text completion, said once.

An `Endpoint` is one route: its path under the API root, its request body model, the field its prompt is in,
how a system prompt goes into a request, and the shapes of its responses and stream chunks. `CHAT`
(`/chat/completions`) and `COMPLETION` (`/completions`) are the two, module-level constants; the engine's server,
the portal and the upstream clients take one and never branch on the route (as SGLang's `OpenAIServingBase`
has a chat and a completion subclass).

- `parse(raw)`: the request body as sent (a dict, forwarded as is) and validated (its body model), parsed once
  (the portal's); `validate_as_route(raw, typed)`: the body validated exactly as FastAPI validates a route's body
  model, its errors worded as FastAPI's (the engine's). Either raises the 400 (`validation_error`), and either is
  a job for `openai.body_pool` (an endpoint pickles as the name of its module constant);
- `with_system_prompt(body, prompt)`: the body with a system prompt put in front of its prompt;
- `response(...)`, `chunk(...)`, `usage_chunk(...)`, `head_chunks(...)`: a non-streamed response, one stream
  chunk (`text=None`: the usage-only last chunk), and the chunks a stream starts with, in OpenAI's exact shapes.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from pydantic import ValidationError

from matrixstack.openai.errors import OpenAIError, validation_error
from matrixstack.openai.types import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)


class Endpoint:
    """One generation route (see the module docstring); `ChatEndpoint` and `CompletionEndpoint` give its parts."""

    constant: str  # the name of its module constant (CHAT, COMPLETION): what it pickles as
    path: str  # under the API root (`/v1`)
    path_bytes: bytes
    body_model: type[SamplingFields]
    prompt_param: str  # the field an error about the prompt names
    text_field: str  # the field of a streamed choice that carries the generated text
    id_prefix: str  # of the ids of responses
    response_object: str
    chunk_object: str
    default_max_tokens: int | None  # when the request sets none (None: until the context is full)
    max_tokens_alias: str | None  # another name the route takes for max_tokens

    def __reduce__(self) -> str:
        return self.constant

    def parse(self, raw: bytes) -> tuple[dict[str, Any], SamplingFields]:
        """Return (the JSON object `raw` as sent, the same validated as the body model); a 400 naming the first bad
        field, worded as pydantic's JSON mode words it, when it is not a valid request."""
        try:
            body = orjson.loads(raw)
            if type(body) is dict:
                return body, self.body_model.model_validate(body)
        except ValueError:  # not JSON, or not valid (pydantic's ValidationError is a ValueError)
            pass
        # the error path only: pydantic's JSON mode says what is wrong in its own words ("a valid array", ...)
        try:
            model = self.body_model.model_validate_json(raw)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None
        return orjson.loads(raw), model  # valid JSON to pydantic but not to orjson (NaN): orjson's error, as before

    def validate_as_route(self, raw: bytes, typed: bool) -> SamplingFields:
        """Return the body `raw` validated as FastAPI validates a route's body of the body model (`typed`: the
        request declared a content type, which the guard has checked is JSON; without one FastAPI reads no JSON);
        the 400 FastAPI's errors make (`validation_error`) when it is not a valid request."""
        if not raw:
            raise validation_error([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
        body: Any = raw
        if typed:
            try:
                body = orjson.loads(raw)  # faster; what it parses, it parses as `json.loads` does
            except orjson.JSONDecodeError:
                body = _fastapi_json(raw)  # FastAPI's verdict on what orjson refuses (NaN, UTF-16, bad JSON)
        try:
            return self.body_model.model_validate(body, from_attributes=True)
        except ValidationError as exc:
            raise validation_error([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None

    def with_system_prompt(self, body: dict[str, Any], prompt: str) -> dict[str, Any] | None:
        """Return `body` (a copy of the request's, changed in place) with `prompt` in front of its prompt; None when
        the prompt cannot take one."""
        raise NotImplementedError

    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        """Return the one choice of a non-streamed response."""
        raise NotImplementedError

    def delta_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        """Return the one choice of a stream chunk carrying `text` (empty: none) and the finish reason."""
        raise NotImplementedError

    def head_chunks(self, request_id: str, model: str, created: int, include_usage: bool) -> list[dict[str, Any]]:
        """Return the chunks a stream starts with, before the first text."""
        return []

    def response(
        self, request_id: str, model: str, created: int, text: str, finish_reason: str, usage_: dict[str, int]
    ) -> dict[str, Any]:
        """Return a non-streamed response."""
        return {
            "id": request_id,
            "object": self.response_object,
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [self.choice(text, finish_reason)],
            "usage": usage_,
        }

    def chunk(
        self,
        request_id: str,
        model: str,
        created: int,
        text: str | None,
        finish_reason: str | None,
        include_usage: bool,
        usage_: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        """Return one stream chunk; `text=None` gives the final usage chunk (empty choices)."""
        choices = [] if text is None else [self.delta_choice(text, finish_reason)]
        return self._chunk(request_id, model, created, choices, include_usage, usage_)

    def usage_chunk(self, request_id: str, model: str, created: int, usage_: dict[str, int]) -> dict[str, Any]:
        """Return the usage-only last chunk of a stream."""
        return self._chunk(request_id, model, created, [], True, usage_)

    def _chunk(
        self,
        request_id: str,
        model: str,
        created: int,
        choices: list[dict[str, Any]],
        include_usage: bool,
        usage_: dict[str, int] | None,
    ) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": request_id,
            "object": self.chunk_object,
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if include_usage:
            chunk["usage"] = usage_
        return chunk


class ChatEndpoint(Endpoint):
    """`POST /v1/chat/completions`: messages in, an assistant message out."""

    constant, path, path_bytes = "CHAT", "/chat/completions", b"/chat/completions"
    body_model = ChatCompletionRequest
    prompt_param, text_field = "messages", "content"
    id_prefix, response_object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"
    default_max_tokens, max_tokens_alias = None, "max_completion_tokens"

    def with_system_prompt(self, body: dict[str, Any], prompt: str) -> dict[str, Any]:
        """Return `body` with `prompt` merged in front of its first system message, or as a new first message."""
        messages = list(body.get("messages") or [])
        first = next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "system"), None)
        if first is None:
            messages.insert(0, {"role": "system", "content": prompt})
        else:
            messages[first] = {**messages[first], "content": _prefixed(prompt, messages[first])}
        body["messages"] = messages
        return body

    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        """Return the assistant message choice."""
        message = {"role": "assistant", "content": text, "refusal": None}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}

    def delta_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        """Return a delta choice: `{"content": text}`, or `{}` for no text."""
        delta = {"content": text} if text else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def head_chunks(self, request_id: str, model: str, created: int, include_usage: bool) -> list[dict[str, Any]]:
        """Return the chunk that opens the assistant message (role, empty content)."""
        opening = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [self._chunk(request_id, model, created, [opening], include_usage, None)]


class CompletionEndpoint(Endpoint):
    """`POST /v1/completions`: a prompt in, its continuation out."""

    constant, path, path_bytes = "COMPLETION", "/completions", b"/completions"
    body_model = CompletionRequest
    prompt_param, text_field = "prompt", "text"
    id_prefix, response_object, chunk_object = "cmpl", "text_completion", "text_completion"
    default_max_tokens, max_tokens_alias = COMPLETIONS_DEFAULT_MAX_TOKENS, None

    def with_system_prompt(self, body: dict[str, Any], prompt: str) -> dict[str, Any] | None:
        """Return `body` with `prompt` and a blank line as a prefix of its prompt (of each, for a list of texts);
        None when the prompt is token ids."""
        prefix = prompt + "\n\n"
        text = body.get("prompt", "")
        if isinstance(text, str):
            body["prompt"] = prefix + text
        elif isinstance(text, list) and all(isinstance(p, str) for p in text):
            body["prompt"] = [prefix + p for p in text]
        else:
            return None
        return body

    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        """Return the text choice."""
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def delta_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        """Return the text choice of a chunk."""
        return self.choice(text, finish_reason)


def _fastapi_json(raw: bytes) -> Any:
    """Return `raw` parsed as FastAPI parses a body (`json.loads`), or its 400: FastAPI's `json_invalid` error, or
    its words for a body that is not UTF-8."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        error = {"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error", "input": {}}
        raise validation_error([error]) from None
    except ValueError:  # not UTF-8
        raise OpenAIError(400, "There was an error parsing the body") from None


def _prefixed(prompt: str, message: dict[str, Any]) -> str | list[Any]:
    """Return a system message's content with `prompt` in front (text, or a text part before the parts)."""
    content = message.get("content")
    if isinstance(content, list):
        return [{"type": "text", "text": prompt}, *content]
    return f"{prompt}\n\n{content}" if content else prompt


CHAT = ChatEndpoint()
COMPLETION = CompletionEndpoint()
ENDPOINTS = (CHAT, COMPLETION)
