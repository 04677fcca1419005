"""`matrixstack arch ...`: list and show model architectures, import a Hugging Face config.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.table import Table

from matrixstack.arch import BYTES_PER_ELEMENT, Arch, arch_names, load_arch
from matrixstack.arch.hf_import import import_hf_config
from matrixstack.cli.common import console, err_console, print_json, user_errors_exit_2, write_out
from matrixstack.dtypes import parse_dtype
from matrixstack.units import format_bytes

arch_app = typer.Typer(
    help="Model architectures: dense / MoE, MHA / GQA / MLA; parameters, FLOPs and bytes per token.",
    no_args_is_help=True,
)

DEFAULT_CONTEXT_LEN = 4096
JSON_OPTION = typer.Option(False, "--json", help="Print JSON instead of a table.")
KV_DTYPE_OPTION = typer.Option("bf16", "--kv-dtype", help=f"KV-cache dtype: {', '.join(BYTES_PER_ELEMENT)}.")
CONTEXT_OPTION = typer.Option(
    DEFAULT_CONTEXT_LEN, "--context", min=1, help="Context length in tokens for FLOPs per token."
)


def arch_summary(arch: Arch, kv_dtype: str, context_len: int) -> dict[str, Any]:
    """Return the figures of an arch as a JSON-ready dict (the keys of `arch list/show --json`)."""
    dtype = parse_dtype(kv_dtype)
    moe = arch.ffn.moe
    return {
        "name": arch.name,
        "source": arch.source,
        "kind": "moe" if moe else "dense",
        "attention": arch.attention.kind,
        "layers": arch.layers,
        "moe_layers": arch.moe_layer_count(),
        "hidden_size": arch.hidden_size,
        "vocab_size": arch.vocab_size,
        "routed_experts": arch.routed_experts(),
        "experts_per_token": arch.experts_per_token(),
        "shared_experts": moe.shared_experts if moe else 0,
        "total_params": arch.total_params(),
        "active_params": arch.active_params(),
        "active_matmul_params": arch.active_matmul_params(),
        "mtp_params": arch.mtp_params(),
        "kv_dtype": dtype,
        "kv_bytes_per_token": arch.kv_bytes_per_token(dtype),
        "native_dtype": arch.native_dtype,
        "weight_bytes": {d: arch.weight_bytes(d) for d in BYTES_PER_ELEMENT},
        "context_len": context_len,
        "flops_per_token": {
            "prefill": arch.flops_per_token("prefill", context_len),
            "decode": arch.flops_per_token("decode", context_len),
        },
    }


def component_params(arch: Arch) -> dict[str, int]:
    """Return the per-component parameter counts `arch show` lists (per layer unless the name says so)."""
    return {
        "embedding": arch.embedding_params(),
        "lm_head (untied)": arch.lm_head_params(),
        "attention per layer": arch.attention_params_per_layer(),
        "dense FFN per dense layer": arch.dense_ffn_params(),
        "one routed expert": arch.expert_params(),
        "shared experts per MoE layer": arch.shared_expert_params(),
        "router per MoE layer": arch.router_params(),
        "MTP modules (excluded from total)": arch.mtp_params(),
    }


def _count(count: float, digits: int = 4) -> str:
    for suffix, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.{digits}g}{suffix}"
    return f"{count:.{digits}g}"


def _size(size_bytes: int) -> str:
    return f"{size_bytes / 2**30:,.1f} GiB" if size_bytes >= 2**30 else format_bytes(size_bytes)


def _experts_text(arch: Arch) -> str:
    moe = arch.ffn.moe
    if moe is None:
        return "dense"
    shared = f"+{moe.shared_experts}" if moe.shared_experts else ""
    return f"{moe.routed_experts} top{moe.experts_per_token}{shared}"


def _attention_text(arch: Arch, short: bool = False) -> str:
    att = arch.attention
    if att.mla is not None:
        return "MLA" if short else f"MLA {att.heads} heads, latent {att.mla.kv_lora_rank}+{att.mla.qk_rope_head_dim}"
    heads = f"{att.heads}/{att.kv_heads}" if short else f"{att.heads} q / {att.kv_heads} kv heads x {att.head_dim}"
    return f"{att.kind.upper()} {heads}"


def _show_table(arch: Arch, summary: dict[str, Any]) -> Table:
    moe = arch.ffn.moe
    table = Table(title=f"arch {arch.name}", show_header=False, title_justify="left")
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value")
    table.add_row("source", arch.source)
    table.add_row("layers", f"{arch.layers} ({summary['moe_layers']} MoE, {arch.dense_layer_count()} dense)")
    table.add_row("hidden size / vocab", f"{arch.hidden_size} / {arch.vocab_size}")
    table.add_row("attention", _attention_text(arch))
    experts = (
        "dense"
        if moe is None
        else f"{moe.routed_experts} routed, top-{moe.experts_per_token}, {moe.shared_experts} shared"
    )
    table.add_row("experts", experts)
    table.add_row("total params", f"{_count(summary['total_params'])} (MTP excluded)")
    table.add_row("active params", f"{_count(summary['active_params'])} (embedding and LM head included)")
    table.add_row("active matmul params", _count(summary["active_matmul_params"]))
    for component, count in component_params(arch).items():
        if count:
            table.add_row(f"  {component}", _count(count))
    table.add_row(f"KV cache per token ({summary['kv_dtype']})", format_bytes(summary["kv_bytes_per_token"]))
    for dtype, size_bytes in summary["weight_bytes"].items():
        native = " (native)" if dtype == arch.native_dtype else ""
        table.add_row(f"weights {dtype}{native}", _size(size_bytes))
    flops = summary["flops_per_token"]
    table.add_row(
        f"FLOPs per token at {summary['context_len']} ctx",
        f"prefill {_count(flops['prefill'])}, decode {_count(flops['decode'])}",
    )
    return table


@arch_app.command("list")
@user_errors_exit_2
def list_archs(as_json: bool = JSON_OPTION, kv_dtype: str = KV_DTYPE_OPTION, context_len: int = CONTEXT_OPTION) -> None:
    """List the built-in architectures with their parameter counts and KV-cache bytes per token."""
    archs = [load_arch(name) for name in arch_names()]
    summaries = [arch_summary(arch, kv_dtype, context_len) for arch in archs]
    if as_json:
        print_json(summaries)
        return
    table = Table(
        title=f"built-in archs (params; KV cache per token in {kv_dtype})", box=box.SIMPLE_HEAD, collapse_padding=True
    )
    table.add_column("name", no_wrap=True)
    for column in ("layers", "attn q/kv", "experts", "total", "active", "KV/tok"):
        table.add_column(column, no_wrap=True)
    for arch, s in zip(archs, summaries, strict=True):
        table.add_row(
            s["name"],
            str(s["layers"]),
            _attention_text(arch, short=True),
            _experts_text(arch),
            _count(s["total_params"], digits=3),
            _count(s["active_params"], digits=3),
            format_bytes(s["kv_bytes_per_token"]),
        )
    console.print(table)


@arch_app.command("show")
@user_errors_exit_2
def show_arch(
    name_or_path: str = typer.Argument(..., metavar="NAME|PATH", help="A built-in arch name or an arch YAML path."),
    as_json: bool = JSON_OPTION,
    kv_dtype: str = KV_DTYPE_OPTION,
    context_len: int = CONTEXT_OPTION,
) -> None:
    """Show one architecture: shape, parameters per component, KV-cache and weight bytes, FLOPs per token."""
    arch = load_arch(name_or_path)
    summary = arch_summary(arch, kv_dtype, context_len)
    if as_json:
        print_json({**summary, "component_params": component_params(arch), "spec": arch.model_dump()})
        return
    console.print(_show_table(arch, summary))


@arch_app.command("import")
@user_errors_exit_2
def import_arch(
    config_json: Path = typer.Argument(..., metavar="CONFIG_JSON", help="A Hugging Face config.json (local file)."),
    name: str | None = typer.Option(None, "--name", help="Arch name (default: the file's or its folder's name)."),
    out: Path | None = typer.Option(None, "--out", help="Write the YAML here instead of to stdout."),
) -> None:
    """Turn a Hugging Face config.json (deepseek_v2/v3, glm4_moe, qwen3_moe, mixtral, qwen2, qwen3, llama) into an
    arch YAML."""
    arch, text = import_hf_config(config_json, name)
    if write_out(text, out):
        err_console.print(f"wrote arch {arch.name} to {out} ({_count(arch.total_params())} params)", highlight=False)
