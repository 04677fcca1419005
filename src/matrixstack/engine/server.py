"""An OpenAI-compatible HTTP server for one engine deployment (FastAPI, served by uvicorn).

Routes:

- `GET /health`: 200 `{"status": "ok"}` while the engine loop runs, 503 otherwise;
- `GET /v1/models`, `GET /v1/models/{model}`: the deployment's model id and, as vLLM lists them, the LoRA adapters
  it can serve (loaded or found in its adapter folder, `engine.lora_slots.AdapterDirectory`), each with `parent`
  = the model id;
- `POST /v1/completions`: one prompt (text or token ids), one choice, streamed (SSE) or not;
- `POST /v1/chat/completions`: messages through the tokenizer's chat template, streamed or not;
- `GET /openapi.json`, `GET /docs`: the schema (FastAPI's), and a page listing it (`openai.docs`: no CDN).

Responses, stream chunks (`data: {...}\\n\\n`, then `data: [DONE]`) and `stream_options.include_usage` follow
OpenAI exactly (`openai.endpoints`). Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`:
400 for an invalid request (FastAPI's 422 validation errors included; types as strict as OpenAI's; a body not
declared JSON; a prompt that cannot fit, code `context_length_exceeded`), 413 `request_too_large` for a body
over `max_body_mib` (`openai.guard`, default 4 MiB), 404 for an unknown model (code `model_not_found`) or route,
500 when the engine fails the request (a worker died). A stream that fails after it started sends one
`data: {"error": ...}` event saying what happened to this request (never naming others), then `data: [DONE]`.

One request never stalls another: the generation routes read their bodies themselves and check them
(`engine.admission.Admission`: validated as FastAPI validates a route's body, with FastAPI's 400s; the model; the
fields; the prompt's length in characters against `max_model_len` times the most characters a token spans, so a
prompt that cannot fit is refused without tokenising) inline for a small body, in a child process of
`openai.body_pool` for one over 256 KiB, which answers only the verdict (a 3 MiB prompt that cannot fit costs the
event loop its reading and the hand-over, not its parsing); tokenising runs on a worker thread with the GIL
released (`Tokenizer.encode`), never on the event loop or the engine's step loop. The body pool's children start
and stop with the app's lifespan. Detokenising and stop strings run in each request's stream on
the event loop, a few tokens' decode per token (`engine.output_processor`), never on the engine's step loop.

Adapters: a request whose `model` names an adapter runs through it (`SamplingParams.lora`), batched with the
other adapters' and the base's requests; an unknown adapter is a 404 `model_not_found`, an adapter whose folder is
bad a 400 naming what is wrong, an adapter asked of an expert-parallel deployment (which serves none) a 400 saying
to serve it with one worker.

Authentication: `create_app(..., api_key=SECRET)` answers every /v1 route 401 (`invalid_api_key`) unless the
request sends `Authorization: Bearer SECRET` (checked before its body is parsed: a caller without it learns
nothing of its body); /health, /openapi.json and /docs stay open. Without `api_key` (a `matrixstack engine serve`
by hand) the engine asks for nothing.

Cancellation: a request whose client goes away is aborted in the engine, freeing its KV blocks at once —
streamed or not: the request's one watcher of its client (`openai.disconnect`) ends the wait or the stream, which
closes the engine stream.

`OpenAIServer` holds the deployment (its `Admission` and `BodyPool`) and answers the model and health routes; each
generation route is an `OpenAIServing` (SGLang's `OpenAIServingBase`): the steps both share — check the request
and turn it into the engine's `SamplingParams` (`Admission.admit`), start it, answer it streamed or whole — around
the route's own prompt step, in `ChatServing` and `CompletionServing`. `create_app(engine, model_id)` builds the
app; `serve_socket(...)` runs it in the foreground on a bound socket (`engine.launch`); `openai.server.ServerThread`
runs it on a background thread (tests, embedding). The HTTP plumbing (errors, SSE, sockets, uvicorn, the body
pool) is the `openai` floor's, which the portal shares without importing torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from matrixstack.arch import load_arch
from matrixstack.engine import TOKENIZER_FILE, weights_or_packaged
from matrixstack.engine.adapter_dir import AdapterDirectory
from matrixstack.engine.admission import Admission
from matrixstack.engine.block_manager import check_request_fits
from matrixstack.engine.config import EngineConfig, SamplingParams
from matrixstack.engine.llm_engine import AsyncEngine, LLMEngine
from matrixstack.engine.model import MoETransformer
from matrixstack.engine.model_runner import ModelRunner
from matrixstack.engine.output_processor import Delta
from matrixstack.engine.tokenizer import Tokenizer
from matrixstack.engine.weights import load_weights
from matrixstack.errors import UserError
from matrixstack.openai.body_pool import BodyPool
from matrixstack.openai.disconnect import until_disconnect
from matrixstack.openai.docs import install_docs
from matrixstack.openai.endpoints import CHAT, COMPLETION, Endpoint
from matrixstack.openai.error_doc import body_doc, document_bodies
from matrixstack.openai.errors import OpenAIError, install_openai_error_handlers, validation_error
from matrixstack.openai.guard import DEFAULT_MAX_BODY_MIB, RequestGuard, body_chunks, max_body_bytes
from matrixstack.openai.server import uvicorn_server
from matrixstack.openai.sse import SSE_DONE, EventStream, sse_event
from matrixstack.openai.types import ChatCompletionRequest, CompletionRequest, model_card, now_s, usage


class OpenAIServer:
    """One deployment behind the API: a model id over an AsyncEngine, and the routes that are not generation."""

    def __init__(self, engine: AsyncEngine, model_id: str, bodies: BodyPool):
        self.engine = engine
        self.model_id = model_id
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.config.max_model_len
        self.lora = getattr(engine.engine.runner, "lora", None)  # LoraSlots; None: expert parallel, no adapters
        self.adapters = self.lora.directory if self.lora is not None else AdapterDirectory.of(engine.engine.config)
        self.admission = Admission(
            model_id, self.max_model_len, self.tokenizer.max_token_chars, self.adapters, self.lora is not None
        )
        self.bodies = bodies
        self.created = now_s()

    def adapter_card(self, name: str) -> dict[str, Any]:
        """Return the model card of adapter `name`: parent = this deployment's model id, as vLLM lists adapters."""
        return {**model_card(name, self.created, self.max_model_len), "parent": self.model_id}

    def models(self) -> dict[str, Any]:
        """Return the answer of GET /v1/models: this deployment's model card, then its adapters' (those loaded and
        those in its adapter folders)."""
        names = sorted(set(self.adapters.names()) | set(self.lora.loaded() if self.lora is not None else []))
        cards = [model_card(self.model_id, self.created, self.max_model_len), *map(self.adapter_card, names)]
        return {"object": "list", "data": cards}

    def model(self, model: str) -> dict[str, Any]:
        """Return the answer of GET /v1/models/{model}: the model's or adapter's card; a 404 for any other."""
        if self.admission.check_model(model) is None:
            return model_card(self.model_id, self.created, self.max_model_len)
        return self.adapter_card(model)

    def health(self) -> Response:
        """Return the answer of GET /health: 200 while the engine loop thread runs, 503 when it stopped."""
        thread = getattr(self.engine, "_thread", None)
        if thread is not None and not thread.is_alive():
            return OpenAIError(503, "the engine loop has stopped", type_="server_error").response()
        return JSONResponse({"status": "ok", "model": self.model_id})


