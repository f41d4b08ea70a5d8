"""The composition deployment: one replica holds a composition's engine (and, colocated, its
members), so a decoding step never leaves the process.

``generate(request)`` streams through the handle: first ``ADMITTED`` as soon as the engine has
queued the request (so the ingress tells a live replica from a dead or restarting one within
seconds, whatever the queue), then the request's TokenEvents in lists: every event already
waiting goes in one stream item (``RequestStream.ready``), so a handle round trip and the proxy
carry one item per step or per several steps, not one per token. A refusal (a bad field, a full
queue) is not raised across the process boundary, where Ray would wrap it: it is yielded as the
stream's only item, a ComposeError that pickles with its field, and the ingress raises it there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator

from compose_serve.composition import build_composition
from compose_serve.config import parse_composition
from compose_serve.engine.scheduler import AsyncEngine
from compose_serve.engine.sequence import Request, TokenEvent
from compose_serve.errors import ComposeError, EngineDeadError
from compose_serve.http.backend import composition_info
from compose_serve.http.server import set_torch_threads

from .member import RemoteMember

logger = logging.getLogger(__name__)
ADMITTED = "admitted"  # the first item of a generate stream once the engine has queued the request


class CompositionServer:
    """A deployment replica serving one composition with its own continuous-batching engine."""

    async def __init__(self, spec: dict, member_handles: dict | None = None, engine_options: dict | None = None) -> None:
        # async: Ray Serve runs constructors in the replica's event loop, where a handle is awaited
        options = dict(engine_options or {})
        set_torch_threads(options.pop("torch_threads", None))
        composition_spec = parse_composition(spec)
        members = None
        if member_handles:  # distributed placement: members live in their own deployments
            members = []
            for member_spec in composition_spec.members:
                handle = member_handles[member_spec.name]
                info = await handle.info.remote()
                members.append(RemoteMember(handle, member_spec.model, info))
        composition = build_composition(composition_spec, members=members)
        self.engine = AsyncEngine.from_composition(composition, **options)
        logger.info("composition %s ready (%s placement)", composition.name,
                    "distributed" if members else "colocated")

    async def generate(self, request: Request) -> AsyncIterator[list[TokenEvent] | ComposeError | str]:
        try:
            stream = self.engine.submit(request)
        except ComposeError as exc:
            yield exc
            return
        yield ADMITTED
        try:
            async for event in stream:  # one stream item per batch of ready events, not per token
                yield [event, *stream.ready()]
        except ComposeError as exc:
            yield exc
        finally:
            await stream.aclose()  # a client that went away frees its slot here

    def info(self) -> dict:
        info = composition_info(self.engine.composition)
        return {"name": info.name, "method": info.method, "members": list(info.members),
                "max_context": info.max_context, "vocab_size": info.vocab_size, "solo": info.solo,
                "max_batch": self.engine.max_batch, "max_queue": self.engine.max_queue}

    def stats(self) -> dict:
        s = self.engine.stats()
        return {"alive": s.alive, "running": s.running, "waiting": s.waiting, "pid": os.getpid()}

    def check_health(self) -> None:
        if not self.engine.stats().alive:
            raise EngineDeadError(f"the engine of {self.engine.name!r} has stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(timeout=1.0)
