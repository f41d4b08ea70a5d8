"""The routes: thin; each hands its body to ``OpenAIServing`` and wraps what comes back.

    POST /v1/completions        POST /v1/chat/completions      GET /v1/models[/{model}]
    GET  /health (never needs a key)                           GET /metrics (Prometheus)

``build_app(backend)`` makes a FastAPI app that needs no uvicorn: mount it anywhere ASGI runs
(the Ray Serve ingress gives it a backend over deployment handles), or use ``attach(app,
backend)`` to add the routes to an app you own. With ``api_key`` every route but /health wants
``Authorization: Bearer <key>``. A body over ``max_body_bytes`` (16 MiB by default) is refused
with 413 before it is read whole. Errors of every kind leave through ``serving.error_response``,
so they all have OpenAI's shape, and ``/openapi.json`` states every response a route can give
(the 200 bodies, ``text/event-stream`` for streams, and each error status with its schema).
"""

from __future__ import annotations

import json
import secrets
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import AuthenticationError, ComposeError, ModelNotFoundError, PayloadTooLargeError
from .backend import Backend
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from .serving import ClientGone, EventStream, OpenAIServing, error_response, off_loop

MAX_BODY_BYTES = 16 * 2**20


class Health(BaseModel):
    """/health: ``ok`` (200) when every composition serves, else ``unavailable`` (503)."""

    status: Literal["ok", "unavailable"]
    models: dict[str, bool]


# -- what /openapi.json says each route answers -------------------------------------------------
ERROR_STATUSES = {
    400: "Invalid request: the error names the field (param)",
    401: "Missing or wrong API key (when the server has one)",
    404: "No such model",
    413: "Request body over the server's limit",
    429: "At capacity: retry after Retry-After seconds",
    500: "Internal error",
    503: "The composition is unavailable (engine stopped, replica down); may carry Retry-After",
    504: "The request ran past the server's request timeout",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}


def _errors(*statuses: int) -> dict:
    return {
        status: {
            "model": ErrorResponse,
            "description": ERROR_STATUSES[status],
            **({"headers": RETRY_AFTER} if status in (429, 503) else {}),
        }
        for status in statuses
    }


def _generation_responses(model: type[BaseModel]) -> dict:
    # the schema of one server-sent event (what OpenAPI 3.2 and schemathesis validate per event)
    event = {"type": "object", "required": ["data"],
             "description": "One event: data is a chunk as JSON (an error object once, on a failure), "
                            "or [DONE] last",
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}}}
    stream = {"schema": event}
    ok = {"model": model, "description": f"{model.__name__}, or with stream: true an event stream of chunks",
          "content": {"text/event-stream": stream}}
    return {200: ok, **_errors(400, 401, 404, 413, 429, 500, 503, 504)}


class EventStreamResponse(StreamingResponse):
    """SSE that always closes its body (aborting the requests), however the response ends."""

    media_type = "text/event-stream"

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def _serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


