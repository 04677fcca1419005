"""Start one engine deployment and serve it over the OpenAI API, its options given as data.

`python -m matrixstack.engine.launch SPEC` is how a site starts an engine process: SPEC is one `EngineLaunch` as
JSON — what to run (arch, weights, workers, device, dtype, the KV cache and batch limits), where to listen (host,
port; 0 picks a free one) and the CPU cores it may run on (`cpus`): resource requests as data, in the spirit of
Ray's placement groups. `main` binds the process to `cpus` first, before the runtime (torch) is imported, so that
torch sizes its thread pool to those cores and the expert-parallel workers it forks inherit them; this module
imports nothing heavy at the top for that reason.

`serve_engine` is the one code path behind both this entry point and `matrixstack engine serve`: it binds the
socket (a taken port fails before the model loads), builds the deployment, prints
`serving MODEL (N worker[s]) on http://HOST:PORT/v1 — Ctrl-C stops it` (the local site reads the URL from this line),
serves until SIGINT or SIGTERM, then closes the deployment and prints `stopped`. When `$MATRIXSTACK_ENGINE_SECRET`
(`ENGINE_SECRET_ENV`) is set, every /v1 call must send it as `Authorization: Bearer SECRET` (a site sets it to its
deployment's secret; by environment, never argv, which `ps` shows). A user error (bad spec, unknown
arch, limits that do not fit) is `error: ...` on stderr and exit code 2, as on the CLI.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pydantic
from pydantic import Field
from rich.console import Console

from matrixstack.errors import UserError
from matrixstack.openai.guard import DEFAULT_MAX_BODY_MIB
from matrixstack.specio import Strict, format_validation_error

ENTRY_MODULE = "matrixstack.engine.launch"  # run with `python -m`
ENGINE_SECRET_ENV = "MATRIXSTACK_ENGINE_SECRET"  # when set, the API key every /v1 call must send


class EngineLaunch(Strict):
    """One engine deployment to start: `matrixstack engine serve`'s options, as data."""

    arch: str = Field(description="built-in arch name (e.g. tiny-moe) or path to an arch YAML")
    weights: str | None = Field(None, description="folder of the *.safetensors and tokenizer.json; null: packaged")
    random_weights: bool = Field(False, description="seeded random weights instead of loading them")
    workers: int = Field(1, description="integer engine processes: 1, or N > 1 for expert parallelism over N")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, description="TCP port to listen on; 0 picks a free one")
    model_id: str | None = Field(None, description="model id clients send; null: the arch name")
    device: str = Field("auto", description="auto (CUDA when present), cpu or cuda")
    dtype: str = Field("float32", description="float32, bfloat16 or float16")
    max_model_len: int = Field(2048, description="integer tokens per sequence")
    num_kv_blocks: int = Field(1024, description="integer KV cache blocks")
    block_size: int = Field(16, description="integer tokens per KV cache block")
    max_num_seqs: int = Field(64, description="integer sequences per step")
    max_num_batched_tokens: int = Field(2048, description="integer tokens per step (chunked prefill)")
    max_loras: int = Field(4, description="integer LoRA adapters on the device at once (LRU slots)")
    max_lora_rank: int = Field(16, description="integer highest rank of a served LoRA adapter")
    lora_modules: dict[str, str] = Field(default_factory=dict, description="adapter name -> PEFT folder")
    adapters_dir: str | None = Field(None, description="folder of adapters by name; null: <data dir>/adapters")
    log_level: str = Field("info", description="uvicorn log level")
    max_body_mib: float = Field(DEFAULT_MAX_BODY_MIB, gt=0, description="largest request body in MiB (413 above)")
    cpus: list[int] | None = Field(None, description="CPU core ids the process may run on; null: any")


def engine_config(launch: EngineLaunch):
    """Return the EngineConfig of `launch`'s limits; UserError naming each option that does not fit."""
    from matrixstack.engine.config import EngineConfig

    try:
        return EngineConfig(**launch.model_dump(include=set(EngineConfig.model_fields)))
    except pydantic.ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = "--" + "-".join(str(p) for p in err["loc"]).replace("_", "-") if err["loc"] else "options"
            problems.append(f"{field}: {err['msg'].removeprefix('Value error, ')}")
        raise UserError("; ".join(problems)) from None


def serve_engine(launch: EngineLaunch, console: Console) -> None:
    """Serve `launch`'s deployment until SIGINT or SIGTERM (module docstring), printing to `console`; return None
    once it is closed. UserError when the options, the port or the deployment are wrong."""
    from matrixstack.engine.server import build_deployment, serve_socket
    from matrixstack.openai.server import bind_socket

    config = engine_config(launch)
    sock = bind_socket(launch.host, launch.port)  # before loading the model: a taken port fails fast
    try:
        deployment = build_deployment(
            launch.arch,
            config,
            weights_dir=launch.weights,
            **launch.model_dump(include={"workers", "model_id", "device", "dtype", "random_weights"}),
        )
    except BaseException:
        sock.close()
        raise
    bound_port = sock.getsockname()[1]
    console.print(
        f"serving [bold]{deployment.model_id}[/] ({launch.workers} worker{'s' if launch.workers > 1 else ''}) on "
        f"http://{launch.host}:{bound_port}/v1 — Ctrl-C stops it",
        highlight=False,
        soft_wrap=True,
    )
    try:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends serving; the deployment still closes
            serve_socket(
                deployment.engine,
                deployment.model_id,
                sock,
                log_level=launch.log_level,
                max_body_mib=launch.max_body_mib,
                api_key=os.environ.get(ENGINE_SECRET_ENV) or None,
            )
    finally:
        deployment.close()
        sock.close()
    console.print("stopped", highlight=False)


def parse_launch(text: str) -> EngineLaunch:
    """Return the EngineLaunch the JSON `text` holds; UserError naming each bad field."""
    try:
        return EngineLaunch.model_validate_json(text)
    except pydantic.ValidationError as exc:
        raise UserError(format_validation_error(exc, EngineLaunch, "engine launch spec")) from None


def main(argv: list[str] | None = None) -> None:
    """Bind this process to the spec's CPU cores, then serve its deployment (module docstring); return None when
    it stops. A user error prints `error: ...` on stderr and exits with code 2."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) != 1:
            raise UserError(f"usage: python -m {ENTRY_MODULE} SPEC (one EngineLaunch as JSON)")
        launch = parse_launch(args[0])
        if launch.cpus is not None:
            os.sched_setaffinity(0, launch.cpus)
        serve_engine(launch, Console())
    except UserError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
