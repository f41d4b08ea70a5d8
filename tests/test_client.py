"""ComposeClient and AsyncComposeClient: against a live server (answers equal the plain Engine's),
and against httpx.MockTransport for retries, Retry-After, timeouts and stream errors."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from transformers import AutoTokenizer

from compose_serve import client as client_module
from compose_serve.client import (
    APIConnectionError,
    APITimeoutError,
    AsyncComposeClient,
    BadRequestError,
    ComposeClient,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
)
from compose_serve.engine import Request
from compose_serve.errors import InvalidRequestError, ModelNotFoundError, QueueFullError
from compose_serve.sampling import SamplingParams
from tests.http.live import reference, start_server

MESSAGES = [{"role": "user", "content": "2 + 2 ="}]


@pytest.fixture(scope="module")
def live(tiny):
    server, _ = start_server(tiny)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tok(tiny):
    return AutoTokenizer.from_pretrained(tiny["tokenizer"])


def _chat_ids(tok):
    return list(
        tok.apply_chat_template(
            MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


# -- against the live server --------------------------------------------------------------------
def test_sync_chat_streamed_and_not_equal_the_engine(live, tok, tiny):
    weights = {"a": 0.2, "b": 0.8}
    want, want_weighted = reference(
        tiny,
        "tiny-mix",
        [
            Request(_chat_ids(tok), SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)),
            Request(
                _chat_ids(tok),
                SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True, logprobs=0),
                {"weights": weights},
            ),
        ],
    )
    with ComposeClient(live.base_url, max_retries=0) as client:
        out = client.chat.completions.create(
            model="tiny-mix", messages=MESSAGES, max_tokens=7, temperature=0, ignore_eos=True
        )
        assert out.choices[0].message.content == want.text
        assert out.usage.completion_tokens == 7 and out.usage.prompt_tokens == len(_chat_ids(tok))
        weighted = client.chat.completions.create(
            model="tiny-mix",
            messages=MESSAGES,
            max_tokens=7,
            temperature=0,
            ignore_eos=True,
            logprobs=True,
            composition={"weights": weights},
        )
        assert weighted.choices[0].message.content == want_weighted.text
        assert [e.logprob for e in weighted.choices[0].logprobs.content] == pytest.approx(
            want_weighted.logprobs, abs=1e-4
        )
        assert weighted.choices[0].composition.weights == pytest.approx(weights)
        stream = client.chat.completions.create(
            model="tiny-mix",
            messages=MESSAGES,
            max_tokens=7,
            temperature=0,
            ignore_eos=True,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert stream.response.is_closed
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        assert chunks[-1].usage.completion_tokens == 7


def test_sync_completions_n_seed_and_early_close(live, tok, tiny):
    wants = reference(
        tiny,
        "tiny-mix",
        [
            Request(
                tok.encode("The quick"),
                SamplingParams(max_tokens=6, temperature=1.0, seed=5 + i, ignore_eos=True),
            )
            for i in range(2)
        ],
    )
    with ComposeClient(live.base_url, max_retries=0) as client:
        out = client.completions.create(
            model="tiny-mix", prompt="The quick", max_tokens=6, n=2, seed=5, ignore_eos=True
        )
        assert [c.text for c in out.choices] == [w.text for w in wants]
        with client.completions.create(
            model="tiny-mix", prompt="The quick", max_tokens=50, ignore_eos=True, stream=True
        ) as stream:
            first = next(iter(stream))
            assert first.choices[0].index == 0
        assert stream.response.is_closed
        assert [m.id for m in client.models.list().data][:3] == ["tiny-mix", "tiny-delta", "held"]
        assert client.models.retrieve("a").parent == "tiny-mix"
        assert client.health()["status"] == "ok"


def test_sync_errors_are_typed_and_are_project_errors(live):
    with ComposeClient(live.base_url, max_retries=0) as client:
        with pytest.raises(NotFoundError) as missing:
            client.completions.create(model="nope", prompt="x")
        assert isinstance(missing.value, ModelNotFoundError) and missing.value.status_code == 404
        with pytest.raises(BadRequestError) as bad:
            client.chat.completions.create(model="tiny-mix", messages=MESSAGES, top_p=3.0)
        assert isinstance(bad.value, InvalidRequestError) and bad.value.param == "top_p"


def test_async_client_concurrent_equals_the_engine(live, tok, tiny):
    prompts = ["The quick", "def add(a, b):", "2 +", "Una"]
    wants = reference(
        tiny,
        "tiny-mix",
        [
            Request(tok.encode(p), SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
            for p in prompts
        ],
    )

    async def main():
        async with AsyncComposeClient(live.base_url, max_retries=0) as client:
            outs = await asyncio.gather(
                *(
                    client.completions.create(
                        model="tiny-mix", prompt=p, max_tokens=5, temperature=0, ignore_eos=True
                    )
                    for p in prompts
                )
            )
            stream = await client.chat.completions.create(
                model="tiny-mix", messages=MESSAGES, max_tokens=4, ignore_eos=True, stream=True
            )
            pieces = [c async for c in stream]
            with pytest.raises(NotFoundError):
                await client.chat.completions.create(model="nope", messages=MESSAGES)
            models = await client.models.list()
            return outs, pieces, stream, models

    outs, pieces, stream, models = asyncio.run(main())
    assert [o.choices[0].text for o in outs] == [w.text for w in wants]
    assert (
        pieces[0].choices[0].delta.role == "assistant"
        and pieces[-1].choices[0].finish_reason == "length"
    )
    assert stream.response.is_closed
    assert "a" in {m.id for m in models.data}


# -- retries and failures, against a scripted transport ----------------------------------------
def _scripted(answers: list):
    """A MockTransport answering each call with the next item (a Response or an exception)."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content) if request.content else None)
        answer = answers[min(len(calls) - 1, len(answers) - 1)]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handler), calls


