"""`matrixstack up`: apply a shape, start its engines on a site, and serve the portal until Ctrl-C or SIGTERM.

The steps, in order: bind the portal's port (a taken port fails before anything changes), open the site, apply
the shape to the database (`stack.apply`: pools, slices, plans, catalog, tenants; idempotent), print the keys it
created (only now: the database keeps their hashes), start the engines (the builtin engine or vLLM, as each
deployment says), record them running, then serve the portal in the foreground and print where it is and what
to try. While it serves, the site restarts an engine that crashes or hangs and each change is recorded
(`stack.apply.record_status`: `restarting`, then `running` at its URL, or `failed` once the site gives up), so
the portal answers 503 (with Retry-After while it restarts) for that deployment while it is down and `matrixstack
deployment list`, the portal's /health and the dashboard show it. Each engine requires its deployment's secret,
which the portal sends; each dies with this process, even when it is killed with SIGKILL, and what a killed run
left behind is stopped by the next (`stack.leftovers`). SIGINT or SIGTERM
stops the portal, then every engine the site started, then records them stopped; a signal while the engines
start does the same. A second run on the same database finds everything in place: no new key, the old ones
work, usage and slices are kept.

Output: the keys, the URLs, the "try next" commands and the request log (one JSON line per request) go to
stdout; the engines' start-up progress to stderr.
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from matrixstack.arch.registry import CONFIG_FILE
from matrixstack.errors import UserError
from matrixstack.stack.apply import NewKey, apply_shape, device_kind, record_started, record_status, record_stopped
from matrixstack.stack.export import default_shape
from matrixstack.stack.site import ENGINE_DEVICE_KINDS
from matrixstack.stack.sites import open_site
from matrixstack.stack.spec import WEIGHTS_PACKAGED, WEIGHTS_RANDOM, Shape, SiteShape, load_shape
from matrixstack.stack.validate import shape_fabric

RUNNABLE_SITES = ("local", "ray")
TRY_PROMPT = "What is MatrixStack?"
READY_LINE = "ready: Ctrl-C stops the portal and every engine it started"
PORTAL_LOG_LEVEL = "warning"  # uvicorn's own lines; the request log is always on


def choose_shape(
    path: Path | str | None, site_kind: str | None = None, host: str | None = None, port: int | None = None
) -> tuple[Shape, SiteShape]:
    """Return the shape at `path` (None: the embedded default) and the site to run it on: the shape's own with the
    site kind and portal address overridden where given (the shape applied keeps its own, so an export does not
    carry a one-off `--port 0`); UserError (SpecError) for a bad file or a site `up` cannot run."""
    shape = default_shape() if path is None else load_shape(path)
    changes: dict[str, object] = {}
    if site_kind is not None:
        if site_kind not in RUNNABLE_SITES:
            raise UserError(f"--site {site_kind!r}: `matrixstack up` runs a local or ray site; use --site local|ray")
        changes["kind"] = site_kind
    if host is not None:
        changes["portal_host"] = host
    if port is not None:
        changes["portal_port"] = port
    return shape, shape.site.model_copy(update=changes)


def check_runnable(shape: Shape, site_kind: str = "local") -> None:
    """Return None when a `site_kind` (local or ray) site can run every deployment of `shape`; else UserError, raised
    before anything is applied (so a refused shape creates no keys, slices or entries): devices other than CPU
    cores or CUDA GPUs, and on a local site a vllm deployment whose weights folder is not a Hugging Face folder
    here (its other models are checked with the shape: `stack.validate`)."""
    kind = device_kind(shape_fabric(shape))
    for d in shape.deployments:
        if kind not in ENGINE_DEVICE_KINDS:
            raise UserError(
                f"deployment {d.name} asks for {kind} devices; local and ray sites run engines on CPU cores or CUDA "
                "GPUs. Render the shape for k8s (`matrixstack stack render k8s SHAPE --out DIR`) or use a local "
                "fabric"
            )
        if site_kind == "local" and d.engine == "vllm" and d.weights not in (WEIGHTS_PACKAGED, WEIGHTS_RANDOM):
            folder = Path(d.weights).expanduser()
            if not (folder / CONFIG_FILE).is_file():
                raise UserError(
                    f"deployment {d.name}: weights: {folder} is not a Hugging Face folder on this machine (no "
                    f"{CONFIG_FILE}); vLLM loads config.json + safetensors + tokenizer: write one with `matrixstack "
                    "model export ARCH --format hf --out DIR`, or fill it on a machine with internet"
                )


def showcase_entry(shape: Shape) -> str | None:
    """Return the catalog entry the "try next" commands call: the first L2, else L1, else L0 (None: no catalog)."""
    for level in ("L2", "L1", "L0"):
        for entry in shape.catalog:
            if entry.level == level:
                return entry.name
    return None


def client_base_url(host: str, port: int) -> str:
    """Return the OpenAI base URL a client on this machine uses for a portal listening on host:port."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"


def key_lines(keys: list[NewKey]) -> list[str]:
    """Return one line per newly created key: tenant, key name, the key itself, and that it is shown once."""
    return [
        f"new key for tenant {k.tenant} ({k.name}{', admin' if k.admin else ''}): {k.plaintext}  shown once: store it"
        for k in keys
    ]


