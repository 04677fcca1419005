"""A small, fast OpenAI-compatible server with a fixed answer: the upstream of `bench/portal_overhead.py`.

Usage: `python bench/echo_upstream.py [--host 127.0.0.1] [--port 8001] [--model echo] [--delay-ms 0]`.

Routes: `GET /health`, `GET /v1/models` (one model), `POST /v1/chat/completions` and `POST /v1/completions`,
non-streamed or streamed (SSE, one chunk per word, a finish chunk, a usage chunk when
`stream_options.include_usage` is true, then `data: [DONE]`). Every answer is the same short completion
(`COMPLETION`, cut to `max_tokens` words when that is smaller); usage counts are real counts for that request:
prompt tokens = whitespace-separated words of the prompt (chat: of every message's content), completion tokens =
words answered. `model` in a response is the `model` of the request. An unknown model is a 404 in OpenAI's error
format, so a misrouted request cannot pass for a served one. `--delay-ms D` waits D ms (without using the CPU)
before answering, as a model's latency would; streamed, the wait comes before the first chunk.

Why an echo server and not the tiny-moe engine: the bench measures what the portal adds to a request (auth,
catalog resolution, one more HTTP hop, metering). The engine spends tens of milliseconds of CPU per request on
its own forward passes, on the same two cores the portal and the load generator use; a ~1 ms portal cost would
be lost in that compute and its variance. An upstream that answers in microseconds leaves the portal's own cost
as the difference between the two paths. It is a plain Starlette app (no pydantic request models, no
validation) for the same reason: the less it spends, the more of the shared CPU goes to what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

COMPLETION = "This echo upstream answers every request with these same twelve short words."
DEFAULT_MODEL = "echo"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def count_words(text: str) -> int:
    """Return the number of whitespace-separated words in `text` (the echo server's token count)."""
    return len(text.split())


def prompt_tokens(body: dict) -> int:
    """Return the prompt token count of an OpenAI chat or completion request body (words, see the docstring)."""
    if "messages" in body:
        total = 0
        for message in body.get("messages") or []:
            content = message.get("content")
            if isinstance(content, list):  # content parts: count the text ones
                content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
            total += count_words(content or "")
        return total
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        return sum(count_words(p) if isinstance(p, str) else 1 for p in prompt)
    return count_words(prompt)


def answer_words(body: dict) -> list[str]:
    """Return the words of the answer to `body`: `COMPLETION`, cut to `max_tokens` words when that is smaller."""
    words = COMPLETION.split()
    limit = body.get("max_tokens") or body.get("max_completion_tokens")
    return words[:limit] if isinstance(limit, int) and limit > 0 else words


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def create_app(model: str = DEFAULT_MODEL, delay_ms: float = 0.0) -> Starlette:
    """Return the echo server's ASGI app serving one model id, `model`, answering after `delay_ms`."""
    created = int(time.time())
    delay_s = delay_ms / 1000

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> Response:
        card = {"id": model, "object": "model", "created": created, "owned_by": "echo"}
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "the body is not JSON", "invalid_json")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object", "invalid_json")
        if body.get("model") != model:
            return _error(
                404,
                f"model {body.get('model')!r} does not exist; this server serves {model!r}",
                "model_not_found",
                "model",
            )
        chat = request.url.path.endswith("/chat/completions")
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        words = answer_words(body)
        finish = "length" if len(words) < len(COMPLETION.split()) else "stop"
        usage = _usage(prompt_tokens(body), len(words))
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                _stream(request_id, body["model"], chat, words, finish, usage, include_usage),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        text = " ".join(words)
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            kind = "text_completion"
        response = {
            "id": request_id,
            "object": kind,
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": None,
            "choices": [choice],
            "usage": usage,
        }
        return JSONResponse(response)

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    return Starlette(routes=routes)


async def _stream(
    request_id: str, model: str, chat: bool, words: list[str], finish: str, usage: dict, include_usage: bool
):
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], with_usage: dict | None = None) -> str:
        data = {
            "id": request_id,
            "object": kind,
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if include_usage:
            data["usage"] = with_usage
        return f"data: {json.dumps(data)}\n\n"

    for i, word in enumerate(words):
        piece = word if i == 0 else " " + word
        if chat:
            delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
            yield chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])
        else:
            yield chunk([{"index": 0, "text": piece, "logprobs": None, "finish_reason": None}])
    if chat:
        yield chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}])
    else:
        yield chunk([{"index": 0, "text": "", "logprobs": None, "finish_reason": finish}])
    if include_usage:
        yield chunk([], usage)
    yield "data: [DONE]\n\n"


def main(argv: list[str] | None = None) -> None:
    """Serve the echo upstream in the foreground until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="wait this long before answering")
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms must be 0 or more")
    app = create_app(args.model, args.delay_ms)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