class OpenAIServing:
    """One generation route of a deployment (see the module docstring): `handle(request)` answers it;
    a subclass gives the route's `endpoint` and its prompt step, `prompt_ids(body)`."""

    endpoint: Endpoint

    def __init__(self, server: OpenAIServer):
        self.server = server

    def prompt_ids(self, body: Any) -> list[int]:
        """Return the token ids of the request's prompt; a 400 naming the prompt's field when it has none."""
        raise NotImplementedError

    async def handle(self, request: Request) -> Response:
        """Return the response to the request, streamed or whole: its body validated and checked (`Admission`; a
        large body in a child process, `openai.body_pool`), then tokenised on a worker thread and run."""
        admit = functools.partial(self.server.admission.admit, self.endpoint, "content-type" in request.headers)
        body, params = await self.server.bodies.run(admit, await body_chunks(request))
        prompt_ids = await asyncio.to_thread(self.prompt_ids, body)  # never on the event loop
        request_id, created = f"{self.endpoint.id_prefix}-{uuid.uuid4().hex}", now_s()
        first, deltas = await self.start(request, prompt_ids, params, request_id)
        if body.stream:
            return self.stream_response(first, deltas, request_id, body.model, created, body.include_usage)
        text, last = await self.collect(request, first, deltas)
        self.check_failed(last)
        usage_ = usage(last.prompt_tokens, last.completion_tokens)
        return JSONResponse(
            self.endpoint.response(request_id, body.model, created, text, last.finish_reason or "stop", usage_)
        )

    async def start(
        self, request: Request, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> tuple[Delta, AsyncIterator[Delta]]:
        """Add the request and wait for its first delta; return (first delta, the rest of the stream).

        A request that can never run raises a 400 here, before any response byte is sent; a client that goes
        away while the request waits for its turn aborts it.
        """
        deltas = self.server.engine.stream(prompt_ids, params, request_id)
        try:
            # here, not on the engine's step loop, which would first check every id of a prompt that cannot fit
            check_request_fits(len(prompt_ids), params.max_tokens, self.server.max_model_len)
            first = await until_disconnect(request, deltas.__anext__())
        except UserError as exc:
            too_long = len(prompt_ids) + (params.max_tokens or 1) > self.server.max_model_len
            code = "context_length_exceeded" if too_long else None
            param = self.endpoint.prompt_param if too_long or not prompt_ids else None
            raise OpenAIError(400, str(exc), param, code) from None
        except BaseException:
            await deltas.aclose()  # type: ignore[attr-defined]
            raise
        if first.error or first.finish_reason == "error":
            await deltas.aclose()  # type: ignore[attr-defined]
            self.check_failed(first)
        return first, deltas

    async def collect(self, request: Request, first: Delta, deltas: AsyncIterator[Delta]) -> tuple[str, Delta]:
        """Return (whole text, last delta) of a non-streamed request; abort it if the client goes away."""

        async def drain() -> tuple[str, Delta]:
            text, last = first.text, first
            if not first.finish_reason:
                async for delta in deltas:
                    text, last = text + delta.text, delta
            return text, last

        try:
            return await until_disconnect(request, drain())
        finally:
            await deltas.aclose()  # type: ignore[attr-defined]

    @staticmethod
    def check_failed(delta: Delta) -> None:
        """Raise a 500 when the engine failed the request."""
        if delta.error or delta.finish_reason == "error":
            raise OpenAIError(500, f"the engine failed this request: {delta.error or 'unknown error'}")

    def stream_response(
        self,
        first: Delta,
        deltas: AsyncIterator[Delta],
        request_id: str,
        model: str,
        created: int,
        include_usage: bool,
    ) -> EventStream:
        """Return the SSE response: the endpoint's head chunks, a chunk per delta's text and one with the finish
        reason, the usage chunk (when asked for), [DONE]."""
        endpoint = self.endpoint

        async def events() -> AsyncIterator[str]:
            try:
                for chunk in endpoint.head_chunks(request_id, model, created, include_usage):
                    yield sse_event(chunk)
                delta = first
                while True:
                    if delta.error or delta.finish_reason == "error":
                        failed = OpenAIError(500, f"the engine failed this request: {delta.error or 'unknown'}")
                        yield sse_event(failed.body()) + SSE_DONE
                        return
                    if delta.text:
                        yield sse_event(endpoint.chunk(request_id, model, created, delta.text, None, include_usage))
                    if delta.finish_reason:
                        yield sse_event(
                            endpoint.chunk(request_id, model, created, "", delta.finish_reason, include_usage)
                        )
                        break
                    delta = await deltas.__anext__()
                if include_usage:
                    used = usage(delta.prompt_tokens, delta.completion_tokens)
                    yield sse_event(endpoint.usage_chunk(request_id, model, created, used))
                yield SSE_DONE
            finally:
                await deltas.aclose()  # type: ignore[attr-defined]

        stream = events()

        async def on_close() -> None:
            with contextlib.suppress(RuntimeError):
                await stream.aclose()
            with contextlib.suppress(RuntimeError):
                await deltas.aclose()  # type: ignore[attr-defined]

        return EventStream(stream, on_close)


class ChatServing(OpenAIServing):
    """`POST /v1/chat/completions`: the messages through the tokenizer's chat template."""

    endpoint = CHAT

    def prompt_ids(self, body: ChatCompletionRequest) -> list[int]:
        """Return the token ids of the templated messages; a 400 naming `messages` when the template refuses them."""
        tokenizer = self.server.tokenizer
        try:
            prompt = tokenizer.apply_chat_template([m.as_template_message() for m in body.messages])
        except UserError as exc:
            raise OpenAIError(400, str(exc), "messages") from None
        return tokenizer.encode(prompt)  # the template starts with <|bos|> itself


class CompletionServing(OpenAIServing):
    """`POST /v1/completions`: the prompt as text (encoded after <|bos|>) or as token ids."""

    endpoint = COMPLETION

    def prompt_ids(self, body: CompletionRequest) -> list[int]:
        """Return the token ids of the one prompt."""
        prompt = body.single_prompt()
        return self.server.tokenizer.encode(prompt, add_bos=True) if isinstance(prompt, str) else list(prompt or [])


def secret_check(api_key: str | None):
    """Return the dependency that refuses a /v1 request without `Authorization: Bearer <api_key>` (401
    `invalid_api_key`); it lets everything through when `api_key` is None."""
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None or not request.url.path.startswith("/v1"):
            return
        sent = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(sent, expected):
            raise OpenAIError(401, "this engine needs its deployment's secret: 'Authorization: Bearer ...'",
                              code="invalid_api_key")  # fmt: skip

    return check


def create_app(
    engine: AsyncEngine, model_id: str, max_body_mib: float = DEFAULT_MAX_BODY_MIB, api_key: str | None = None
) -> FastAPI:
    """Return the OpenAI-compatible FastAPI app serving `engine` under the model id `model_id`, refusing request
    bodies over `max_body_mib` MiB, its /v1 routes requiring `api_key` when one is given."""
    server = OpenAIServer(engine, model_id, BodyPool(preload=(Admission.__module__,)))
    chat, completion = ChatServing(server), CompletionServing(server)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.bodies.start()
        try:
            yield
        finally:
            server.bodies.close()

    app = FastAPI(
        title="MatrixStack engine",
        description=f"OpenAI-compatible API of one MatrixStack engine deployment serving `{model_id}`.",
        version="1",
        docs_url=None,  # FastAPI's pages load their scripts from a CDN: `install_docs` serves one without
        redoc_url=None,
        dependencies=[Depends(secret_check(api_key))],
        lifespan=lifespan,
    )
    app.state.server = server
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes(max_body_mib))
    install_docs(app)

    install_openai_error_handlers(app)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        return OpenAIError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    @app.get("/health", summary="Liveness of the engine")
    def health() -> Response:
        return server.health()

    @app.get("/v1/models", summary="The deployment's model")
    def models() -> dict[str, Any]:
        return server.models()

    @app.get("/v1/models/{model:path}", summary="One model")
    def model(model: str) -> dict[str, Any]:
        return server.model(model)

    # the generation routes read and validate their bodies themselves (`OpenAIServing.handle`)
    @app.post("/v1/completions", summary="Text completion (OpenAI)", openapi_extra=body_doc(CompletionRequest))
    async def completions(request: Request) -> Response:
        return await completion.handle(request)

    @app.post("/v1/chat/completions", summary="Chat completion (OpenAI)", openapi_extra=body_doc(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await chat.handle(request)

    document_bodies(app, (CompletionRequest, ChatCompletionRequest))

    return app


def serve_socket(
    engine: AsyncEngine,
    model_id: str,
    sock: socket.socket,
    log_level: str = "info",
    max_body_mib: float = DEFAULT_MAX_BODY_MIB,
    api_key: str | None = None,
) -> None:
    """Serve the deployment on an already-bound socket until Ctrl-C (uvicorn, in the foreground), its /v1 routes
    requiring `api_key` when one is given."""
    uvicorn_server(create_app(engine, model_id, max_body_mib, api_key), log_level).run(sockets=[sock])


# ---- one deployment: model + runner + engine, as `matrixstack engine serve` builds it ----------------------------

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
RANDOM_WEIGHTS_SEED = 0


class Deployment:
    """A running engine for one arch: its AsyncEngine, tokenizer and runner; `close()` stops the loop and workers."""

    def __init__(self, engine: AsyncEngine, runner: Any, model_id: str):
        self.engine = engine
        self.runner = runner
        self.model_id = model_id

    def close(self) -> None:
        """Stop the engine loop, then the runner's workers (an expert-parallel runner has some)."""
        self.engine.close()
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_deployment(
    arch_name: str,
    config: EngineConfig,
    weights_dir: str | None = None,
    workers: int = 1,
    model_id: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    random_weights: bool = False,
    ep_options: dict[str, Any] | None = None,
) -> Deployment:
    """Return a started deployment of `arch_name` (a built-in name or YAML path) with EngineConfig `config`.

    `workers == 1` runs a ModelRunner in this process; `workers > 1` an `ExpertParallelRunner` (engine.ep) over
    that many worker processes. `random_weights` builds seeded random weights instead of loading them (tests and
    benchmarks); the tokenizer still comes from `weights_dir` or the packaged one. `ep_options` are further keyword
    arguments of the `ExpertParallelRunner` (the ray site's launcher, backend, threads). Raises UserError on bad input.
    """
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device!r} is not one of auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    arch = load_arch(arch_name)
    weights = weights_or_packaged(arch.name, weights_dir, "pass --weights DIR (its safetensors and tokenizer)")
    if not weights.is_dir():
        raise UserError(f"weights folder {weights} does not exist; pass --weights DIR")
    if not random_weights and not any(weights.glob("*.safetensors")):
        raise UserError(
            f"no *.safetensors in {weights}: the weights of {arch.name} are missing; pass --weights DIR with them "
            "(or --random-weights for a smoke test)"
        )
    tokenizer = Tokenizer.from_file(weights / TOKENIZER_FILE)
    if tokenizer.vocab_size > arch.vocab_size:
        raise UserError(
            f"the tokenizer in {weights} has {tokenizer.vocab_size} tokens but {arch.name} has a vocabulary of "
            f"{arch.vocab_size}; pass the tokenizer made for this arch"
        )
    torch_dtype = getattr(torch, DTYPES[dtype])
    if workers > 1:
        if random_weights:
            raise UserError("--random-weights runs in one process; drop it or use --workers 1")
        try:
            from matrixstack.engine.ep import ExpertParallelRunner
        except ImportError as exc:
            raise UserError(f"expert parallelism (--workers > 1) is not available in this build: {exc}") from None
        runner = ExpertParallelRunner(arch, weights, config, workers=workers, dtype=torch_dtype, **(ep_options or {}))
    else:
        torch_device = torch.device(
            "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
        )
        if random_weights:
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = MoETransformer(arch, dtype=torch_dtype)
        else:
            model = MoETransformer(arch, dtype=torch_dtype)
            load_weights(model, weights)
        runner = ModelRunner(model.to(torch_device).eval(), config)
    engine = AsyncEngine(LLMEngine(runner, tokenizer, config))
    return Deployment(engine, runner, model_id or arch.name)