def _disconnected(request: Request):
    """A coroutine function that returns when the client has gone (the body is already read)."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


def _reply(result) -> Response:
    if isinstance(result, EventStream):
        return EventStreamResponse(
            result, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
    return Response(result.model_dump_json(), media_type="application/json")


def build_router(api_key: str | None = None) -> APIRouter:
    """The OpenAI routes; they find their ``OpenAIServing`` in ``request.app.state.serving``."""

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), api_key.encode()
        ):
            raise AuthenticationError(
                "missing or incorrect API key: send 'Authorization: Bearer <key>'"
            )

    open_routes = APIRouter()
    guarded = APIRouter(dependencies=[Depends(require_key)])

    @open_routes.get(
        "/health",
        responses={200: {"model": Health, "description": "Every composition serves"},
                   503: {"model": Health, "description": "Some composition does not serve"},
                   **_errors(500)},
    )
    async def health(request: Request) -> Response:
        alive = await _serving(request).backend.health()
        ok = all(alive.values())
        body = Health(status="ok" if ok else "unavailable", models=alive)
        return Response(body.model_dump_json(), 200 if ok else 503, media_type="application/json")

    @guarded.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"description": "Prometheus text format"}, **_errors(401, 500)},
    )
    async def metrics(request: Request) -> Response:
        body, content_type = await _serving(request).backend.metrics()
        return Response(body, media_type=content_type)

    @guarded.get("/v1/models", responses={200: {"model": ModelList, "description": "Served models"},
                                          **_errors(401, 500)})
    async def models(request: Request) -> Response:
        return _reply(_serving(request).list_models())

    @guarded.get("/v1/models/{model:path}", responses={200: {"model": ModelCard, "description": "The model"},
                                                       **_errors(401, 404, 500)})
    async def model(model: str, request: Request) -> Response:
        card = next((c for c in _serving(request).list_models().data if c.id == model), None)
        if card is None:
            raise ModelNotFoundError(f"the model {model!r} does not exist", param="model")
        return _reply(card)

    @guarded.post("/v1/completions", responses=_generation_responses(CompletionResponse))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        try:
            return _reply(await _serving(request).create_completion(body, _disconnected(request)))
        except ClientGone:
            return Response(status_code=499)

    @guarded.post("/v1/chat/completions", responses=_generation_responses(ChatCompletionResponse))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        try:
            return _reply(
                await _serving(request).create_chat_completion(body, _disconnected(request))
            )
        except ClientGone:
            return Response(status_code=499)

    @open_routes.get("/version", responses={200: {"model": VersionResponse, "description": "The server's version"}})
    async def version() -> Response:
        return _reply(VersionResponse(version=__version__))

    @guarded.post("/tokenize", responses={200: {"model": TokenizeResponse, "description": "The prompt's token ids"},
                                          **_errors(400, 401, 404, 500)})
    async def tokenize(body: TokenizeRequest, request: Request) -> Response:
        return _reply(await off_loop(_serving(request).tokenize, body))

    @guarded.post("/detokenize", responses={200: {"model": DetokenizeResponse, "description": "The ids' text"},
                                            **_errors(400, 401, 404, 500)})
    async def detokenize(body: DetokenizeRequest, request: Request) -> Response:
        return _reply(await off_loop(_serving(request).detokenize, body))

    open_routes.include_router(guarded)
    return open_routes


def _error_body(exc: BaseException) -> tuple[int, bytes, dict[str, str]]:
    status, body, headers = error_response(exc)
    # ASCII-escaped: whatever text an error quotes, rendering it can never fail in turn.
    return status, json.dumps(body.model_dump(), ensure_ascii=True, separators=(",", ":")).encode(), headers


async def _error(request: Request, exc: Exception) -> Response:
    status, body, headers = _error_body(exc)
    return Response(body, status, headers=headers, media_type="application/json")


def install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's (422 becomes 400), in OpenAI's shape."""
    for kind in (RequestValidationError, StarletteHTTPException, ComposeError, Exception):
        app.add_exception_handler(kind, _error)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is a 413, before it is read whole
    (at once from Content-Length; for a chunked body, as soon as the count passes the limit)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, size: str) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"the request body ({size}) is over the server's limit of {self.max_bytes} bytes"
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.max_bytes:
            status, body, headers = _error_body(self._too_large(f"{length} bytes"))
            await Response(body, status, headers=headers, media_type="application/json")(
                scope, receive, send
            )
            return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # FastAPI lets HTTPException through its body reader
                raise HTTPException(413, self._too_large(f"over {received} bytes").message)
            return message

        await self.app(scope, limited, send)


def _openapi_without_422(app: FastAPI) -> None:
    """FastAPI documents a 422 for every route with a body; this server answers 400 instead."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi


def attach(
    app: FastAPI, backend: Backend, api_key: str | None = None, max_body_bytes: int | None = MAX_BODY_BYTES
) -> None:
    """Add the routes, error handlers and body limit to ``app``, serving ``backend``."""
    app.state.serving = OpenAIServing(backend)
    app.include_router(build_router(api_key))
    install_error_handlers(app)
    if max_body_bytes is not None:
        app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    _openapi_without_422(app)


def build_app(
    backend: Backend, api_key: str | None = None, max_body_bytes: int | None = MAX_BODY_BYTES
) -> FastAPI:
    """A complete app; its shutdown closes the backend (stopping in-process engines)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await backend.close()

    app = FastAPI(
        title="compose-serve",
        description="Language models composed at decoding time, behind the OpenAI API.",
        lifespan=lifespan,
    )
    attach(app, backend, api_key, max_body_bytes)
    return app