def try_next(base_url: str, entry: str, key: str | None) -> list[str]:
    """Return a shell `curl` command and an `openai` Python snippet (as a shell here-document) that call `entry`
    through the portal at `base_url` with `key`, or with $MATRIXSTACK_API_KEY when `key` is None. The snippet runs
    under this Python, which has MatrixStack's packages (openai comes with its test extra, as `make` installs it)."""
    body = f'{{"model": "{entry}", "messages": [{{"role": "user", "content": "{TRY_PROMPT}"}}]}}'
    bearer = f"Bearer {key}" if key else "Bearer $MATRIXSTACK_API_KEY"
    api_key = repr(key) if key else 'os.environ["MATRIXSTACK_API_KEY"]'
    return [
        f"curl -sS {base_url}/chat/completions \\",
        f'  -H "Authorization: {bearer}" -H "Content-Type: application/json" \\',
        f"  -d {shlex.quote(body)}",
        f"{shlex.quote(sys.executable)} - <<'EOF'",
        "import os  # needs the openai package: pip install openai",
        "from openai import OpenAI",
        f"client = OpenAI(base_url={base_url!r}, api_key={api_key})",
        f'messages = [{{"role": "user", "content": "{TRY_PROMPT}"}}]',
        f"reply = client.chat.completions.create(model={entry!r}, messages=messages)",
        "print(reply.choices[0].message.content)",
        "EOF",
    ]


def ready_lines(shape: Shape, base_url: str, keys: list[NewKey]) -> list[str]:
    """Return what `up` prints once the portal serves: its URL, the dashboard's (with the admin key just created,
    else how to make one) and the "try next" commands against the showcase entry."""
    root = base_url.removesuffix("/v1")
    admin = next((k for k in keys if k.admin), None)
    user = next((k for k in keys if not k.admin), None)
    lines = [f"portal: {base_url}"]
    if admin is not None:
        lines.append(f"dashboard: {root}/dashboard#key={admin.plaintext}")
    else:
        lines.append(
            f"dashboard: {root}/dashboard (open it with an admin key: `matrixstack key create --tenant admin --admin`, "
            f"then {root}/dashboard#key=KEY)"
        )
    entry = showcase_entry(shape)
    if entry is None:
        lines.append("the catalog is empty: add entries to the shape, or `matrixstack catalog add`")
        return lines
    if user is None:
        tenant = next((t.name for t in shape.tenants if not all(k.admin for k in t.keys)), "default")
        lines.append(
            f"try next (with a key in $MATRIXSTACK_API_KEY; make one with `matrixstack key create --tenant {tenant}`):"
        )
    else:
        lines.append(f"try next (as tenant {user.tenant}):")
    return [*lines, *try_next(base_url, entry, user.plaintext if user else None)]


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _interrupt(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def _stop_signals() -> Iterator[Callable[[], None]]:
    """Within the block SIGTERM raises KeyboardInterrupt, as Ctrl-C does; yield a function that makes both signals
    ignored from then on (so that the tear-down runs to its end). The old handlers come back on the way out.
    Signal handlers belong to the main thread: elsewhere this changes nothing."""
    if not _on_main_thread():
        yield lambda: None
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _interrupt)

    def ignore() -> None:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)

    try:
        yield ignore
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _write(out: TextIO, lines: list[str]) -> None:
    out.write("".join(f"{line}\n" for line in lines))
    out.flush()


def run_up(shape: Shape, db_url: str | None = None, out: TextIO | None = None, site: SiteShape | None = None) -> None:
    """Run `shape` on `site` (default: its own; see the module docstring) until SIGINT or SIGTERM; return once
    everything it started is stopped. UserError when the port is taken, a deployment cannot run on a local or ray
    site, the shape cannot be applied or an engine does not come up."""
    from matrixstack.openai.server import bind_socket
    from matrixstack.portal.app import create_portal_app
    from matrixstack.portal.server import log_to_stdout, serve_socket

    out = out or sys.stdout
    run_site = site or shape.site
    check_runnable(shape, run_site.kind)
    sock = bind_socket(run_site.portal_host, run_site.portal_port)
    base_url = client_base_url(run_site.portal_host, sock.getsockname()[1])
    site = None
    applied = False
    log_handler = None
    with _stop_signals() as ignore_signals:
        try:
            site = open_site(run_site)
            result = apply_shape(shape, db_url)
            applied = True
            for warning in result.warnings:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
            _write(out, key_lines(result.new_keys))
            started = site.start(
                result.launches, on_status=lambda name, status, url: record_status(shape, name, status, url, db_url)
            )
            record_started(shape, started, db_url)
            app = create_portal_app(db_url)
            log_handler = log_to_stdout(out)
            plans = {p.name: p.summary() for p in result.planned}
            running = [f"deployment {s.name}: {plans[s.name]}, engine at {s.url}" for s in started]
            _write(out, [*running, *ready_lines(shape, base_url, result.new_keys), READY_LINE])
            serve_socket(app, sock, PORTAL_LOG_LEVEL)
        except KeyboardInterrupt:
            pass
        finally:
            ignore_signals()
            sock.close()
            if site is not None:
                site.stop()
            if applied:
                record_stopped(shape, db_url)
            if log_handler is not None:
                log_handler.stop()
    _write(out, ["stopped"])
