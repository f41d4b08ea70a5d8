"""The OpenAI ingress on Ray Serve: the same FastAPI routes as the in-process server, over handles.

``RayBackend`` implements the HTTP layer's Backend contract (``compose_serve.http.backend``) by
routing on ``model`` to the composition deployment's handle and streaming through it. Tokenizers
(for chat templates and token strings) and each composition's method (for the admission checks,
``check_request``) are loaded here, which is cheap; the models are not.

Every remote call is bounded in time, so every request gets an answer while a replica is down:
- a request is admitted once its replica acknowledges it (``ADMITTED``, sent as soon as the
  engine has queued it); no acknowledgement within ``ADMIT_TIMEOUT_S`` is a 503;
- a replica that dies mid-stream ends each of its streams with one EngineDeadError (one SSE
  error event); the composition is then marked down: new requests get 503 with Retry-After at
  once, and a probe clears the mark as soon as the restarted replica answers;
- ``health()`` asks every composition with a ``HEALTH_TIMEOUT_S`` timeout: /health answers
  within a second in every state (503 while a replica is down).
Metrics are the in-process server's (``ServingMetrics``, same names and labels, with the vLLM
aliases), recorded here at the ingress: each request's record is built from the events relayed
(under Ray a request counts as running from its first token, as it is admitted in the step that
produces it), and the gauges count the requests in flight through this ingress.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from compose_serve.config import parse_composition
from compose_serve.engine.admission import check_request
from compose_serve.engine.scheduler import RequestRecord, SchedulerStats
from compose_serve.engine.sequence import Request, TokenEvent
from compose_serve.errors import (
    ComposeError,
    EngineDeadError,
    ModelNotFoundError,
    QueueFullError,
    RequestTimeoutError,
)
from compose_serve.http.app import MAX_BODY_BYTES, build_app
from compose_serve.http.backend import CompositionInfo
from compose_serve.http.metrics import ServingMetrics
from compose_serve.members.hf import load_tokenizer
from compose_serve.methods import build_method

from .composition import ADMITTED

logger = logging.getLogger(__name__)

ADMIT_TIMEOUT_S = 5.0  # a live replica acknowledges at once, however long its queue
HEALTH_TIMEOUT_S = 0.7  # /health answers within a second
PROBE_EVERY_S = 0.5  # while a composition is down: how often to ask whether it is back
RETRY_AFTER_S = 5.0  # told to clients while a composition is down


class _InFlight:
    """The gauges' source for one composition: requests in flight through this ingress."""

    def __init__(self, name: str, max_batch: int, max_queue: int) -> None:
        self.name, self.max_batch, self.max_queue = name, max_batch, max_queue
        self.running = self.waiting = 0
        self.alive = True

    def stats(self) -> SchedulerStats:
        return SchedulerStats(self.name, self.running, self.waiting, self.max_batch, self.max_queue, self.alive)


class RayBackend:
    """Backend over composition deployment handles, keyed by composition name."""

    def __init__(self, handles: dict[str, Any], specs: dict[str, dict], infos: list[dict]) -> None:
        self.handles = handles
        self.specs = {name: parse_composition(spec) for name, spec in specs.items()}
        self._tokenizers = {name: load_tokenizer(s.members[0].model) for name, s in self.specs.items()}
        self._methods = {name: build_method(s) for name, s in self.specs.items()}
        self._infos = {i["name"]: i for i in infos}
        self._in_flight = {
            name: _InFlight(name, info.get("max_batch", 0), info.get("max_queue", 0))
            for name, info in self._infos.items()
        }
        self.serving_metrics = ServingMetrics(list(self._in_flight.values()))
        self._probes: dict[str, asyncio.Task] = {}

    def compositions(self) -> list[CompositionInfo]:
        return [
            CompositionInfo(i["name"], i["method"], tuple(i["members"]), i["max_context"], i.get("vocab_size"),
                            dict(i.get("solo", {})))
            for i in self._infos.values()
        ]

    def tokenizer(self, name: str) -> Any:
        self._handle(name)
        return self._tokenizers[name]

    def check(self, name: str, request: Request) -> None:
        self._handle(name)
        info = self._infos[name]
        check_request(request, self._methods[name], info["vocab_size"], info["max_context"])

    def _handle(self, name: str):
        try:
            return self.handles[name]
        except KeyError:
            raise ModelNotFoundError(f"no composition named {name!r}", param="model") from None

    async def generate(self, name: str, request: Request) -> AsyncIterator[TokenEvent]:
        """Admit through the handle; a refusal is raised here, before any event."""
        handle = self._handle(name)
        if not self._in_flight[name].alive:
            raise self._unavailable(name, "its replica is restarting")
        record = RequestRecord(name, request.request_id, len(request.prompt_ids), time.monotonic())
        stream = handle.options(stream=True).generate.remote(request)
        try:
            first = await asyncio.wait_for(stream.__anext__(), ADMIT_TIMEOUT_S)
        except asyncio.TimeoutError:
            stream.cancel()
            self.mark_down(name)
            raise self._unavailable(name, f"no replica acknowledged the request within {ADMIT_TIMEOUT_S:g} s") from None
        except Exception as exc:  # the replica is gone or failed
            stream.cancel()
            self.mark_down(name)
            raise self._unavailable(name, type(exc).__name__) from None
        if isinstance(first, ComposeError):
            if isinstance(first, QueueFullError):
                self.serving_metrics.request_rejected(name)
            raise first
        if first != ADMITTED:  # a replica of another version: never guess
            stream.cancel()
            raise EngineDeadError(f"composition {name!r} answered {type(first).__name__} before admission")
        return RemoteStream(self, name, stream, record)

    def _unavailable(self, name: str, why: str) -> EngineDeadError:
        return EngineDeadError(f"composition {name!r} is unavailable ({why}); retry later", retry_after=RETRY_AFTER_S)

    def mark_down(self, name: str) -> None:
        """Refuse ``name`` at once (503) until a probe finds a replica that answers again."""
        if self._in_flight[name].alive:
            logger.warning("composition %s is unavailable; probing until it is back", name)
        self._in_flight[name].alive = False
        if name not in self._probes or self._probes[name].done():
            self._probes[name] = asyncio.ensure_future(self._probe_until_back(name))

    async def _probe_until_back(self, name: str) -> None:
        while not await self._alive(name):
            await asyncio.sleep(PROBE_EVERY_S)
        self._in_flight[name].alive = True
        logger.warning("composition %s is back", name)

    async def _alive(self, name: str) -> bool:
        response = self.handles[name].stats.remote()
        try:
            return bool((await asyncio.wait_for(_awaited(response), HEALTH_TIMEOUT_S))["alive"])
        except Exception:  # timed out (no replica to take it yet) or the replica died
            response.cancel()
            return False

    async def health(self) -> dict[str, bool]:
        names = list(self.handles)
        alive = await asyncio.gather(*(self._health_of(name) for name in names))
        return dict(zip(names, alive, strict=True))

    async def _health_of(self, name: str) -> bool:
        if not self._in_flight[name].alive:  # the probe's answer, without a second remote call
            return False
        return await self._alive(name)

    async def metrics(self) -> tuple[bytes, str]:
        return self.serving_metrics.render()

    async def close(self) -> None:
        """Nothing to stop here: Ray Serve owns the replicas."""
        for probe in self._probes.values():
            probe.cancel()


