"""AsyncEngine (continuous batching) against the plain Engine run on each request alone.

Steps can be held with ``HeldEngine.go`` (a threading.Event the step waits on), so tests about
queues, aborts and timeouts never depend on how fast this machine is.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from transformers import AutoTokenizer

from compose_serve.composition import build_composition
from compose_serve.config import parse_composition
from compose_serve.engine import Engine, Request
from compose_serve.engine.scheduler import AsyncEngine, RequestTimeoutError, StepFailedError
from compose_serve.errors import (
    ContextLengthError,
    EngineDeadError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
)
from compose_serve.sampling import SamplingParams

from .held import close_releasing

PROMPTS = [
    "The quick brown",
    "Compose models at decoding time",
    "2 +",
    "def add(a, b):\n",
    "Una",
    "Every member scores",
    "12 * 3 =",
    "emoji",
]


class HeldEngine(Engine):
    """An Engine whose ``step`` waits until ``go`` is set (``add`` is never held); counts steps."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.go = threading.Event()
        self.go.set()
        self.steps = 0

    def step(self):
        self.go.wait()
        self.steps += 1
        return super().step()


class Records:
    """An observer that keeps every record."""

    def __init__(self) -> None:
        self.finished, self.rejected = [], 0

    def request_finished(self, record) -> None:
        self.finished.append(record)

    def request_rejected(self, model) -> None:
        self.rejected += 1


@pytest.fixture(scope="module")
def composition(tiny):
    spec = parse_composition(
        {
            "name": "mix",
            "method": "mixture",
            "members": [
                {"name": "a", "model": str(tiny["a"])},
                {"name": "b", "model": str(tiny["b"])},
            ],
        }
    )
    return build_composition(spec)


@pytest.fixture(scope="module")
def tok(tiny):
    return AutoTokenizer.from_pretrained(tiny["tokenizer"])


def _request(tok, i: int, **params) -> Request:
    """Request i: its own prompt and length; greedy when i is even, seeded sampling when odd."""
    defaults = {
        "max_tokens": 3 + (i * 5) % 17,
        "ignore_eos": True,
        "logprobs": 2,
        "temperature": 0.0 if i % 2 == 0 else 0.9,
        "seed": None if i % 2 == 0 else 100 + i,
    }
    return Request(
        tok.encode(PROMPTS[i % len(PROMPTS)]),
        SamplingParams(**{**defaults, **params}),
        composition={"weights": {"a": 0.3, "b": 0.7}} if i % 3 == 0 else None,
    )


def _alone(composition, request: Request):
    copy = Request(list(request.prompt_ids), request.params, request.composition)
    return Engine(composition, max_batch=1).generate([copy])[0]


async def _collect(stream):
    return [event async for event in stream]


def test_concurrent_requests_equal_each_alone(composition, tok):
    requests = [_request(tok, i) for i in range(16)]
    alone = [_alone(composition, r) for r in requests]
    records = Records()
    engine = AsyncEngine.from_composition(composition, max_batch=4, observer=records)

    async def late(i):
        await asyncio.sleep(0.003 * (i % 5))  # arrivals spread over several steps
        return await _collect(engine.submit(requests[i]))

    async def main():
        return await asyncio.gather(*(late(i) for i in range(16)))

    try:
        results = asyncio.run(main())
    finally:
        close_releasing(engine)
    for want, events in zip(alone, results, strict=True):
        assert [e.token_id for e in events] == want.token_ids
        assert "".join(e.text for e in events) == want.text
        assert events[-1].finish_reason == want.finish_reason == "length"
        assert [e.logprob for e in events] == pytest.approx(want.logprobs, abs=1e-4)
    assert sorted(r.output_tokens for r in records.finished) == sorted(
        len(a.token_ids) for a in alone
    )
    assert engine.engine.free_slots == 4 and engine.stats().running == 0


