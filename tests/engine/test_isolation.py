"""A failure caused by one request fails that request only; the engine never dies of a bug that
one request's input reaches, and the checks that protect it run before a request takes a slot.

Issue 13, items 4, 9 and 12 (the scheduler side).
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from transformers import AutoTokenizer

from compose_serve.composition import build_composition
from compose_serve.config import parse_composition
from compose_serve.engine import Engine, Request
from compose_serve.engine.scheduler import AsyncEngine
from compose_serve.errors import (
    ContextLengthError,
    QueueFullError,
    RequestFailedError,
    StepFailedError,
)
from compose_serve.sampling import SamplingParams

from .held import close_releasing

POISON = 7  # a prompt starting with this token id makes the test engine's admission raise


def _spec(tiny, name, method="mixture", **extra):
    members = [{"name": "a", "model": str(tiny["a"])}, {"name": "b", "model": str(tiny["b"])}]
    return parse_composition({"name": name, "method": method, "members": members, **extra})


@pytest.fixture(scope="module")
def mix(tiny):
    return build_composition(_spec(tiny, "mix"))


@pytest.fixture(scope="module")
def tok(tiny):
    return AutoTokenizer.from_pretrained(tiny["tokenizer"])


class FaultyEngine(Engine):
    """Admission raises for a prompt starting with POISON (a bug its input reaches); the step
    waits on ``go``; ``abort`` raises once when ``fail_abort`` is set."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.go = threading.Event()
        self.go.set()
        self.fail_abort = False

    def add(self, requests):
        events = super().add(requests)  # slots taken, members prefilled: then the failure
        if any(r.prompt_ids[0] == POISON for r in requests):
            raise RuntimeError("poisoned prompt")
        return events

    def step(self):
        self.go.wait()
        return super().step()

    def abort(self, request_id):
        if self.fail_abort:
            self.fail_abort = False
            raise RuntimeError("abort exploded")
        return super().abort(request_id)


def _greedy(ids, n=6, **kw) -> Request:
    return Request(list(ids), SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), **kw)


def _alone(composition, request: Request) -> list[int]:
    copy = Request(list(request.prompt_ids), request.params, request.composition)
    return Engine(composition, max_batch=1).generate([copy])[0].token_ids


async def _collect(stream):
    return [event async for event in stream]


def test_a_request_that_fails_admission_fails_alone(mix, tok):
    """Before: the failure ended every running request with a 500 (StepFailedError)."""
    engine = AsyncEngine(FaultyEngine(mix, max_batch=4))
    running = _greedy(tok.encode("The quick"), n=8)
    joining = [_greedy(tok.encode("Compose models")), _greedy([POISON, 40, 41]), _greedy(tok.encode("2 +"))]

    async def main():
        engine.engine.go.clear()  # the running request is mid-decode when the others join
        first = engine.submit(running)
        head = await first.__anext__()
        streams = [engine.submit(r) for r in joining]  # admitted together at the next boundary
        engine.engine.go.set()
        first_events = [head, *await _collect(first)]
        results = await asyncio.gather(*(_collect(s) for s in streams), return_exceptions=True)
        return first_events, results, engine.stats()

    try:
        first, (good, poisoned, good2), stats = asyncio.run(main())
    finally:
        close_releasing(engine)
    assert isinstance(poisoned, RequestFailedError) and "poisoned prompt" in poisoned.message
    assert [e.token_id for e in first] == _alone(mix, running)
    assert [e.token_id for e in good] == _alone(mix, joining[0])
    assert [e.token_id for e in good2] == _alone(mix, joining[2])
    assert stats.alive and stats.running == 0 and engine.engine.free_slots == 4
    assert all(not m.live_slots for m in engine.engine.members)


def test_an_abort_that_raises_does_not_kill_the_engine(mix, tok):
    """Before: ``_apply_aborts`` ran outside the recovery and the engine stopped for good."""
    engine = AsyncEngine(FaultyEngine(mix, max_batch=2))

    async def main():
        doomed = engine.submit(_greedy(tok.encode("The"), n=200))
        other = engine.submit(_greedy(tok.encode("Every"), n=200))
        await doomed.__anext__()  # both admitted (steps are not held yet, so neither waits)
        await other.__anext__()
        engine.engine.go.clear()
        engine.engine.fail_abort = True
        await doomed.aclose()
        engine.engine.go.set()
        with pytest.raises(StepFailedError, match="abort exploded"):
            await _collect(other)
        return await _collect(engine.submit(_greedy(tok.encode("Una")))), engine.stats()

    try:
        later, stats = asyncio.run(main())
    finally:
        close_releasing(engine)
    assert stats.alive
    assert [e.token_id for e in later] == _alone(mix, _greedy(tok.encode("Una")))
    assert engine.engine.free_slots == 2


def test_packllm_with_a_member_at_weight_zero(tiny, tok, mix):
    """PackLLM (prompt-perplexity weights) with a one-hot request (a member served alone) in
    the batch: before, stacking ``prompt_nll`` met None and the whole step crashed."""
    pack = build_composition(_spec(tiny, "pack", "logit_mix", params={"weights": "prompt_perplexity"}))
    engine = Engine(pack, max_batch=4)
    solo = _greedy(tok.encode("The quick"), composition=pack.method.solo_plan("a"))
    packed = _greedy(tok.encode("Compose models"))
    out_solo, out_packed = engine.generate([solo, packed])
    # member a alone: logit_mix with weight 1 is a's own distribution, as mixture's one-hot row
    assert out_solo.token_ids == _alone(mix, _greedy(tok.encode("The quick"), composition={"weights": {"a": 1.0}}))
    weights = out_packed.diagnostics[0]["weights"]
    assert weights["a"] > 0 and weights["b"] > 0 and weights["a"] + weights["b"] == pytest.approx(1.0)
    assert out_packed.token_ids == _alone(pack, packed)


def test_a_prompt_alone_over_the_context_names_the_prompt(mix, tok):
    engine = Engine(mix, max_batch=1)
    with pytest.raises(ContextLengthError) as too_long:
        engine.check(_greedy([5] * mix.max_context, n=1))
    assert too_long.value.param == "prompt" and "prompt" in too_long.value.message
    with pytest.raises(ContextLengthError) as with_output:
        engine.check(_greedy([5] * (mix.max_context - 3), n=10))
    assert with_output.value.param == "max_tokens"


def test_the_429_message_counts_what_is_in(mix, tok):
    """Before: '79 waiting (max_queue 64)', a queue that looked over its own bound."""
    engine = AsyncEngine(FaultyEngine(mix, max_batch=1), max_queue=1)

    async def main():
        engine.engine.go.clear()
        streams = [engine.submit(_greedy(tok.encode("The"), n=3)) for _ in range(2)]
        with pytest.raises(QueueFullError) as full:
            engine.submit(_greedy(tok.encode("The"), n=3))
        engine.engine.go.set()
        await asyncio.gather(*(_collect(s) for s in streams))
        return full.value

    try:
        full = asyncio.run(main())
    finally:
        close_releasing(engine)
    assert "2 requests in (max_batch 1 running + max_queue 1 waiting)" in full.message
