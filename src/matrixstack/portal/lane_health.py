"""What the portal answers when a lane cannot serve, and its `/health` report of each lane.

- `LaneDown(deployment, status)`: the 503 of a request whose entry routes to a deployment that is not running, in
  OpenAI's error format (code `deployment_not_running`): `restarting` (its engine exited or hung and its site is
  starting it again) and `unreachable` (registered running, but its engine does not answer: it just died and the
  site has not recorded it yet) carry `Retry-After: RETRY_AFTER_S`, since it comes back on its own; `failed` (its
  site gave up restarting it) and `stopped` do not, and say what to do.
- `health_report(session)` -> (HTTP status, body) of `GET /health`: `{"status", "deployments": {name: status}}`.
  `status` is `ok` when every registered deployment runs (or none is registered), `degraded` when some cannot serve
  but something still can, `unavailable` when nothing can: deployments are registered, none runs, and no catalog
  L0 routes elsewhere (an upstream, or a backend URL of no registered deployment). The HTTP status is 200 unless
  `unavailable` (503), so a load balancer takes a portal out only when it cannot answer any model.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from matrixstack.openai.errors import OpenAIError
from matrixstack.portal.catalog_service import list_entries
from matrixstack.portal.deployment_service import list_deployments
from matrixstack.portal.encoding import JsonResponse

RETRY_AFTER_S = 5  # a restart of tiny-moe takes seconds; a client asking again sooner only adds load
COMES_BACK = ("restarting", "unreachable")  # states a deployment leaves on its own


class LaneDown(OpenAIError):
    """A 503 for a request to a deployment that cannot serve now (see the module docstring)."""

    def __init__(self, deployment: str, status: str):
        if status == "restarting":
            message = f"deployment {deployment} is restarting (its engine exited or hung); retry in {RETRY_AFTER_S} s"
        elif status == "unreachable":
            message = f"deployment {deployment} cannot be reached (its engine may be restarting); retry shortly"
        elif status == "failed":
            message = (
                f"deployment {deployment} failed: its engine did not come back after repeated restarts; see "
                f"`matrixstack logs {deployment}`"
            )
        else:
            message = f"deployment {deployment} is not running ({status}); start it with `matrixstack up`"
        super().__init__(503, message, code="deployment_not_running")
        self.retry_after_s = RETRY_AFTER_S if status in COMES_BACK else None

    def response(self) -> JsonResponse:
        """Return the error as a JSON response, with Retry-After when the deployment comes back on its own."""
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s else None
        return JsonResponse(self.body(), status_code=503, headers=headers)


def health_report(session: Session) -> tuple[int, dict[str, Any]]:
    """Return (HTTP status, body) of the portal's /health (see the module docstring)."""
    deployments = {d["name"]: d["status"] for d in list_deployments(session)}
    running = [name for name, status in deployments.items() if status == "running"]
    elsewhere = any(
        e.backend is not None and (e.backend.deployment is None or e.backend.deployment not in deployments)
        for e in list_entries(session, admin=True)
    )
    if len(running) == len(deployments):
        status = "ok"
    elif running or elsewhere:
        status = "degraded"
    else:
        status = "unavailable"
    return (503 if status == "unavailable" else 200), {"status": status, "deployments": deployments}
