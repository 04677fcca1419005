"""Who may scrape the portal's `GET /metrics`, and what each one sees.

With a scrape token configured (`create_portal_app(metrics_token=...)`, `matrixstack portal serve --metrics-token`,
or $MATRIXSTACK_METRICS_TOKEN for any portal, `matrixstack up`'s included), /metrics wants it as
`Authorization: Bearer <token>` — what Prometheus sends for a scrape config with

    authorization:
      type: Bearer
      credentials_file: /etc/prometheus/matrixstack-token   # or credentials: <token>

— or an admin API key: without either 401 `invalid_api_key`, with a tenant's key 403 `permission_denied`.

Without a token configured anyone may scrape, but only an admin key sees every entry's name: everyone else gets the
series of private entries (an entry with an owner, or a name no longer in the catalog) summed under `entry` and
`deployment` `(private)` (`PortalMetrics.render`), so one tenant's entries and traffic are not another's to read.
"""

from __future__ import annotations

import hmac
import logging
import os

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from matrixstack.portal.catalog_service import list_entries
from matrixstack.portal.gateway import UNKNOWN_ENTRY, Gateway, bearer_token, openai_error

LOG = logging.getLogger("matrixstack.portal")
METRICS_TOKEN_ENV = "MATRIXSTACK_METRICS_TOKEN"


def scrape_token(given: str | None = None) -> str | None:
    """Return the scrape token: `given`, else $MATRIXSTACK_METRICS_TOKEN, else None (no token: see the module
    docstring)."""
    return given or os.environ.get(METRICS_TOKEN_ENV) or None


async def _sees_every_name(request: Request, gateway: Gateway, token: str | None) -> bool:
    """Return whether the scraper may see every entry's name; 401/403 when a token is configured and it has
    neither the token nor an admin key (or when it sent a key that is not one)."""
    authorization = request.headers.get("authorization")
    given = bearer_token(authorization)
    if token is not None and given is not None and hmac.compare_digest(given.encode(), token.encode()):
        return True
    if given is None and token is None:
        return False
    if given is None:
        raise openai_error(401, "/metrics needs the scrape token or an admin API key as 'Authorization: Bearer ...'",
                           "invalid_api_key")  # fmt: skip
    key = await gateway.authenticate(authorization)  # 401 without a key, or with one that is not
    if token is not None and not key.is_admin:
        raise openai_error(403, "/metrics needs the scrape token or an admin API key", "permission_denied")
    return key.is_admin


async def metrics_response(request: Request, gateway: Gateway, token: str | None) -> Response:
    """Return the answer to a scrape of /metrics by `request` (see the module docstring)."""
    every_name = await _sees_every_name(request, gateway, token)
    metrics = gateway.metrics
    try:
        await run_in_threadpool(metrics.refresh_utilisation)
    except Exception:  # the matrix tables unreadable for a moment: serve the other metrics anyway
        LOG.warning("reading matrix utilisation failed", exc_info=True)
    named = None
    if not every_name:
        public = await gateway.read(list_entries)  # the entries of no tenant
        named = {entry.name for entry in public} | {UNKNOWN_ENTRY}
    body, content_type = metrics.render(named)
    return Response(body, media_type=content_type)
