"""`matrixstack stack render k8s SHAPE --out DIR`: write a shape's Kubernetes manifests (Volcano HyperNodes,
PodGroups, engine StatefulSets, the portal); the work is `stack.k8s`'s."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer

from matrixstack.cli.common import console, user_errors_exit_2

stack_app = typer.Typer(help="Sites of a shape: render it for a site that is not run from here.", no_args_is_help=True)
render_app = typer.Typer(help="Render a shape as a site's files.", no_args_is_help=True)
stack_app.add_typer(render_app, name="render")


@stack_app.callback()
def _stack() -> None:
    """Sites of a shape (a group, so that `render` stays a sub-command)."""


@render_app.callback()
def _render() -> None:
    """Render a shape for a site (a group, so that `k8s` stays a sub-command while it is the only one)."""


@render_app.command("k8s")
@user_errors_exit_2
def render_k8s_cmd(
    shape: Path = typer.Argument(..., help="shape YAML file"),
    out: Path = typer.Option(..., "--out", help="folder to write the manifests to (created when missing)"),
    replace: bool = typer.Option(False, "--replace", help="overwrite the manifests of an earlier render in --out"),
) -> None:
    """Write SHAPE's Kubernetes manifests to --out and print what was written, a line per kind.

    Refuses to touch an --out that holds an earlier render unless --replace (which removes that render's files
    first, so that a deployment dropped from the shape leaves no manifest behind).
    """
    import yaml

    from matrixstack.datakey import KEY_ENV
    from matrixstack.stack.k8s import render_k8s
    from matrixstack.stack.k8s_topology import NODE_LABEL, dns_label
    from matrixstack.stack.k8s_workloads import DATA_KEY_SECRET, ENGINE_SECRET, UPSTREAM_SECRET
    from matrixstack.stack.spec import load_shape

    spec = load_shape(shape)
    written = render_k8s(spec, out, replace=replace)
    kinds: Counter[str] = Counter()
    for path in written:
        objects = [o for o in yaml.safe_load_all(path.read_text()) if o]
        kinds.update(o["kind"] for o in objects)
        console.print(f"wrote {path} ({len(objects)} object{'s' if len(objects) != 1 else ''})", highlight=False)
    for kind, count in kinds.items():
        console.print(f"  {kind}: {count}", highlight=False)
    secrets = sorted({e.backend.api_key_env for e in spec.catalog if e.backend and e.backend.api_key_env})
    console.print("next:", highlight=False)
    console.print(
        f"  kubectl label node NODE {NODE_LABEL}=<pool>-<fabric index>-<node> (each node)",
        highlight=False,
        soft_wrap=True,
    )
    create = f"  kubectl -n {spec.site.namespace} create secret generic"
    engines = " ".join(
        f'--from-literal={dns_label(d.name)}="$(matrixstack deployment secret {d.name})"' for d in spec.deployments
    )
    lines = [
        f"  kubectl apply -f {out / written[0].name}",
        f"  export {KEY_ENV}=... (32 random bytes in urlsafe base64; keep it: it unseals the portal's secrets)",
        f'{create} {DATA_KEY_SECRET} --from-literal={KEY_ENV}="${KEY_ENV}"',
        f"{create} {ENGINE_SECRET} {engines}",
    ]
    if secrets:
        lines.append(f"{create} {UPSTREAM_SECRET} {' '.join(f'--from-literal={v}=...' for v in secrets)}")
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"  kubectl apply -f {out}", highlight=False, soft_wrap=True)