def _error(status: int, kind: str, headers=None) -> httpx.Response:
    return httpx.Response(
        status,
        json={"error": {"message": "no", "type": kind, "param": None, "code": None}},
        headers=headers,
    )


def _ok() -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "id": "c",
            "object": "text_completion",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        },
    )


@pytest.fixture
def sleeps(monkeypatch):
    waited: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", waited.append)

    async def fake_sleep(seconds):
        waited.append(seconds)

    monkeypatch.setattr(client_module.asyncio, "sleep", fake_sleep)
    return waited


def test_429_is_retried_after_retry_after(sleeps):
    transport, calls = _scripted([_error(429, "rate_limit_error", {"Retry-After": "3"}), _ok()])
    client = ComposeClient(
        "http://x/v1", http_client=httpx.Client(transport=transport), max_retries=2
    )
    out = client.completions.create(model="m", prompt="p", composition={"weights": {"a": 1.0}})
    assert out.choices[0].text == "hi" and len(calls) == 2 and sleeps == [3.0]
    assert calls[0]["composition"] == {"weights": {"a": 1.0}} and calls[0]["stream"] is False


def test_5xx_backs_off_then_raises_typed(sleeps):
    transport, calls = _scripted([_error(503, "service_unavailable")])
    client = ComposeClient(
        "http://x/v1", http_client=httpx.Client(transport=transport), max_retries=2
    )
    with pytest.raises(ServiceUnavailableError):
        client.completions.create(model="m", prompt="p")
    assert len(calls) == 3
    assert 0.375 <= sleeps[0] <= 0.625 and 0.75 <= sleeps[1] <= 1.25  # 0.5 s doubling, +-25 %


def test_400_is_not_retried_and_429_ends_as_rate_limit(sleeps):
    transport, calls = _scripted([_error(400, "invalid_request_error")])
    client = ComposeClient(
        "http://x/v1", http_client=httpx.Client(transport=transport), max_retries=3
    )
    with pytest.raises(BadRequestError):
        client.completions.create(model="m", prompt="p")
    assert len(calls) == 1 and sleeps == []
    transport, _ = _scripted([_error(429, "rate_limit_error", {"Retry-After": "120"})])
    client = ComposeClient(
        "http://x/v1",
        http_client=httpx.Client(transport=transport),
        max_retries=1,
        max_retry_after=10,
    )
    with pytest.raises(RateLimitError) as limited:
        client.completions.create(model="m", prompt="p")
    assert isinstance(limited.value, QueueFullError) and limited.value.retry_after == 120.0
    assert sleeps == [10]  # Retry-After is capped


def test_connection_failures_and_timeouts(sleeps):
    transport, calls = _scripted([httpx.ConnectError("refused")])
    client = ComposeClient(
        "http://x/v1", http_client=httpx.Client(transport=transport), max_retries=1
    )
    with pytest.raises(APIConnectionError):
        client.models.list()
    assert len(calls) == 2
    transport, _ = _scripted([httpx.ReadTimeout("slow"), _ok()])
    client = ComposeClient(
        "http://x/v1", http_client=httpx.Client(transport=transport), max_retries=0
    )
    with pytest.raises(APITimeoutError):
        client.completions.create(model="m", prompt="p")


def test_a_stream_error_event_raises_and_done_stops():
    events = (
        b'data: {"id":"c","object":"text_completion","created":1,"model":"m","choices":'
        b'[{"index":0,"text":"a"}]}\n\n'
        b'data: {"error":{"message":"step failed","type":"internal_error","param":null,"code":null}}\n\n'
    )
    transport, _ = _scripted(
        [httpx.Response(200, content=events, headers={"content-type": "text/event-stream"})]
    )
    client = ComposeClient(
        "http://x/v1", http_client=httpx.Client(transport=transport), max_retries=0
    )
    stream = client.completions.create(model="m", prompt="p", stream=True)
    got = []
    with pytest.raises(client_module.InternalServerError, match="step failed"):
        for chunk in stream:
            got.append(chunk.choices[0].text)
    assert got == ["a"] and stream.response.is_closed
    done = (
        b'data: {"id":"c","object":"text_completion","created":1,"model":"m","choices":[]}\n\ndata: [DONE]\n\n'
        b'data: {"never": "read"}\n\n'
    )
    transport, _ = _scripted([httpx.Response(200, content=done)])
    client = ComposeClient(
        "http://x/v1", http_client=httpx.Client(transport=transport), max_retries=0
    )
    assert len(list(client.completions.create(model="m", prompt="p", stream=True))) == 1


def test_async_retries_honour_retry_after(sleeps):
    transport, calls = _scripted(
        [
            _error(429, "rate_limit_error", {"Retry-After": "2"}),
            _error(502, "internal_error"),
            _ok(),
        ]
    )

    async def main():
        async with AsyncComposeClient(
            "http://x/v1", http_client=httpx.AsyncClient(transport=transport), max_retries=2
        ) as client:
            return await client.completions.create(model="m", prompt="p")

    out = asyncio.run(main())
    assert out.choices[0].text == "hi" and len(calls) == 3
    assert sleeps[0] == 2.0 and 0.75 <= sleeps[1] <= 1.25