def test_close_mid_stream_frees_the_slot(composition, tok):
    records = Records()
    engine = AsyncEngine(HeldEngine(composition, max_batch=1), observer=records)

    async def main():
        engine.engine.go.clear()
        stream = engine.submit(_request(tok, 0, max_tokens=200))
        first = await stream.__anext__()  # from add(), which is not held
        assert engine.stats().running == 1
        await stream.aclose()
        engine.engine.go.set()
        later = await _collect(engine.submit(_request(tok, 2, max_tokens=5)))
        return first, later

    try:
        first, later = asyncio.run(main())
    finally:
        close_releasing(engine)
    aborted = next(r for r in records.finished if r.finish_reason == "abort")
    assert aborted.output_tokens < 200
    assert [e.token_id for e in later] == _alone(
        composition, _request(tok, 2, max_tokens=5)
    ).token_ids
    assert engine.stats().running == 0 and engine.engine.free_slots == 1
    # had the slot not been freed, the later request could only start after 199 more steps
    assert engine.engine.steps < 20


def test_cancelled_task_aborts_a_waiting_request(composition, tok):
    records = Records()
    engine = AsyncEngine(HeldEngine(composition, max_batch=1), observer=records)

    async def main():
        engine.engine.go.clear()
        running = engine.submit(_request(tok, 0, max_tokens=4))
        waiting_task = asyncio.ensure_future(_collect(engine.submit(_request(tok, 1))))
        await asyncio.sleep(0)  # the task starts consuming; cancelled before that, it never would
        while engine.stats().running < 1:  # the step thread admits the first one
            await asyncio.sleep(0.005)
        assert engine.stats().waiting == 1
        waiting_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting_task
        assert engine.stats().waiting == 0
        engine.engine.go.set()
        return await _collect(running)

    try:
        events = asyncio.run(main())
    finally:
        close_releasing(engine)
    assert len(events) == 4
    assert [r.finish_reason for r in records.finished] == ["abort", "length"]


def test_queue_bound_refuses_and_admitted_requests_complete(composition, tok):
    records = Records()
    engine = AsyncEngine(HeldEngine(composition, max_batch=1), max_queue=2, observer=records)

    async def main():
        engine.engine.go.clear()
        streams = [engine.submit(_request(tok, i, max_tokens=4)) for i in range(3)]
        with pytest.raises(QueueFullError) as refused:
            engine.submit(_request(tok, 3))
        engine.engine.go.set()
        return refused.value, await asyncio.gather(*(_collect(s) for s in streams))

    try:
        refused, results = asyncio.run(main())
    finally:
        close_releasing(engine)
    assert refused.status_code == 429 and refused.retry_after >= 1
    assert records.rejected == 1
    assert [len(events) for events in results] == [4, 4, 4]


def test_invalid_requests_fail_at_submit(composition, tok):
    engine = AsyncEngine.from_composition(composition, max_batch=2)

    async def main():
        with pytest.raises(ContextLengthError) as too_long:
            engine.submit(Request(tok.encode("The quick brown"), SamplingParams(max_tokens=1000)))
        with pytest.raises(InvalidRequestError) as bad_weights:
            engine.submit(Request(tok.encode("x"), composition={"weights": {"zz": 1.0}}))
        return too_long.value, bad_weights.value

    try:
        too_long, bad_weights = asyncio.run(main())
    finally:
        close_releasing(engine)
    assert too_long.param == "max_tokens" and bad_weights.param == "composition.weights"
    assert engine.stats().waiting == 0


def test_request_timeout_ends_the_request_and_frees_the_slot(composition, tok):
    records = Records()
    engine = AsyncEngine(
        HeldEngine(composition, max_batch=1), request_timeout=0.2, observer=records
    )

    async def main():
        engine.engine.go.clear()  # the request can never finish while steps are held
        with pytest.raises(RequestTimeoutError):
            await _collect(engine.submit(_request(tok, 0, max_tokens=50)))
        engine.engine.go.set()
        return await _collect(engine.submit(_request(tok, 2, max_tokens=3)))

    try:
        later = asyncio.run(main())
    finally:
        close_releasing(engine)
    assert records.finished[0].finish_reason == "timeout"
    assert len(later) == 3 and engine.engine.free_slots == 1


