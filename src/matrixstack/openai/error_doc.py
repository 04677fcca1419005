"""OpenAPI documentation of the errors an OpenAI-compatible server here answers, for its route declarations, and of
the bodies of routes that read their own.

- `ErrorResponse` (with `ErrorObject`): OpenAI's `{"error": {"message", "type", "param", "code"}}` body
  (`errors.error_body`) as a pydantic model, so the schema says what every error looks like;
- `error_responses(*statuses)`: a FastAPI `responses=` mapping documenting each status with that body and what it
  means (429 with its Retry-After header);
- `BEARER`: the `openapi_extra` of a route that reads its key itself, so the schema says it takes one;
- `body_doc(model)`: the `openapi_extra` of a route that reads and validates its JSON body itself (as `model`);
  `document_bodies(app, models)` puts those models' schemas in the app's schema;
- `without_validation_responses(app)`: FastAPI documents a 422 for every route with parameters, but these servers
  answer validation errors 400 (`errors.validation_error`); the app's schema then lists no 422 (nor its models).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

STATUS_MEANINGS = {
    400: "an invalid request; `param` names the field and the message how to fix it",
    401: "no API key, or one that is unknown or revoked (`invalid_api_key`)",
    403: "the route needs an admin API key (`permission_denied`)",
    404: "no such model, entry, key or deployment, or one the caller may not see (`model_not_found`, `not_found`)",
    413: "the request body is larger than the server accepts (`request_too_large`)",
    429: "the key's rate limit or token quota is reached (`rate_limit_exceeded`, `insufficient_quota`); retry after "
    "Retry-After seconds",
    502: "the backend failed or answered something unusable (`upstream_error`, `upstream_unreachable`)",
    503: "the backend's deployment is not running or is restarting; retry after Retry-After seconds",
    504: "the backend did not answer in time (`upstream_timeout`)",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
BEARER: dict[str, Any] = {"security": [{"HTTPBearer": []}]}
VALIDATION_MODELS = ("HTTPValidationError", "ValidationError")


class ErrorObject(BaseModel):
    """What went wrong: a message for people, a type, the parameter at fault and a code for programs."""

    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorObject


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Return a FastAPI `responses=` mapping: each of `statuses` (keys of STATUS_MEANINGS) answered with an
    `ErrorResponse`, described by what it means; 429 and 503 with their Retry-After header."""
    return {
        status: {"model": ErrorResponse, "description": STATUS_MEANINGS[status]}
        | ({"headers": RETRY_AFTER} if status in (429, 503) else {})
        for status in statuses
    }


def without_validation_responses(app: FastAPI) -> None:
    """Make `app.openapi()` list no 422 response nor the models only those use (see the module docstring)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in VALIDATION_MODELS:
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """Return the OpenAPI fragment of a route whose JSON body is `model`."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def document_bodies(app: FastAPI, models: tuple[type[BaseModel], ...]) -> None:
    """Make `app.openapi()` carry the schemas of `models` (and the models they use) in its components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
