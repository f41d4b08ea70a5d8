"""The routes: thin; each hands its body to ``OpenAIServing`` and wraps what comes back.

    POST /v1/completions        POST /v1/chat/completions      GET /v1/models[/{model}]
    GET  /health (never needs a key)                           GET /metrics (Prometheus)

``build_app(backend)`` makes a FastAPI app that needs no uvicorn: mount it anywhere ASGI runs
(the Ray Serve ingress of a later issue gives it a backend over deployment handles), or use
``attach(app, backend)`` to add the routes to an app you own. With ``api_key`` every route but
/health wants ``Authorization: Bearer <key>``. Errors of every kind leave through
``serving.error_response``, so they all have OpenAI's shape.
"""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ComposeError, ModelNotFoundError
from .backend import Backend
from .protocol import ChatCompletionRequest, CompletionRequest
from .serving import AuthenticationError, ClientGone, EventStream, OpenAIServing, error_response


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

    @open_routes.get("/health")
    async def health(request: Request) -> JSONResponse:
        alive = await _serving(request).backend.health()
        ok = all(alive.values())
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "models": alive}, 200 if ok else 503
        )

    @guarded.get("/metrics")
    async def metrics(request: Request) -> Response:
        body, content_type = await _serving(request).backend.metrics()
        return Response(body, media_type=content_type)

    @guarded.get("/v1/models")
    async def models(request: Request) -> Response:
        return _reply(_serving(request).list_models())

    @guarded.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> Response:
        card = next((c for c in _serving(request).list_models().data if c.id == model), None)
        if card is None:
            raise ModelNotFoundError(f"the model {model!r} does not exist", param="model")
        return _reply(card)

    @guarded.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        try:
            return _reply(await _serving(request).create_completion(body, _disconnected(request)))
        except ClientGone:
            return Response(status_code=499)

    @guarded.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        try:
            return _reply(
                await _serving(request).create_chat_completion(body, _disconnected(request))
            )
        except ClientGone:
            return Response(status_code=499)

    open_routes.include_router(guarded)
    return open_routes


async def _error(request: Request, exc: Exception) -> JSONResponse:
    status, body, headers = error_response(exc)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's (422 becomes 400), in OpenAI's shape."""
    for kind in (RequestValidationError, StarletteHTTPException, ComposeError, Exception):
        app.add_exception_handler(kind, _error)


def attach(app: FastAPI, backend: Backend, api_key: str | None = None) -> None:
    """Add the routes and error handlers to ``app``, serving ``backend``."""
    app.state.serving = OpenAIServing(backend)
    app.include_router(build_router(api_key))
    install_error_handlers(app)


def build_app(backend: Backend, api_key: str | None = None) -> FastAPI:
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
    attach(app, backend, api_key)
    return app
