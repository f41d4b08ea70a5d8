"""Continuous batching over HTTP: concurrency changes no result; cancels free slots; 429 past the
queue bound while every admitted request completes. Steps of the ``held`` composition are held
(``HeldEngine.go``) so that what these tests count never depends on this machine's speed."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from compose_serve.engine import Request
from compose_serve.sampling import SamplingParams

from .live import reference

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


def _spec(i: int) -> dict:
    """Request i: its own prompt and length; greedy when even, seeded sampling when odd."""
    spec = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 2 + (i * 7) % 15, "temperature": 0.0}
    if i % 2:
        spec.update(temperature=0.8, seed=1000 + i)
    return spec


def _metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(rf"{re.escape(name)}\{{(.*)\}} (\S+)", line)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            return float(m.group(2))
    return 0.0


def test_sixteen_concurrent_requests_equal_each_alone(live, tok, tiny):
    specs = [_spec(i) for i in range(16)]
    wants = reference(
        tiny,
        "tiny-mix",
        [
            Request(
                tok.encode(s["prompt"]),
                SamplingParams(
                    max_tokens=s["max_tokens"],
                    temperature=s["temperature"],
                    seed=s.get("seed"),
                    ignore_eos=True,
                ),
            )
            for s in specs
        ],
    )

    async def one(client, i):
        await asyncio.sleep(0.004 * (i % 6))  # arrivals spread over several steps
        out = await client.completions.create(
            model="tiny-mix", extra_body={"ignore_eos": True}, **specs[i]
        )
        return out.choices[0].text, out.usage.completion_tokens

    async def main():
        async with openai.AsyncOpenAI(base_url=live.base_url, api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(16)))

    results = asyncio.run(main())
    assert [text for text, _ in results] == [w.text for w in wants]
    assert [n for _, n in results] == [s["max_tokens"] for s in specs]
    assert live.engines["tiny-mix"].stats().running == 0
    metrics = httpx.get(live.url + "/metrics").text
    model = {"model_name": "tiny-mix"}
    assert _metric(metrics, "compose_serve:time_to_first_token_seconds_count", **model) == 16
    assert _metric(metrics, "compose_serve:inter_token_latency_seconds_count", **model) == sum(
        s["max_tokens"] - 1 for s in specs
    )
    assert _metric(metrics, "compose_serve:generation_tokens_total", **model) == sum(
        s["max_tokens"] for s in specs
    )
    assert (
        _metric(metrics, "compose_serve:request_success_total", finished_reason="length", **model)
        == 16
    )
    for member in ("a", "b"):  # default weights 0.5 / 0.5: the mean over requests is 0.5
        labels = {"member": member, **model}
        count = _metric(metrics, "compose_serve:member_weight_count", **labels)
        assert count == 16
        assert _metric(
            metrics, "compose_serve:member_weight_sum", **labels
        ) / count == pytest.approx(0.5)


def test_cancelled_stream_frees_its_slot(live, tok):
    held = live.engines["held"]
    held.engine.delay = 0.02  # 200 tokens would take 4 s; the cancel comes after 3 chunks
    metrics_before = httpx.get(live.url + "/metrics").text
    try:
        with openai.OpenAI(base_url=live.base_url, api_key="x", max_retries=0) as client:
            stream = client.completions.create(
                model="held",
                prompt="The quick brown",
                max_tokens=200,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for _, _chunk in zip(range(3), stream, strict=False):
                pass
            assert held.stats().running == 1
            stream.close()
        for _ in range(500):  # poll until the server noticed (bounded; no speed assumption)
            if held.stats().running == 0:
                break
            time.sleep(0.01)
        assert held.stats().running == 0 and held.engine.free_slots == 1
    finally:
        held.engine.delay = 0.0
    metrics = httpx.get(live.url + "/metrics").text
    aborted = _metric(
        metrics, "compose_serve:request_success_total", finished_reason="abort", model_name="held"
    )
    assert (
        aborted
        == _metric(
            metrics_before,
            "compose_serve:request_success_total",
            finished_reason="abort",
            model_name="held",
        )
        + 1
    )
    assert _metric(metrics, "compose_serve:num_requests_running", model_name="held") == 0
    tokens = _metric(metrics, "compose_serve:generation_tokens_total", model_name="held") - _metric(
        metrics_before, "compose_serve:generation_tokens_total", model_name="held"
    )
    assert 3 <= tokens < 200
    later = httpx.post(
        live.base_url + "/completions",
        json={"model": "held", "prompt": "2 +", "max_tokens": 4, "ignore_eos": True},
        timeout=30,
    )
    assert later.status_code == 200 and later.json()["usage"]["completion_tokens"] == 4


def test_flood_past_the_queue_bound_gets_429_and_admitted_requests_complete(live):
    held = live.engines["held"]  # max_batch 1, max_queue 2: three requests fit
    body = {
        "model": "held",
        "prompt": "The quick brown",
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
    }

    async def main():
        async with httpx.AsyncClient(base_url=live.base_url, timeout=60) as client:
            held.engine.go.clear()
            tasks = [
                asyncio.ensure_future(client.post("/completions", json=body)) for _ in range(7)
            ]
            refused = []
            while len(refused) < 4:  # the refusals come back while every step is held
                done, _ = await asyncio.wait(
                    [t for t in tasks if t not in refused],
                    timeout=30,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                assert done, "no answer while steps are held"
                refused.extend(done)
            assert held.stats().running + held.stats().waiting == 3
            held.engine.go.set()
            return [t.result() for t in refused], [await t for t in tasks if t not in refused]

    try:
        refused, admitted = asyncio.run(main())
    finally:
        held.engine.go.set()
    assert [r.status_code for r in refused] == [429] * 4
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1
        assert (
            r.json()["error"]["type"] == "rate_limit_error"
            and r.json()["error"]["code"] == "rate_limit_exceeded"
        )
    texts = {r.json()["choices"][0]["text"] for r in admitted}
    assert [r.status_code for r in admitted] == [200] * 3 and len(texts) == 1  # greedy: one answer
    assert [r.json()["usage"]["completion_tokens"] for r in admitted] == [5, 5, 5]
    metrics = httpx.get(live.url + "/metrics").text
    assert _metric(metrics, "compose_serve:request_rejected_total", model_name="held") >= 4


def test_client_gone_before_the_whole_response_aborts_it(live):
    held = live.engines["held"]
    held.engine.delay = 0.02  # 150 tokens would take 3 s; the client leaves after 0.5 s
    before = httpx.get(live.url + "/metrics").text
    body = {"model": "held", "prompt": "The quick", "max_tokens": 150, "ignore_eos": True}
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                live.base_url + "/completions", json=body, timeout=httpx.Timeout(30, read=0.5)
            )
        for _ in range(500):
            if held.stats().running == 0:
                break
            time.sleep(0.01)
    finally:
        held.engine.delay = 0.0
    after = httpx.get(live.url + "/metrics").text
    labels = {"finished_reason": "abort", "model_name": "held"}
    assert (
        _metric(after, "compose_serve:request_success_total", **labels)
        == _metric(before, "compose_serve:request_success_total", **labels) + 1
    )
    generated = _metric(
        after, "compose_serve:generation_tokens_total", model_name="held"
    ) - _metric(before, "compose_serve:generation_tokens_total", model_name="held")
    assert generated < 150 and held.engine.free_slots == 1


def test_a_stream_that_fails_sends_one_error_event_and_closes(live):
    held = live.engines["held"]
    body = {
        "model": "held",
        "prompt": "The quick",
        "max_tokens": 20,
        "ignore_eos": True,
        "stream": True,
    }
    held.engine.go.clear()  # the first token comes from the prefill; the failure is the next step
    try:
        with httpx.stream(
            "POST", live.base_url + "/completions", json=body, timeout=30
        ) as response:
            assert response.status_code == 200
            held.engine.fail_next = True
            held.engine.go.set()
            data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    finally:
        held.engine.go.set()
        held.engine.fail_next = False
    errors = [line for line in data if '"error"' in line]
    assert len(errors) == 1 and data[-1] == errors[0]  # one error event, last, and no [DONE]
    assert json.loads(errors[0])["error"]["type"] == "internal_error"
    assert "injected step failure" in json.loads(errors[0])["error"]["message"]
    later = httpx.post(
        live.base_url + "/completions", json={**body, "stream": False, "max_tokens": 3}
    )
    assert later.status_code == 200 and later.json()["usage"]["completion_tokens"] == 3
