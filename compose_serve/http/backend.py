"""What the routes talk to: a ``Backend`` serves compositions by name; the HTTP layer knows no more.

Contract (``Backend``):
- ``compositions()``: what is served (name, method, member names, context length);
- ``tokenizer(name)``: the composition's tokenizer (chat template, token strings);
- ``await generate(name, request)``: admits the request and returns an async iterator of
  ``TokenEvent`` (ending after the event with a finish_reason; ``aclose()`` aborts it). Refusals
  are raised by the ``await`` itself, before any event: InvalidRequestError / ContextLengthError
  (400), QueueFullError (429), EngineDeadError (503); errors after admission come from the iterator;
- ``check(name, request)``: the admission checks (pure, raises InvalidRequestError /
  ContextLengthError naming the field), so a request of several prompts or choices is refused
  whole before any part of it is queued;
- ``health()`` (answers within a second whatever the state), ``metrics()`` (Prometheus text and
  its content type), ``close()``.
``InProcessBackend`` wraps AsyncEngines in this process; the Ray Serve ingress (a later issue)
implements the same contract over deployment handles, routing by composition name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..composition import Composition
from ..engine.scheduler import AsyncEngine
from ..engine.sequence import Request, TokenEvent
from ..errors import ModelNotFoundError
from .metrics import ServingMetrics


@dataclass(frozen=True)
class CompositionInfo:
    """A served composition as the HTTP layer sees it."""

    name: str
    method: str
    members: tuple[str, ...]
    max_context: int
    vocab_size: int | None = None
    #: member -> the ``composition`` override that serves it alone, as the method answers
    #: ``solo_plan`` (only members that can be served alone)
    solo: dict[str, dict] = field(default_factory=dict)


def composition_info(composition: Composition) -> CompositionInfo:
    """What the HTTP layer needs to know of a built composition; the method answers for itself."""
    method = composition.method
    solo = {m: plan for m in method.member_names if (plan := method.solo_plan(m)) is not None}
    return CompositionInfo(
        composition.name,
        composition.spec.method,
        tuple(method.member_names),
        composition.max_context,
        composition.vocab_size,
        solo,
    )


class Backend(Protocol):
    def compositions(self) -> list[CompositionInfo]: ...

    def tokenizer(self, name: str) -> Any: ...

    def check(self, name: str, request: Request) -> None: ...

    async def generate(self, name: str, request: Request) -> AsyncIterator[TokenEvent]: ...

    async def health(self) -> dict[str, bool]: ...

    async def metrics(self) -> tuple[bytes, str]: ...

    async def close(self) -> None: ...


class InProcessBackend:
    """Serves each AsyncEngine under its composition name, with Prometheus metrics for all."""

    def __init__(self, engines: Sequence[AsyncEngine]) -> None:
        self.engines = {e.name: e for e in engines}
        if len(self.engines) != len(engines):
            raise ValueError(f"two compositions share a name: {[e.name for e in engines]}")
        self.serving_metrics = ServingMetrics(list(engines))
        for engine in engines:
            engine.observer = self.serving_metrics

    @classmethod
    def from_compositions(
        cls,
        compositions: Sequence[Composition],
        max_batch: int | None = None,
        max_queue: int | None = None,
        request_timeout: float | None = None,
    ) -> InProcessBackend:
        """One AsyncEngine per composition; bounds default to each composition's ``engine`` spec."""
        return cls(
            [
                AsyncEngine.from_composition(
                    c, max_batch=max_batch, max_queue=max_queue, request_timeout=request_timeout
                )
                for c in compositions
            ]
        )

    def _engine(self, name: str) -> AsyncEngine:
        try:
            return self.engines[name]
        except KeyError:
            raise ModelNotFoundError(f"no composition named {name!r}", param="model") from None

    def compositions(self) -> list[CompositionInfo]:
        return [composition_info(e.composition) for e in self.engines.values()]

    def tokenizer(self, name: str) -> Any:
        return self._engine(name).composition.tokenizer

    def check(self, name: str, request: Request) -> None:
        self._engine(name).engine.check(request)

    async def generate(self, name: str, request: Request) -> AsyncIterator[TokenEvent]:
        return self._engine(name).submit(request)

    async def health(self) -> dict[str, bool]:
        return {name: e.stats().alive for name, e in self.engines.items()}

    async def metrics(self) -> tuple[bytes, str]:
        return self.serving_metrics.render()

    async def close(self) -> None:
        for engine in self.engines.values():
            await engine.aclose()
