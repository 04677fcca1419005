"""The headers every portal response carries, the dashboard's included: no page of the portal may be framed by
another site (clickjacking), and no response is sniffed as another content type.

`secure_send(send)` wraps an ASGI `send` so that each response start carries `X-Frame-Options: DENY`,
`X-Content-Type-Options: nosniff` and a `Content-Security-Policy` with `frame-ancestors 'none'`: added to the
response's own policy when it has one (the dashboard's), else as the whole policy.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

CSP = b"content-security-policy"
FRAME_ANCESTORS = b"frame-ancestors 'none'"
FIXED = ((b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"))

Send = Callable[[dict[str, Any]], Awaitable[None]]


def with_security_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Return response `headers` with the module's headers set (the response's own values of them replaced)."""
    policy = None
    kept = []
    for name, value in headers:
        lower = name.lower()
        if lower == CSP:
            policy = value
        elif lower not in (b"x-frame-options", b"x-content-type-options"):
            kept.append((name, value))
    if policy is None:
        policy = FRAME_ANCESTORS
    elif b"frame-ancestors" not in policy:
        policy = policy.rstrip(b"; ") + b"; " + FRAME_ANCESTORS
    return [*kept, (CSP, policy), *FIXED]


def secure_send(send: Send) -> Send:
    """Return `send` with the module's headers added to each response start."""

    async def send_secured(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": with_security_headers(list(message.get("headers", ())))}
        await send(message)

    return send_secured
