"""OpenAI-compatible request bodies (the subset MatrixStack serves), as pydantic models, and the shared parts of
responses.

Requests: `CompletionRequest` (`POST /v1/completions`) and `ChatCompletionRequest` (`POST /v1/chat/completions`).
They accept OpenAI's field names and types, as strictly as OpenAI does: no coercion (`"max_tokens": "4"`,
`"stream": "yes"`, `"temperature": "0.5"` are refused with a 400 naming the field; an integer is a number). A
field OpenAI defines that this engine cannot honour (tools, logprobs,
n > 1, penalties, ...) is refused with a 400 naming it (`unsupported_fields`), never silently ignored; a field
OpenAI does not define is refused as OpenAI refuses it ("Unrecognized request argument supplied"). Extensions,
as vLLM names them: `top_k`, `stop_token_ids`, `ignore_eos`.

Responses are plain dicts in exactly OpenAI's shapes, so the official `openai` client parses them: `usage`,
`model_card` here; a route's responses and stream chunks are built by its endpoint (`openai.endpoints`).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

OPENAI_MAX_TEMPERATURE = 2.0
MAX_SEED = 2**64 - 1  # seeds are 64-bit unsigned (what torch.Generator.manual_seed takes)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to "until the context"
STRICT = ConfigDict(extra="forbid", strict=True)  # unknown fields refused, no type coercion (OpenAI's rules)


class StreamOptions(BaseModel):
    """`stream_options`: `include_usage` adds a last chunk with empty choices and the request's usage."""

    model_config = STRICT

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension; accepted, usage is sent once at the end


class SamplingFields(BaseModel):
    """Fields both endpoints share: sampling, stopping, streaming, and OpenAI fields accepted but unused."""

    model_config = STRICT

    model: str = Field(description="the deployment's model id (GET /v1/models)")
    temperature: float | None = Field(None, ge=0.0, le=OPENAI_MAX_TEMPERATURE, description="0 is greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, description="extension: keep the k most likely tokens; -1 or 0 keeps all")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the output")
    stop_token_ids: list[int] | None = Field(None, description="extension: token ids that end the output")
    ignore_eos: bool = Field(False, description="extension: keep generating after the end-of-sequence token")
    n: int = Field(1, ge=1, description="choices per prompt; this engine serves n=1 only")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, unused (OpenAI's abuse monitoring id)
    # OpenAI fields refused when set to anything but their neutral value (see `unsupported_fields`).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None

    @property
    def requested_max_tokens(self) -> int | None:
        """Return the most tokens the request asks for (None: it does not say)."""
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        """Return True when a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def prompt_size(self) -> tuple[int, int]:
        """Return (characters, token ids) of the prompt as sent: text counts as characters, token ids as ids."""
        raise NotImplementedError

    def unsupported_fields(self) -> list[tuple[str, str]]:
        """Return (field, message) for each field set to something this engine cannot do."""
        problems = []
        if self.n != 1:
            problems.append(("n", f"n={self.n} is not supported: this engine returns one choice per request (n=1)"))
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                problems.append((name, f"{name} is not supported by this engine; leave it unset or 0"))
        if self.logit_bias:
            problems.append(("logit_bias", "logit_bias is not supported by this engine; leave it unset"))
        if self.logprobs not in (None, False, 0):
            problems.append(("logprobs", "logprobs are not supported by this engine; leave logprobs unset"))
        if self.stream_options is not None and not self.stream:
            problems.append(("stream_options", "stream_options is only allowed when stream is true"))
        return problems


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`: one prompt (text, or token ids), one choice."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="the prompt: a string or a list of token ids (a list of one of either is accepted too)"
    )
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def single_prompt(self) -> str | list[int] | None:
        """Return the one prompt as text or token ids; None when the request carries several."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        if not prompt:
            return []  # the engine refuses an empty prompt with a clear message
        if prompt and all(isinstance(p, int) for p in prompt):
            return list(prompt)  # type: ignore[arg-type]
        if len(prompt) == 1:
            return prompt[0]  # type: ignore[return-value]
        return None

    def prompt_size(self) -> tuple[int, int]:
        """Return (characters, 0) of a text prompt, (0, ids) of a token-id prompt."""
        prompt = self.single_prompt()
        return (len(prompt), 0) if isinstance(prompt, str) else (0, len(prompt or []))

    def unsupported_fields(self) -> list[tuple[str, str]]:
        """Return (field, message) for each field set to something this engine cannot do."""
        problems = super().unsupported_fields()
        if self.single_prompt() is None:
            problems.append(("prompt", "send one prompt per request (a string or a list of token ids), not a batch"))
        if self.echo:
            problems.append(("echo", "echo is not supported by this engine; leave it unset"))
        if self.best_of not in (None, 1):
            problems.append(("best_of", "best_of is not supported by this engine; leave it unset or 1"))
        if self.suffix:
            problems.append(("suffix", "suffix (insertion) is not supported by this engine; leave it unset"))
        return problems


class TextPart(BaseModel):
    """A text part of a chat message's content list."""

    model_config = STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message. `developer` is treated as `system`; content may be a string or a list of text parts."""

    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None  # accepted, not part of the template

    def text(self) -> str:
        """Return the message's content as one string."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_template_message(self) -> dict[str, str]:
        """Return the {"role", "content"} dict the tokenizer's chat template takes."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`: messages through the model's chat template, one choice."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None  # accepted; without tools it changes nothing
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    metadata: dict[str, str] | None = None  # accepted, unused
    store: bool | None = None  # accepted, unused

    @property
    def requested_max_tokens(self) -> int | None:
        """Return the most tokens the request asks for: `max_completion_tokens`, else `max_tokens`."""
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens

    def prompt_size(self) -> tuple[int, int]:
        """Return (characters of the messages' contents, 0)."""
        return sum(len(m.text()) for m in self.messages), 0

    def unsupported_fields(self) -> list[tuple[str, str]]:
        """Return (field, message) for each field set to something this engine cannot do."""
        problems = super().unsupported_fields()
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            if self.max_tokens != self.max_completion_tokens:
                problems.append(("max_tokens", "set max_completion_tokens or max_tokens, not both"))
        if self.top_logprobs:
            problems.append(("top_logprobs", "logprobs are not supported by this engine; leave top_logprobs unset"))
        for name in ("tools", "tool_choice", "functions", "function_call"):
            if getattr(self, name) not in (None, [], "none"):
                problems.append((name, f"{name}: tool calling is not supported by this engine; leave it unset"))
        if self.response_format and self.response_format.get("type", "text") != "text":
            problems.append(
                ("response_format", "only response_format {'type': 'text'} is supported; structured output is not")
            )
        if self.modalities and set(self.modalities) != {"text"}:
            problems.append(("modalities", "only the text modality is supported"))
        return problems


# ---- responses: plain dicts in OpenAI's exact shapes ----------------------------------------------------------


def now_s() -> int:
    """Return the Unix time in seconds (OpenAI's `created`)."""
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """Return an OpenAI usage object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_card(model_id: str, created: int, max_model_len: int | None = None) -> dict[str, Any]:
    """Return one entry of `GET /v1/models`."""
    card: dict[str, Any] = {"id": model_id, "object": "model", "created": created, "owned_by": "matrixstack"}
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return card
