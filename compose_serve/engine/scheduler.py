"""Continuous batching: the asyncio face of the synchronous ``Engine``, stepped in one thread.

``AsyncEngine.submit(request) -> RequestStream``, an async iterator of ``TokenEvent``:
  1. validate at once (``engine.check`` raises InvalidRequestError / ContextLengthError naming the
     field) and refuse with QueueFullError when ``max_batch + max_queue`` requests are already in;
  2. wait in a FIFO queue; at each step boundary the step thread applies pending aborts, admits
     as many waiting requests as there are free slots (``engine.add``; while others run, their
     first chunk rides in the step's forward) and advances every running sequence one token
     (``engine.step``); a finished sequence leaves the
     batch in the step that finishes it, and running sequences are never re-prefilled;
  3. every event goes to the request's asyncio queue on the loop that submitted it
     (``loop.call_soon_threadsafe``); the stream ends after the event carrying a finish_reason.
Closing a stream early (``aclose``, a cancelled task, a client gone) aborts its request: a
waiting one leaves the queue at once, a running one frees its slot at the next step boundary.
``request_timeout`` (seconds from submit) does the same and raises RequestTimeoutError.
A failure is kept to the requests it can be blamed on. If admitting new requests raises (their
prefill, plan or first token), the running batch was not touched and goes on: the new requests
are tried one by one and each that fails alone ends with RequestFailedError naming the cause.
A step whose forward carried prompt chunks and failed is rolled back by the engine, which runs it
again without them and tries each prompt alone; the ones that fail alone come back from
``engine.take_failures()`` and end with RequestFailedError. If a decode step (or freeing an
aborted slot) raises, the cause cannot be told apart: every request
in the batch ends with StepFailedError, the engine is reset (all slots freed) and the loop goes
on; if the reset fails too, the engine is dead: every pending request ends with EngineDeadError
and so does every later submit. Nothing ever waits forever.

The Engine stays single-threaded: only the step thread touches it (``engine.check`` is pure).
Finished requests are reported, once each, to the ``observer`` (metrics) from whichever thread
ended them, so an observer must be thread-safe (prometheus_client is).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Protocol

from ..composition import Composition
from ..errors import (
    EngineDeadError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    RequestTimeoutError,
    StepFailedError,
)
from .core import Engine
from .sequence import Request, TokenEvent

logger = logging.getLogger(__name__)


@dataclass
class RequestRecord:
    """What one request did; times are ``time.monotonic()`` seconds.

    ``finish_reason``: stop | length (the engine's), abort (closed early), timeout, error.
    """

    model: str
    request_id: str
    prompt_tokens: int
    submitted: float
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    output_tokens: int = 0
    inter_token: list[float] = field(default_factory=list)  # seconds between consecutive tokens
    diagnostic_sums: dict[str, dict[str, float]] = field(default_factory=dict)
    finish_reason: str | None = None

    def add(self, event: TokenEvent, now: float) -> None:
        if self.first_token is None:
            self.first_token = now
        else:
            self.inter_token.append(now - self.last_token)
        self.last_token = now
        if not event.generated:  # a prompt scored with max_tokens 0: its result, not a token
            return
        self.output_tokens += 1
        for name, per_member in event.diagnostics.items():
            sums = self.diagnostic_sums.setdefault(name, {})
            for member, value in per_member.items():
                sums[member] = sums.get(member, 0.0) + value

    @property
    def diagnostic_means(self) -> dict[str, dict[str, float]]:
        """Per diagnostic (``weights``, ``gate_mean``) and member: the mean over the tokens."""
        n = max(self.output_tokens, 1)
        return {
            name: {m: s / n for m, s in sums.items()} for name, sums in self.diagnostic_sums.items()
        }

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.submitted

    @property
    def queue_time(self) -> float | None:
        return None if self.admitted is None else self.admitted - self.submitted

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.submitted


class Observer(Protocol):
    """Receives each request's record once, when it ends, and each refusal (thread-safe)."""

    def request_finished(self, record: RequestRecord) -> None: ...

    def request_rejected(self, model: str) -> None: ...


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot: sequences in the batch, requests waiting, bounds, and whether it serves."""

    model: str
    running: int
    waiting: int
    max_batch: int
    max_queue: int
    alive: bool


_WAITING, _RUNNING, _DONE = "waiting", "running", "done"


class RequestStream:
    """The token events of one submitted request, in order (see the module docstring).

    ``async for event in stream`` ends after the event with a finish_reason; it raises the
    request's error (StepFailedError, EngineDeadError, RequestTimeoutError) if it has one.
    """

    def __init__(
        self, owner: AsyncEngine, request: Request, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.request = request
        self.loop = loop
        self.record = RequestRecord(
            owner.name, request.request_id, len(request.prompt_ids), time.monotonic()
        )
        self.state = _WAITING  # changed under the owner's lock only
        self._owner = owner
        self._queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self._deadline = (
            None if owner.request_timeout is None else self.record.submitted + owner.request_timeout
        )
        self._closed = False
        self._stashed: BaseException | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._stashed is not None:  # an error found by ``ready`` after the events before it
            error, self._stashed, self._closed = self._stashed, None, True
            raise error
        if self._closed:
            raise StopAsyncIteration
        try:
            item = await self._next_item()
        except RequestTimeoutError:
            self.close("timeout")
            raise
        except BaseException:  # cancelled: the consumer is gone
            self.close()
            raise
        if isinstance(item, BaseException):
            self._closed = True
            raise item
        if item.finish_reason is not None:
            self._closed = True
        return item

    async def _next_item(self) -> TokenEvent | BaseException:
        if self._deadline is None:
            return await self._queue.get()
        try:
            return await asyncio.wait_for(
                self._queue.get(), max(self._deadline - time.monotonic(), 0.0)
            )
        except asyncio.TimeoutError:
            raise RequestTimeoutError(
                f"request {self.request_id} ran past the request timeout of {self._owner.request_timeout} s"
            ) from None

    def ready(self) -> list[TokenEvent]:
        """The events already queued, taken without waiting (up to and including the one with a
        finish_reason; an error stays for the next ``__anext__``). A transport that is slower than
        the engine sends them as one item instead of one item per token."""
        events: list[TokenEvent] = []
        while not self._closed and self._stashed is None:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if isinstance(item, BaseException):
                self._stashed = item
                break
            events.append(item)
            if item.finish_reason is not None:
                self._closed = True
        return events

    async def aclose(self) -> None:
        self.close()

    def close(self, reason: str = "abort") -> None:
        """Stop consuming; abort the request unless it already ended. Idempotent."""
        if not self._closed:
            self._closed = True
            self._owner.abort(self, reason)

    def put(self, item: TokenEvent | BaseException) -> None:
        """Called on ``self.loop``: queue an event (or the error that ends the request)."""
        if not self._closed:
            self._queue.put_nowait(item)


class AsyncEngine:
    """Owns an ``Engine`` and its step thread; see the module docstring for the contract."""

    def __init__(
        self,
        engine: Engine,
        max_queue: int | None = None,
        request_timeout: float | None = None,
        observer: Observer | None = None,
        name: str | None = None,
    ) -> None:
        self.engine = engine
        self.name = name or engine.composition.name
        self.max_batch = engine.max_batch
        self.max_queue = (
            engine.composition.spec.engine.max_queue if max_queue is None else max_queue
        )
        self.request_timeout = request_timeout
        self.observer = observer
        self._lock = threading.Condition()
        self._waiting: deque[RequestStream] = deque()
        self._streams: dict[str, RequestStream] = {}  # every request that has not ended
        self._aborts: list[tuple[RequestStream, str]] = []
        self._running = 0
        self._stopping = False
        self._dead: str | None = None
        self._thread: threading.Thread | None = None
        self._mean_e2e: float | None = None  # moving average, for Retry-After

    @classmethod
    def from_composition(
        cls, composition: Composition, max_batch: int | None = None, **kwargs
    ) -> AsyncEngine:
        return cls(Engine(composition, max_batch), **kwargs)

    @property
    def composition(self) -> Composition:
        return self.engine.composition

    def stats(self) -> SchedulerStats:
        with self._lock:
            return SchedulerStats(
                self.name,
                self._running,
                len(self._waiting),
                self.max_batch,
                self.max_queue,
                self._dead is None and not self._stopping,
            )

    # -- the event-loop side ----------------------------------------------------------------
    def submit(self, request: Request) -> RequestStream:
        """Validate and enqueue ``request``; raises before anything is queued when it is refused."""
        self._check_alive()
        self.engine.check(request)
        stream = RequestStream(self, request, asyncio.get_running_loop())
        with self._lock:
            self._check_alive()
            if request.request_id in self._streams:
                raise InvalidRequestError(
                    f"request id {request.request_id!r} is already in use", param="request_id"
                )
            if len(self._streams) >= self.max_batch + self.max_queue:
                self._reject()
            self._streams[request.request_id] = stream
            self._waiting.append(stream)
            self._lock.notify()
        self._start_thread()
        return stream

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine of {self.name!r} has stopped: {self._dead}")
        if self._stopping:
            raise EngineDeadError(f"the engine of {self.name!r} is shutting down")

    def _reject(self) -> None:
        if self.observer is not None:
            self.observer.request_rejected(self.name)
        waiting = len(self._waiting)
        per_request = self._mean_e2e or 1.0
        retry_after = min(60.0, max(1.0, math.ceil(per_request * (waiting + 1) / self.max_batch)))
        raise QueueFullError(
            f"{self.name!r} is at capacity: {len(self._streams)} requests in (max_batch {self.max_batch} "
            f"running + max_queue {self.max_queue} waiting); retry after {retry_after:.0f} s",
            retry_after=retry_after,
        )

    def abort(self, stream: RequestStream, reason: str = "abort") -> None:
        """End ``stream``'s request: at once if waiting, at the next step boundary if running."""
        with self._lock:
            if stream.state == _DONE:
                return
            if stream.state == _RUNNING:
                self._aborts.append((stream, reason))
                self._lock.notify()
                return
            self._waiting.remove(stream)
            self._end(stream, reason)
        self._observe(stream.record)

    def _start_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"engine-{self.name}", daemon=True
                )
                self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Stop the step thread after its current step; every pending request gets EngineDeadError."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        else:
            self._fail_pending("the engine is shutting down")

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    # -- the step thread --------------------------------------------------------------------
    def _run(self) -> None:
        reason = "the engine is shutting down"
        try:
            while self._iterate():
                pass
            reason = self._dead or reason
        except BaseException as exc:  # a bug here must not leave clients waiting
            logger.exception("the step loop of %s died", self.name)
            self._dead = f"{type(exc).__name__}: {exc}"
            reason = self._dead
        finally:
            self._fail_pending(reason)

    def _iterate(self) -> bool:
        """One step boundary: aborts, admissions, the step. False when the loop must stop."""
        with self._lock:
            while not (self._stopping or self._aborts or self._waiting or self.engine.busy):
                self._lock.wait()
            if self._stopping:
                return False
            aborts, self._aborts = self._aborts, []
        try:
            self._apply_aborts(aborts)
        except Exception as exc:  # freeing a slot failed: the engine's state is unknown
            return self._recover(exc)
        admitted = self._admit()
        if admitted and not self._add(admitted):
            return False
        try:
            if self.engine.busy:
                self._dispatch(self.engine.step())
        except Exception as exc:
            return self._recover(exc)
        for request_id, exc in self.engine.take_failures():  # new requests that failed alone in the step
            stream = self._streams.get(request_id)
            if stream is not None:
                self._end_failed(stream, exc)
        return True

    def _add(self, admitted: list[RequestStream]) -> bool:
        """Prefill ``admitted`` and emit their first tokens. ``add`` touches only the new slots,
        so when it raises, the running batch goes on: the new requests' slots are freed and each
        is tried alone; one that fails alone ends alone with RequestFailedError naming the cause.
        False when the engine could not be repaired (it stops)."""
        try:
            self._dispatch(self.engine.add([s.request for s in admitted]))
            return True
        except Exception as exc:
            if len(admitted) == 1:
                return self._fail_one(admitted[0], exc)
        try:
            self.engine.discard({s.request_id for s in admitted})
        except Exception as exc:
            return self._recover(exc)
        for stream in admitted:
            try:
                self._dispatch(self.engine.add([stream.request]))
            except Exception as exc:
                if not self._fail_one(stream, exc):
                    return False
        return True

    def _fail_one(self, stream: RequestStream, exc: Exception) -> bool:
        """End one request whose admission raised, free its slot; the others go on."""
        logger.error("request %s failed at admission in %s", stream.request_id, self.name, exc_info=exc)
        try:
            self.engine.discard({stream.request_id})
        except Exception as discard_exc:
            return self._recover(discard_exc)
        self._end_failed(stream, exc)
        return True

    def _end_failed(self, stream: RequestStream, exc: Exception) -> None:
        """End ``stream`` with RequestFailedError naming ``exc`` (its slot is already free)."""
        with self._lock:
            if stream.state == _DONE:
                return
            self._end(stream, "error")
        message = f"the request failed in the engine ({type(exc).__name__}: {exc}); other requests went on"
        self._fail([stream], lambda: RequestFailedError(message))

    def _apply_aborts(self, aborts: list[tuple[RequestStream, str]]) -> None:
        for stream, reason in aborts:
            with self._lock:
                if stream.state == _DONE:  # it finished in the meantime
                    continue
                self._end(stream, reason)
            self.engine.abort(stream.request_id)
            self._observe(stream.record)

    def _admit(self) -> list[RequestStream]:
        now = time.monotonic()
        with self._lock:
            admitted = [
                self._waiting.popleft()
                for _ in range(min(self.engine.free_slots, len(self._waiting)))
            ]
            for stream in admitted:
                stream.state = _RUNNING
                stream.record.admitted = now
            self._running += len(admitted)
        return admitted

    def _dispatch(self, events: list[TokenEvent]) -> None:
        """Hand events to their streams' loops (one callback per loop per step)."""
        now = time.monotonic()
        per_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        finished = []
        with self._lock:
            for event in events:
                stream = self._streams.get(event.request_id)
                if stream is None or stream.state != _RUNNING:
                    continue
                stream.record.add(event, now)
                if event.finish_reason is not None:
                    self._end(stream, event.finish_reason)
                    finished.append(stream.record)
                per_loop[stream.loop].append((stream, event))
        for loop, items in per_loop.items():
            _post(loop, items)
        for record in finished:
            self._observe(record)

    def _recover(self, exc: Exception) -> bool:
        """A step raised: end the batch's requests with the error, then reset the engine."""
        logger.exception(
            "a step of %s failed; ending the %d requests in the batch", self.name, self._running
        )
        message = f"the engine step failed ({type(exc).__name__}: {exc}); the request was ended"
        with self._lock:
            batch = [s for s in self._streams.values() if s.state == _RUNNING]
            for stream in batch:
                self._end(stream, "error")
        self._fail(batch, lambda: StepFailedError(message))
        try:
            self.engine.reset()
        except Exception as reset_exc:
            logger.exception("resetting the engine of %s failed; it stops", self.name)
            self._dead = f"a step failed ({exc!r}) and the reset failed ({reset_exc!r})"
            return False
        return True

    def _fail_pending(self, reason: str) -> None:
        """End every request that has not ended with EngineDeadError (the loop is stopping)."""
        with self._lock:
            pending = list(self._streams.values())
            self._waiting.clear()
            for stream in pending:
                self._end(stream, "error")
        self._fail(
            pending, lambda: EngineDeadError(f"the engine of {self.name!r} stopped: {reason}")
        )

    def _fail(self, streams: list[RequestStream], make_error) -> None:
        per_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for stream in streams:
            per_loop[stream.loop].append((stream, make_error()))
        for loop, items in per_loop.items():
            _post(loop, items)
        for stream in streams:
            self._observe(stream.record)

    # -- bookkeeping (under the lock) -------------------------------------------------------
    def _end(self, stream: RequestStream, reason: str) -> None:
        if stream.state == _RUNNING:
            self._running -= 1
        stream.state = _DONE
        self._streams.pop(stream.request_id, None)
        stream.record.finish_reason = reason
        stream.record.finished = time.monotonic()
        e2e = stream.record.e2e
        self._mean_e2e = e2e if self._mean_e2e is None else 0.9 * self._mean_e2e + 0.1 * e2e

    def _observe(self, record: RequestRecord) -> None:
        if self.observer is None:
            return
        try:
            self.observer.request_finished(record)
        except Exception:  # metrics must never break serving
            logger.exception("the observer failed on request %s", record.request_id)


def _post(
    loop: asyncio.AbstractEventLoop, items: list[tuple[RequestStream, TokenEvent | BaseException]]
) -> None:
    """Deliver ``items`` on ``loop``; a closed loop has nobody left to read them."""
    try:
        loop.call_soon_threadsafe(_deliver, items)
    except RuntimeError:  # nobody is left to read them: stop generating
        logger.debug("dropping %d events for a closed event loop", len(items))
        for stream, _ in items:
            stream.close()


def _deliver(items: list[tuple[RequestStream, TokenEvent | BaseException]]) -> None:
    for stream, item in items:
        stream.put(item)
