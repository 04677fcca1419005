"""`matrixstack dataset add | list | show | remove`: a tenant's datasets (adapt.datasets), from the shell."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from matrixstack.cli.common import console, print_json, user_errors_exit_2
from matrixstack.cli.matrix_cmd import DbOption, JsonOption
from matrixstack.errors import UserError

if TYPE_CHECKING:  # the services pull in SQLAlchemy and the tokenizer: import them only when a command runs
    from matrixstack.adapt.datasets import DatasetInfo
    from matrixstack.matrix.database import Database

dataset_app = typer.Typer(
    help="Datasets: a tenant's JSONL of chats or prompt/completion pairs, validated line by line, stored by hash.",
    no_args_is_help=True,
)
TenantOption = typer.Option(
    None, "--tenant", help="The owner tenant; another tenant's datasets are not found (default: the operator's own)."
)


def _database(db: str | None) -> Database:
    from matrixstack.adapt.dataset_store import open_adapt_database

    return open_adapt_database(db)


def _split_text(info: DatasetInfo) -> str:
    """Return how a dataset is split, e.g. '1800 train / 200 held out (split 0.9, seed 0)'."""
    if info.split is None:
        return f"{info.train_rows} train, no held-out split"
    return f"{info.train_rows} train / {info.heldout_rows} held out (split {info.split:g}, seed {info.seed})"


@dataset_app.command("add")
@user_errors_exit_2
def dataset_add(
    file: Path | None = typer.Argument(None, help="JSONL file: chat rows {messages} or completion rows."),
    name: str | None = typer.Option(None, "--name", help="Dataset name (default with --builtin: the builtin's)."),
    builtin: str | None = typer.Option(
        None, "--builtin", help="Add a dataset shipped with MatrixStack instead of a FILE (cpython-reference-qa)."
    ),
    tenant: str | None = TenantOption,
    split: float | None = typer.Option(
        None, "--split", help="Train fraction; the rest is held out for evaluation (e.g. 0.9). Default: no split."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffle that picks the held-out rows."),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Validate every line of a JSONL file and store it (nothing is stored when any line is bad)."""
    from matrixstack.adapt.dataset_file import builtin_path, read_dataset
    from matrixstack.adapt.datasets import add_dataset

    if (file is None) == (builtin is None):
        raise UserError("give a FILE or --builtin NAME (one of them)")
    if builtin is not None:
        data = read_dataset(builtin_path(builtin), f"built-in dataset {builtin}")
    else:
        data = read_dataset(file)
    name = name or builtin
    if name is None:
        raise UserError("--name is required with a FILE: the name the dataset is used by (e.g. --name support-qa)")
    with _database(db) as database:
        info = add_dataset(database, name, data, tenant, split, seed)
    if as_json:
        print_json(info.view())
        return
    owner = f" of tenant {info.tenant}" if info.tenant else ""
    console.print(
        f"added dataset [bold]{info.name}[/]{owner}: {info.rows} {info.shape} rows, {_split_text(info)}, "
        f"sha256 {info.sha256[:12]}",
        highlight=False,
        soft_wrap=True,
    )


@dataset_app.command("list")
@user_errors_exit_2
def dataset_list(
    tenant: str | None = typer.Option(None, "--tenant", help="Only this tenant's datasets (default: every one)."),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """List datasets: a tenant's own, or every one with its owner."""
    from matrixstack.adapt.datasets import list_datasets

    with _database(db) as database:
        infos = database.read(lambda session: list_datasets(session, tenant))
    if as_json:
        print_json([info.view() for info in infos])
        return
    table = Table(title="datasets", title_justify="left")
    for column in ("name", "tenant", "shape", "rows", "train", "held out", "sha256", "created"):
        table.add_column(column, justify="right" if column in ("rows", "train", "held out") else "left")
    for info in infos:
        table.add_row(
            info.name, info.tenant or "-", info.shape, str(info.rows), str(info.train_rows), str(info.heldout_rows),
            info.sha256[:12], info.created[:19],
        )  # fmt: skip
    console.print(table)


@dataset_app.command("show")
@user_errors_exit_2
def dataset_show(
    name: str = typer.Argument(..., help="Dataset name."),
    tenant: str | None = TenantOption,
    base: str = typer.Option("tiny-moe", "--base", help="Base model whose tokenizer and chat template count tokens."),
    png: Path | None = typer.Option(None, "--png", help="Draw the histogram of tokens per row to this PNG."),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Show a dataset and its token statistics with the base model's tokenizer (rows, tokens, length percentiles)."""
    from matrixstack.adapt.dataset_stats import base_tokenizer, token_stats
    from matrixstack.adapt.datasets import find_dataset, read_stored_rows

    tokenizer = base_tokenizer(base)
    with _database(db) as database:
        info = database.read(lambda session: find_dataset(session, name, tenant))
    stats = token_stats(read_stored_rows(info.sha256, f"dataset {name!r}"), tokenizer, base)
    if png is not None:
        from matrixstack.tools.draw.adapt import draw_length_histogram

        title = f"dataset {info.name}: tokens per row ({base} tokenizer, {info.rows} rows)"
        try:
            draw_length_histogram(title, stats.prompt_lengths, stats.completion_lengths, stats.length_percentiles, png)
        except OSError as exc:
            raise UserError(f"--png {png}: cannot write it ({exc.strerror}); pick a writable path") from None
    if as_json:
        print_json({**info.view(), "tokens": stats.view()})
        return
    owner = f" of tenant {info.tenant}" if info.tenant else ""
    console.print(f"dataset [bold]{info.name}[/]{owner}", highlight=False)
    lines = {
        "shape": info.shape,
        "rows": f"{info.rows}: {_split_text(info)}",
        "file": f"sha256 {info.sha256}, {info.size_bytes} bytes, added {info.created[:19]}",
        f"tokens ({base})": f"{stats.total_tokens} = {stats.prompt_tokens} prompt + {stats.completion_tokens} "
        "completion",
        "tokens per row": ", ".join(f"{key} {value}" for key, value in stats.length_percentiles.items()),
    }
    for field, value in lines.items():
        console.print(f"  {field}: {value}", highlight=False, markup=False, soft_wrap=True)
    if png is not None:
        console.print(f"histogram drawn to {png}", highlight=False)


@dataset_app.command("remove")
@user_errors_exit_2
def dataset_remove(
    name: str = typer.Argument(..., help="Dataset name."),
    tenant: str | None = TenantOption,
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Remove a dataset (its file too, when no other dataset has the same rows)."""
    from matrixstack.adapt.datasets import remove_dataset

    with _database(db) as database:
        info = remove_dataset(database, name, tenant)
    if as_json:
        print_json(info.view())
        return
    console.print(f"removed dataset [bold]{info.name}[/]" + (f" of tenant {info.tenant}" if info.tenant else ""))