async def _awaited(response):
    return await response


class RemoteStream:
    """One admitted request's TokenEvents from its replica. ``aclose()`` cancels the request in
    the replica whether or not the stream was ever iterated (a sibling choice refused, a client
    gone before the first byte), and every stream reports its record once to the metrics."""

    def __init__(self, backend: RayBackend, name: str, stream, record: RequestRecord) -> None:
        self.backend, self.name, self.stream, self.record = backend, name, stream, record
        self._counts = backend._in_flight[name]
        self._counts.waiting += 1
        self._ended = False
        self._buffer: collections.deque[TokenEvent] = collections.deque()  # the rest of a batch

    def __aiter__(self) -> RemoteStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._buffer:
            return self._take(self._buffer.popleft())
        if self._ended:
            raise StopAsyncIteration
        try:
            item = await self.stream.__anext__()
        except StopAsyncIteration:  # ended without a finish_reason: nothing more will come
            self._end("abort")
            raise
        except asyncio.CancelledError:
            self._end("abort")
            raise
        except Exception as exc:  # the replica died mid-stream
            self._end("error")
            self.backend.mark_down(self.name)
            raise EngineDeadError(f"composition {self.name!r} failed mid-stream ({type(exc).__name__})",
                                  retry_after=RETRY_AFTER_S) from None
        if isinstance(item, ComposeError):  # ended by its engine (step failure, timeout, stop)
            self._end("timeout" if isinstance(item, RequestTimeoutError) else "error")
            raise item
        if isinstance(item, list):  # the replica sends the events that were ready together
            self._buffer.extend(item[1:])
            item = item[0]
        return self._take(item)

    def _take(self, item: TokenEvent) -> TokenEvent:
        now = time.monotonic()
        if self.record.first_token is None:
            self.record.admitted = now
            self._counts.waiting -= 1
            self._counts.running += 1
        self.record.add(item, now)
        if item.finish_reason is not None:
            self._end(item.finish_reason)
        return item

    async def aclose(self) -> None:
        self._end("abort")

    def _end(self, reason: str) -> None:
        if self._ended:
            return
        self._ended = True
        self.stream.cancel()  # no-op when the replica's stream has finished
        if self.record.first_token is None:
            self._counts.waiting -= 1
        else:
            self._counts.running -= 1
        self.record.finish_reason = reason
        self.record.finished = time.monotonic()
        self.backend.serving_metrics.request_finished(self.record)


class OpenAIIngress:
    """The ingress deployment: FastAPI routes built at replica start (``__serve_build_asgi_app__``)."""

    async def __init__(self, handles: dict[str, Any], specs: dict[str, dict], api_key: str | None = None,
                       max_body_bytes: int | None = MAX_BODY_BYTES) -> None:
        infos = [await handles[name].info.remote() for name in handles]
        self.backend = RayBackend(handles, specs, infos)
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    def __serve_build_asgi_app__(self):
        return build_app(self.backend, api_key=self.api_key, max_body_bytes=self.max_body_bytes)
