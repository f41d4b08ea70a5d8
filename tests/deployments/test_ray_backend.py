"""The Ray ingress's backend over fake deployment handles: no Ray instance, so every timing and
failure is the test's choice (issue 13, items 7, 11, 12, 13).

The real Ray Serve path (a replica SIGKILLed mid-stream) is in ``test_ray_serve.py``.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from compose_serve.engine.sequence import Request, TokenEvent
from compose_serve.errors import ComposeError, EngineDeadError, QueueFullError
from compose_serve.http.metrics import ServingMetrics
from compose_serve.http.protocol import CompletionRequest
from compose_serve.http.serving import OpenAIServing
from compose_serve.sampling import SamplingParams

pytest.importorskip("ray.serve")
from compose_serve.deployments import builder, ingress  # noqa: E402
from compose_serve.deployments.composition import ADMITTED  # noqa: E402
from compose_serve.deployments.member import RemoteMember  # noqa: E402


class FakeResponse:
    """A DeploymentResponse: awaitable, cancellable; never resolves when ``value`` is None."""

    def __init__(self, value=None) -> None:
        self.value, self.cancelled = value, False

    def __await__(self):
        return self._get().__await__()

    async def _get(self):
        if self.value is None:
            await asyncio.Event().wait()
        if isinstance(self.value, Exception):
            raise self.value
        return self.value

    def cancel(self) -> None:
        self.cancelled = True


class FakeStream:
    """A DeploymentResponseGenerator yielding ``items``; ``hang`` blocks before the first one."""

    def __init__(self, items, hang: bool = False) -> None:
        self.items, self.hang, self.cancelled = list(items), hang, False

    async def __anext__(self):
        if self.hang:
            await asyncio.Event().wait()
        await asyncio.sleep(0)
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, Exception) and not isinstance(item, ComposeError):  # the replica died
            raise item
        return item  # a refusal (ComposeError) travels as an item, as the replica yields it

    def cancel(self) -> None:
        self.cancelled = True


class _Method:
    def __init__(self, make) -> None:
        self.make = make

    def remote(self, *args):
        return self.make(*args)


class FakeHandle:
    """``generate`` answers from ``self.streams`` in order; ``stats`` from ``self.stats_value``."""

    def __init__(self) -> None:
        self.streams: list[FakeStream] = []
        self.issued: list[FakeStream] = []
        self.stats_value: object = {"alive": True, "running": 0, "waiting": 0}
        self.stats_calls: list[FakeResponse] = []
        self.generate = _Method(self._generate)
        self.stats = _Method(self._stats)

    def options(self, **_):
        return self

    def _generate(self, request):
        stream = self.streams.pop(0)
        self.issued.append(stream)
        return stream

    def _stats(self):
        response = FakeResponse(self.stats_value)
        self.stats_calls.append(response)
        return response


def _event(i: int, finish: str | None = None) -> TokenEvent:
    return TokenEvent("r", 40 + i, "x", -0.5, None, {"weights": {"a": 0.5, "b": 0.5}}, finish)


@pytest.fixture
def backend(tiny):
    spec = {"name": "mix", "method": "mixture",
            "members": [{"name": "a", "model": str(tiny["a"])}, {"name": "b", "model": str(tiny["b"])}]}
    info = {"name": "mix", "method": "mixture", "members": ["a", "b"], "max_context": 256, "vocab_size": 320,
            "solo": {"a": {"weights": {"a": 1.0}}, "b": {"weights": {"b": 1.0}}}, "max_batch": 4, "max_queue": 8}
    handle = FakeHandle()
    ray_backend = ingress.RayBackend({"mix": handle}, {"mix": spec}, [info])
    ray_backend.fake = handle
    return ray_backend


def _request(n: int = 4) -> Request:
    return Request([5, 6, 7], SamplingParams(max_tokens=n))


def test_a_refused_choice_cancels_its_admitted_siblings(backend):
    """Item 11: the first choice's remote stream was never cancelled (``_relay`` closed before it
    started runs no ``finally``), so the replica generated it to max_tokens."""
    first = FakeStream([ADMITTED, _event(0), _event(1)])
    backend.fake.streams = [first, FakeStream([QueueFullError("full", retry_after=2)])]
    serving = OpenAIServing(backend)
    body = CompletionRequest(model="mix", prompt="The quick", max_tokens=4, n=2)
    with pytest.raises(QueueFullError):
        asyncio.run(serving.create_completion(body))
    assert first.cancelled
    text = backend.serving_metrics.render()[0].decode()
    assert 'compose_serve:request_rejected_total{model_name="mix"} 1.0' in text
    assert 'compose_serve:request_success_total{finished_reason="abort",model_name="mix"} 1.0' in text


def test_health_answers_within_a_second_when_a_replica_hangs(backend):
    backend.fake.stats_value = None  # no replica takes the call

    async def main():
        started = time.perf_counter()
        alive = await backend.health()
        return alive, time.perf_counter() - started

    alive, seconds = asyncio.run(main())
    assert alive == {"mix": False} and seconds < 1.0
    assert backend.fake.stats_calls[-1].cancelled


def test_a_dead_replica_fails_fast_and_comes_back(backend, monkeypatch):
    """Item 7: after the replica died, requests waited silently for the restart; now they get a
    503 with Retry-After at once, and serving resumes when a probe finds the replica back."""
    monkeypatch.setattr(ingress, "ADMIT_TIMEOUT_S", 0.2)
    monkeypatch.setattr(ingress, "PROBE_EVERY_S", 0.05)
    backend.fake.stats_value = None  # the replica is gone

    async def main():
        silent = FakeStream([], hang=True)
        backend.fake.streams = [silent]
        with pytest.raises(EngineDeadError) as no_ack:
            await backend.generate("mix", _request())
        assert silent.cancelled and no_ack.value.retry_after
        started = time.perf_counter()
        with pytest.raises(EngineDeadError):  # refused at once, no handle call
            await backend.generate("mix", _request())
        assert time.perf_counter() - started < 0.05 and not backend.fake.streams
        assert await backend.health() == {"mix": False}
        backend.fake.stats_value = {"alive": True}  # the new replica answers
        for _ in range(100):
            if backend._in_flight["mix"].alive:
                break
            await asyncio.sleep(0.02)
        backend.fake.streams = [FakeStream([ADMITTED, _event(0), _event(1, "length")])]
        stream = await backend.generate("mix", _request(2))
        events = [e async for e in stream]
        await backend.close()
        return events

    assert [e.finish_reason for e in asyncio.run(main())] == [None, "length"]


def test_a_replica_dying_mid_stream_ends_the_stream_with_a_503(backend, monkeypatch):
    monkeypatch.setattr(ingress, "PROBE_EVERY_S", 0.05)
    backend.fake.streams = [FakeStream([ADMITTED, _event(0), RuntimeError("ActorDiedError")])]

    async def main():
        stream = await backend.generate("mix", _request())
        first = await stream.__anext__()
        with pytest.raises(EngineDeadError) as died:
            await stream.__anext__()
        await backend.close()
        return first, died.value

    first, died = asyncio.run(main())
    assert first.token_id == 40 and died.status_code == 503 and died.retry_after
    text = backend.serving_metrics.render()[0].decode()
    assert 'compose_serve:request_success_total{finished_reason="error",model_name="mix"} 1.0' in text


def test_metrics_have_the_same_names_in_process_and_under_ray(backend):
    """Item 13: under Ray /metrics had three counters under other names and no engine gauges."""

    class Idle:
        def stats(self):
            return backend._in_flight["mix"].stats()

    def families(text: str) -> set[str]:
        return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}

    in_process = ServingMetrics([Idle()]).render()[0].decode()
    under_ray = asyncio.run(backend.metrics())[0].decode()
    assert families(under_ray) == families(in_process)
    for name in ("compose_serve:num_requests_running", "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:time_to_first_token_seconds", "vllm:generation_tokens_total", "vllm:e2e_request_latency_seconds"):
        assert name in families(under_ray)


def test_the_ingress_checks_a_request_before_any_part_is_queued(backend):
    from compose_serve.errors import ContextLengthError

    with pytest.raises(ContextLengthError) as too_long:
        backend.check("mix", Request([5] * 300, SamplingParams(max_tokens=2)))
    assert too_long.value.param == "prompt" and not backend.fake.issued


def test_serve_run_configs_take_the_api_key_from_the_environment(monkeypatch):
    """Item 13: ``serve run deployments/*.yaml`` ignored COMPOSE_SERVE_API_KEY."""
    seen = {}
    monkeypatch.setattr(builder, "build_app", lambda configs, **kw: seen.update(kw))
    monkeypatch.setenv("COMPOSE_SERVE_API_KEY", "sesame")
    builder.app_builder({"configs": ["default"]})
    assert seen["api_key"] == "sesame"
    builder.app_builder({"configs": ["default"], "api_key": "own"})
    assert seen["api_key"] == "own"


def test_a_hung_member_replica_times_out_instead_of_wedging_the_step():
    """Item 12: ``_Pending.result()`` waited forever on a member replica that never answered."""

    class Hung:
        cancelled = False

        def result(self, timeout_s=None):
            if timeout_s is None:
                raise AssertionError("a member call without a timeout would wait forever")
            raise TimeoutError

        def cancel(self):
            self.cancelled = True

    hung = Hung()
    handle = type("H", (), {"prefill": _Method(lambda *a: hung), "decode": _Method(lambda *a: hung)})()
    member = RemoteMember.__new__(RemoteMember)
    member.handle, member.name, member.timeout_s = handle, "a", 0.1
    member.device, member._live, member._released = __import__("torch").device("cpu"), [], []
    pending = member.prefill([0], [[5, 6]])
    with pytest.raises(TimeoutError, match="member 'a' did not answer within 0.1 s"):
        pending.result()
    assert hung.cancelled


def test_a_prompt_scored_with_max_tokens_zero_crosses_the_ingress(backend, tiny):
    """The one event of a ``max_tokens: 0`` request (no token, the prompt's log-probs), made by a
    real engine and pickled as Ray carries it, through the ingress to an echo response."""
    import pickle

    from compose_serve.composition import build_composition
    from compose_serve.engine import Engine

    engine = Engine(build_composition(backend.specs["mix"]), max_batch=1)
    ids = [5, 6, 7]
    (event,) = engine.add([Request(ids, SamplingParams(max_tokens=0, prompt_logprobs=1))])
    backend.fake.streams = [FakeStream([ADMITTED, [pickle.loads(pickle.dumps(event))]])]
    body = CompletionRequest(model="mix", prompt=ids, echo=True, logprobs=1, max_tokens=0)
    out = asyncio.run(OpenAIServing(backend).create_completion(body))
    choice = out.choices[0]
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == [e.logprob for e in event.prompt_logprobs[1:]]
    text = backend.serving_metrics.render()[0].decode()
    assert 'compose_serve:request_success_total{finished_reason="length",model_name="mix"} 1.0' in text
    assert 'compose_serve:generation_tokens_total{model_name="mix"} 0.0' in text
