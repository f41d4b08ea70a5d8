"""The OpenAI ingress on Ray Serve: the same FastAPI routes as the in-process server, over handles.

``RayBackend`` implements the HTTP layer's Backend contract (``compose_serve.http.backend``) by
routing on ``model`` to the composition deployment's handle and streaming through it. Tokenizers
(for chat templates and token strings) are loaded here, which is cheap; the models are not.
A replica that dies mid-stream ends that stream with EngineDeadError (one SSE error event); Ray
restarts the replica and later requests succeed once it is healthy.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from compose_serve.config import parse_composition
from compose_serve.engine.sequence import Request, TokenEvent
from compose_serve.errors import ComposeError, EngineDeadError, ModelNotFoundError
from compose_serve.http.app import build_app
from compose_serve.http.backend import CompositionInfo
from compose_serve.members.hf import load_tokenizer


class RayBackend:
    """Backend over composition deployment handles, keyed by composition name."""

    def __init__(self, handles: dict[str, Any], specs: dict[str, dict], infos: list[dict]) -> None:
        self.handles = handles
        self.specs = {name: parse_composition(spec) for name, spec in specs.items()}
        self._tokenizers = {name: load_tokenizer(s.members[0].model) for name, s in self.specs.items()}
        self._infos = infos
        self.registry = CollectorRegistry()
        self.requests = Counter("compose_serve_requests", "Requests by composition and outcome",
                                ["model", "outcome"], registry=self.registry)
        self.ttft = Histogram("compose_serve_time_to_first_token_seconds", "Time to first token",
                              ["model"], registry=self.registry)
        self.tokens = Counter("compose_serve_generation_tokens", "Generated tokens", ["model"],
                              registry=self.registry)

    def compositions(self) -> list[CompositionInfo]:
        return [CompositionInfo(i["name"], i["method"], tuple(i["members"]), i["max_context"]) for i in self._infos]

    def tokenizer(self, name: str) -> Any:
        self._handle(name)
        return self._tokenizers[name]

    def _handle(self, name: str):
        try:
            return self.handles[name]
        except KeyError:
            raise ModelNotFoundError(f"no composition named {name!r}", param="model") from None

    async def generate(self, name: str, request: Request) -> AsyncIterator[TokenEvent]:
        """Admit through the handle; a refusal is raised here, before any event."""
        started = time.perf_counter()
        stream = self._handle(name).options(stream=True).generate.remote(request)
        try:
            first = await stream.__anext__()
        except ComposeError:
            raise
        except Exception as exc:  # the replica is gone or failed
            self.requests.labels(name, "failed").inc()
            raise EngineDeadError(f"composition {name!r} is unavailable: {type(exc).__name__}") from None
        if isinstance(first, ComposeError):
            self.requests.labels(name, "rejected").inc()
            raise first
        self.ttft.labels(name).observe(time.perf_counter() - started)
        return self._relay(name, first, stream)

    async def _relay(self, name: str, first, stream) -> AsyncIterator[TokenEvent]:
        item, outcome = first, "failed"
        try:
            while True:
                if isinstance(item, ComposeError):
                    raise item
                self.tokens.labels(name).inc()
                yield item
                if item.finish_reason is not None:
                    outcome = item.finish_reason
                    return
                try:
                    item = await stream.__anext__()
                except StopAsyncIteration:
                    outcome = "stop"
                    return
                except Exception as exc:  # the replica died mid-stream
                    raise EngineDeadError(f"composition {name!r} failed mid-stream: {type(exc).__name__}") from None
        finally:
            stream.cancel()  # no-op when finished; aborts the request in the replica otherwise
            self.requests.labels(name, outcome).inc()

    async def health(self) -> dict[str, bool]:
        out = {}
        for name, handle in self.handles.items():
            try:
                out[name] = (await handle.stats.remote())["alive"]
            except Exception:
                out[name] = False
        return out

    async def metrics(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    async def close(self) -> None:
        """Nothing to stop here: Ray Serve owns the replicas."""


class OpenAIIngress:
    """The ingress deployment: FastAPI routes built at replica start (``__serve_build_asgi_app__``)."""

    async def __init__(self, handles: dict[str, Any], specs: dict[str, dict], api_key: str | None = None) -> None:
        infos = [await handles[name].info.remote() for name in handles]
        self.backend = RayBackend(handles, specs, infos)
        self.api_key = api_key

    def __serve_build_asgi_app__(self):
        return build_app(self.backend, api_key=self.api_key)
