"""OpenAI's error format, the errors this protocol floor raises, and the handlers that answer them.

- `error_body(message, type_, param, code)`: the `{"error": {...}}` object OpenAI answers errors with;
- `OpenAIError(status, message, param, code)`: an error answered in that format with a status (it pickles as an
  `OpenAIError`, so a body pool's child can raise it: `openai.body_pool`);
  `validation_error(errors)` turns pydantic / FastAPI validation errors into a 400 naming the first bad field;
- `ClientGone`: a request's client went away (answered 499, which nobody reads);
- `install_openai_error_handlers(app)`: the handlers every OpenAI-compatible server here shares;
- `UpstreamError(status, body)`: an upstream server's error, its status and OpenAI error body as sent;
  `upstream_error`, `non_json_error`, `transport_error`, `stream_error` make one from an error response, an answer
  that is not JSON (502), an unreachable or slow upstream (502 / 504), and an error event in a stream.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

UNREACHABLE = "upstream_unreachable"  # the code of an upstream that cannot be reached (502)
TIMED_OUT = "upstream_timeout"  # the code of an upstream that did not answer in time (504)


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    """Return an OpenAI error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_type(status_code: int) -> str:
    return "server_error" if status_code >= 500 else "invalid_request_error"


class OpenAIError(Exception):
    """An error answered in OpenAI's format with an HTTP status."""

    def __init__(
        self, status_code: int, message: str, param: str | None = None, code: str | None = None, type_: str = ""
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _error_type(status_code)

    def __reduce__(self) -> tuple[type[OpenAIError], tuple[Any, ...]]:
        return OpenAIError, (self.status_code, self.message, self.param, self.code, self.type)

    def body(self) -> dict[str, Any]:
        """Return the OpenAI error object."""
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        """Return the error as a JSON response."""
        return JSONResponse(self.body(), status_code=self.status_code)


class ClientGone(Exception):
    """The client of a non-streamed request disconnected; its request was aborted."""


def _param_of(loc: tuple | list) -> str | None:
    """Return the dotted field path of a pydantic error location (without FastAPI's leading "body")."""
    parts = [str(p) for p in loc if p != "body"]
    # Union members appear in the path as type names ("str", "list[int]"); they are not fields.
    parts = [p for p in parts if not ("[" in p or p in ("str", "int", "float", "bool", "function-after"))]
    return ".".join(parts) or None


def validation_error(errors: list[dict[str, Any]]) -> OpenAIError:
    """Return a 400 for pydantic / FastAPI validation errors, naming the first bad field."""
    if not errors:
        return OpenAIError(400, "the request is invalid")
    first = errors[0]
    kind = first.get("type", "")
    param = _param_of(first.get("loc", ()))
    if kind == "json_invalid":
        return OpenAIError(400, "the request body is not valid JSON; send a JSON object")
    if kind == "missing" and param is None:
        return OpenAIError(400, "the request has no body; send a JSON object")
    if kind == "extra_forbidden":
        return OpenAIError(400, f"Unrecognized request argument supplied: {param}", param)
    if kind == "missing":
        return OpenAIError(400, f"'{param}' is a required property", param)
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    bad = first.get("input")
    if "input" in first and not isinstance(bad, dict | list) and repr(bad) not in message and str(bad) not in message:
        message = f"{message} (got {bad!r})"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return OpenAIError(400, f"{param or 'the request body'}: {message}{more}", param)


def install_openai_error_handlers(app: FastAPI) -> None:
    """Register on `app` the handlers every OpenAI-compatible server here shares: an `OpenAIError` as its own
    response, Starlette's HTTP errors (unknown route, wrong method) in OpenAI's format, and `ClientGone` as a 499
    nobody reads. Validation and internal errors stay each app's own."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        code = "not_found" if exc.status_code == 404 else None
        return OpenAIError(exc.status_code, message, code=code).response()

    @app.exception_handler(ClientGone)
    async def _client_gone(_: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"


class UpstreamError(Exception):
    """An upstream engine's error: its HTTP status and its OpenAI error body (`{"error": {...}}`)."""

    def __init__(self, status_code: int, body: dict[str, Any]):
        self.status_code = status_code
        self.body = body
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        self.message = str(error.get("message") or body)
        self.code = error.get("code")
        self.param = error.get("param")
        super().__init__(f"upstream {status_code}: {self.message}")


def upstream_error(status_code: int, text: str, reason: str = "") -> UpstreamError:
    """Return the error of a non-2xx upstream response with body `text`, keeping an OpenAI error body as it is."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return UpstreamError(status_code, body)
    message = text.strip()[:500] or reason or f"HTTP {status_code}"
    if isinstance(body, dict) and "detail" in body:  # FastAPI's default error shape
        message = str(body["detail"])
    return UpstreamError(status_code, error_body(message, _error_type(status_code), code="upstream_error"))


def non_json_error(url: str) -> UpstreamError:
    """Return the error of an upstream whose answer at `url` is not JSON (502)."""
    return UpstreamError(502, error_body(f"upstream {url} answered non-JSON", "server_error", code="upstream_error"))


def transport_error(base_url: str, exc: httpx.TransportError) -> UpstreamError:
    """Return the error of an upstream that could not be reached (502) or did not answer in time (504)."""
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(504, error_body(f"upstream {base_url} timed out: {exc}", "server_error", code=TIMED_OUT))
    return UpstreamError(502, error_body(f"cannot reach upstream {base_url}: {exc}", "server_error", code=UNREACHABLE))


def stream_error(chunk: dict[str, Any]) -> UpstreamError | None:
    """Return the error an SSE chunk carries (`{"error": {...}}`), None for an ordinary chunk."""
    if isinstance(chunk, dict) and isinstance(chunk.get("error"), dict):
        status = chunk["error"].get("code")
        return UpstreamError(status if isinstance(status, int) and status >= 400 else 500, chunk)
    return None