def test_a_failed_step_ends_its_batch_and_serving_goes_on(composition, tok, monkeypatch):
    engine = AsyncEngine.from_composition(composition, max_batch=2)
    real_step, calls = engine.engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_step()

    monkeypatch.setattr(engine.engine, "step", failing_step)

    async def main():
        with pytest.raises(StepFailedError, match="boom"):
            await _collect(engine.submit(_request(tok, 0, max_tokens=10)))
        return await _collect(engine.submit(_request(tok, 2, max_tokens=6)))

    try:
        later = asyncio.run(main())
    finally:
        close_releasing(engine)
    assert [e.token_id for e in later] == _alone(
        composition, _request(tok, 2, max_tokens=6)
    ).token_ids
    assert engine.engine.free_slots == 2


def test_a_failed_prefill_resets_the_slots(composition, tok, monkeypatch):
    engine = AsyncEngine.from_composition(composition, max_batch=2)
    member = engine.engine.members[1]
    real_prefill, calls = member.prefill, []

    def failing_prefill(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("prefill exploded")
        return real_prefill(*args, **kwargs)

    monkeypatch.setattr(member, "prefill", failing_prefill)

    async def main():
        with pytest.raises(RequestFailedError, match="prefill exploded"):  # it alone failed
            await _collect(engine.submit(_request(tok, 0, max_tokens=4)))
        return await _collect(engine.submit(_request(tok, 2, max_tokens=4)))

    try:
        later = asyncio.run(main())
    finally:
        close_releasing(engine)
    assert [e.token_id for e in later] == _alone(
        composition, _request(tok, 2, max_tokens=4)
    ).token_ids
    assert engine.engine.free_slots == 2


def test_a_dead_engine_fails_everything_and_refuses_more(composition, tok, monkeypatch):
    engine = AsyncEngine.from_composition(composition, max_batch=1)

    def broken(*args, **kwargs):
        raise RuntimeError("broken beyond repair")

    monkeypatch.setattr(engine.engine, "step", broken)
    monkeypatch.setattr(engine.engine, "reset", broken)

    async def main():
        first = engine.submit(_request(tok, 0, max_tokens=4))
        second = engine.submit(_request(tok, 2, max_tokens=4))
        with pytest.raises(StepFailedError):
            await _collect(first)
        with pytest.raises(EngineDeadError):
            await _collect(second)
        with pytest.raises(EngineDeadError):
            engine.submit(_request(tok, 4))

    try:
        asyncio.run(main())
    finally:
        close_releasing(engine)
        Engine.reset(engine.engine)  # the members are shared with the other tests
    assert not engine.stats().alive


def test_close_ends_pending_requests(composition, tok):
    engine = AsyncEngine(HeldEngine(composition, max_batch=1))

    async def main():
        engine.engine.go.clear()
        running = engine.submit(_request(tok, 0, max_tokens=100))
        waiting = engine.submit(_request(tok, 2, max_tokens=100))
        await running.__anext__()
        closing = asyncio.ensure_future(asyncio.to_thread(engine.close))
        await asyncio.sleep(0.01)
        engine.engine.go.set()  # let the held step finish so the loop can stop
        await closing
        for stream in (running, waiting):
            with pytest.raises(EngineDeadError):
                await _collect(stream)
        with pytest.raises(EngineDeadError):
            engine.submit(_request(tok, 4))

    asyncio.run(main())


def test_ready_takes_the_queued_events_at_once_and_the_stream_ends_after_them(composition, tok):
    """What the Ray replica sends as one item: every event already waiting, in order."""
    request = _request(tok, 2, max_tokens=9)
    want = _alone(composition, request).token_ids
    engine = AsyncEngine.from_composition(composition, max_batch=2)

    async def main():
        stream = engine.submit(request)
        first = await stream.__anext__()
        # let the engine finish the request and its events reach this loop before reading on
        while engine.stats().running or stream._queue.qsize() < len(want) - 1:
            await asyncio.sleep(0.01)
        rest = stream.ready()
        after = [event async for event in stream]
        return first, rest, after

    try:
        first, rest, after = asyncio.run(main())
    finally:
        close_releasing(engine)
    assert [first.token_id] + [e.token_id for e in rest] == want
    assert rest[-1].finish_reason == "length" and after == []
