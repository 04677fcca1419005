"""`matrixstack model ...`: Hugging Face model folders as models: export an arch with its weights as one, register
a local one under a name (its arch imported from its config.json), list, show and remove them. Imports no torch."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from matrixstack.arch import arch_names, load_arch
from matrixstack.arch.registry import RegisteredModel, model_names, read_folder, register_model, registered_model
from matrixstack.arch.registry import remove_model as remove_registered
from matrixstack.cli.common import console, err_console, print_json, user_errors_exit_2
from matrixstack.engine import weights_or_packaged
from matrixstack.engine.hf_export import export_hf_folder
from matrixstack.engine.hf_folder import lanes_for
from matrixstack.errors import UserError

model_app = typer.Typer(
    help="Models as Hugging Face folders (config.json, *.safetensors, tokenizer): export, register, list.",
    no_args_is_help=True,
)

FORMATS = ("hf",)
JSON_OPTION = typer.Option(False, "--json", help="Print JSON instead of a table.")


@model_app.command("export")
@user_errors_exit_2
def export(
    arch_name: str = typer.Argument(..., metavar="ARCH", help="An arch with weights (tiny-moe ships its own)."),
    weights: Path | None = typer.Option(
        None, "--weights", help="folder of the *.safetensors and tokenizer.json (default: the packaged weights)"
    ),
    fmt: str = typer.Option(..., "--format", help="hf: a Hugging Face folder transformers and vLLM load"),
    out: Path = typer.Option(..., "--out", help="the folder to write (created; must be empty unless --force)"),
    force: bool = typer.Option(False, "--force", help="write into --out even when it holds files"),
) -> None:
    """Write ARCH and its weights as a Hugging Face folder: config.json, safetensors and tokenizer files."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    arch = load_arch(arch_name)
    weights_dir = weights_or_packaged(arch.name, weights, "pass --weights DIR (its safetensors and tokenizer)")
    written = export_hf_folder(arch, weights_dir, out, force)
    err_console.print(f"wrote {arch.name} to {out}: {', '.join(p.name for p in written)}", highlight=False)


@model_app.command("add")
@user_errors_exit_2
def add(
    folder: Path = typer.Argument(..., metavar="DIR", help="a local Hugging Face folder: config.json, *.safetensors"),
    name: str = typer.Option(..., "--name", help="the name to use it by (plan, compare, engine serve, shapes)"),
) -> None:
    """Register a local Hugging Face folder under NAME, its arch imported from its config.json."""
    if name in arch_names():
        raise UserError(f"--name {name!r} is a built-in arch's name; pick another")
    config, arch_yaml = read_folder(folder, name)
    lanes, blockers = lanes_for(config, folder)
    model = register_model(name, folder, config, arch_yaml, lanes, blockers)
    console.print(f"registered model {model.name} ({model.architecture}): lanes {', '.join(model.lanes)}")
    for reason in model.engine_blockers:
        console.print(f"  not the builtin engine: {reason}", highlight=False)


def _model_or_exit(name: str) -> RegisteredModel:
    model = registered_model(name)
    if model is None:
        known = ", ".join(model_names()) or "none yet"
        raise UserError(f"no registered model {name!r}; registered: {known} (matrixstack model add DIR --name N)")
    return model


@model_app.command("list")
@user_errors_exit_2
def list_models(as_json: bool = JSON_OPTION) -> None:
    """List the registered models: name, architecture, lanes that serve them, folder."""
    models = [_model_or_exit(name) for name in model_names()]
    if as_json:
        print_json([m.model_dump() for m in models])
        return
    table = Table(title="registered models")
    for column in ("name", "architecture", "lanes", "folder"):
        table.add_column(column)
    for m in models:
        table.add_row(m.name, m.architecture, ", ".join(m.lanes), m.folder)
    console.print(table)


@model_app.command("show")
@user_errors_exit_2
def show(name: str = typer.Argument(..., help="a registered model"), as_json: bool = JSON_OPTION) -> None:
    """Show one registered model: its folder, architecture, lanes, and why the builtin engine cannot run it."""
    model = _model_or_exit(name)
    arch = load_arch(name)
    if as_json:
        print_json({**model.model_dump(), "arch": arch.model_dump()})
        return
    table = Table(title=f"model {model.name}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("folder", model.folder)
    table.add_row("architecture", f"{model.architecture} (model_type {model.model_type})")
    table.add_row("arch", f"{arch.attention.kind}, {arch.layers} layers, {arch.total_params():,} params")
    table.add_row("lanes", ", ".join(model.lanes))
    for reason in model.engine_blockers:
        table.add_row("not the builtin engine", reason)
    console.print(table)


@model_app.command("remove")
@user_errors_exit_2
def remove(name: str = typer.Argument(..., help="a registered model")) -> None:
    """Forget a registered model (its folder is left as it is)."""
    model = _model_or_exit(name)
    remove_registered(model.name)
    console.print(f"removed model {model.name} (its folder {model.folder} is untouched)")
