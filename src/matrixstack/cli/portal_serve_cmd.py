"""`matrixstack portal serve`: run the unified portal (OpenAI-compatible API, admin API, metrics, dashboard).

The request log (one JSON line per request) goes to stdout; the banner and uvicorn's own messages to stderr.
`--metrics-token` (or $MATRIXSTACK_METRICS_TOKEN) is the token /metrics asks for (portal/scrape.py).
"""

from __future__ import annotations

import typer

from matrixstack.cli.common import err_console, user_errors_exit_2
from matrixstack.cli.matrix_cmd import DbOption

portal_app = typer.Typer(
    help="The unified portal: the OpenAI-compatible API over the catalog, the admin API, metrics and the dashboard.",
    no_args_is_help=True,
)


@portal_app.callback()
def _portal() -> None:
    """The unified portal (a group, so that `serve` stays a sub-command even while it is the only one)."""


@portal_app.command("serve")
@user_errors_exit_2
def serve(
    db: str | None = DbOption,
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="TCP port to listen on (0: a free one)"),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's log level (the request log is always on)"),
    text_logs: bool = typer.Option(False, "--text-logs", help="request log lines as key=value instead of JSON"),
    metrics_token: str | None = typer.Option(
        None,
        "--metrics-token",
        envvar="MATRIXSTACK_METRICS_TOKEN",
        show_envvar=True,
        help="the token /metrics asks for as 'Authorization: Bearer TOKEN' (Prometheus: authorization.credentials); "
        "without one, /metrics names no private entry except to an admin key",
    ),
) -> None:
    """Serve the portal on HOST:PORT until Ctrl-C."""
    from matrixstack.openai.server import bind_socket
    from matrixstack.portal.app import create_portal_app
    from matrixstack.portal.server import log_to_stdout, serve_socket

    sock = bind_socket(host, port)  # a taken port fails fast
    try:
        app = create_portal_app(db, log_json=not text_logs, metrics_token=metrics_token)
    except BaseException:
        sock.close()
        raise
    log_handler = log_to_stdout()
    bound_port = sock.getsockname()[1]
    err_console.print(
        f"portal on http://{host}:{bound_port}/v1 (dashboard: http://{host}:{bound_port}/dashboard) — Ctrl-C stops it",
        highlight=False,
        soft_wrap=True,
    )
    try:
        serve_socket(app, sock, log_level)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        log_handler.stop()
    err_console.print("stopped", highlight=False)
