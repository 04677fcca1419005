"""openai: the protocol the engine and the portal both speak — no runtime, no policy. It imports nothing of
MatrixStack above `matrixstack.errors`.

- `types`: the request bodies (pydantic models) and the shared parts of responses (`usage`, `model_card`);
- `endpoints`: the two generation routes as objects, `CHAT` and `COMPLETION` (body model, prompt step, response
  and chunk shapes);
- `errors`: OpenAI's error format, `OpenAIError`, `UpstreamError`, the app's error handlers;
- `sse`: server-sent events written (`sse_event`, `EventStream`) and read (`EventBlocks`);
- `disconnect`: a request's client going away (`until_disconnect`);
- `server`: a socket, uvicorn (with a header-read timeout), a server thread;
- `guard`: what a server checks before any route: the body's size (413) and content type (400);
- `body_pool`: child processes that parse (and check) large request bodies off the event loop;
- `docs`: `GET /docs`, the routes as a page that loads nothing from elsewhere;
- `transport`, `keepalive_client`, `httpx_client`, `client`: calling an upstream (`upstream_client(url)` gives an
  `Upstream`).
"""
