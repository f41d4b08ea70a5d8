"""Bad input gets a 4xx in OpenAI's error shape naming the problem; the server keeps serving."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from .live import start_server

CHAT = {"model": "tiny-mix", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
COMPLETION = {"model": "tiny-mix", "prompt": "The quick", "max_tokens": 3}

# (route, body, status, param, words the message must contain)
BAD = [
    ("chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature", "number"),
    ("chat/completions", {**CHAT, "temperature": -1}, 400, "temperature", "[0.0, inf)"),
    ("chat/completions", {**CHAT, "top_p": 0}, 400, "top_p", "(0.0, 1.0]"),
    ("chat/completions", {**CHAT, "n": 0}, 400, "n", ">= 1"),
    ("chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    (
        "chat/completions",
        {**CHAT, "max_completion_tokens": -2},
        400,
        "max_completion_tokens",
        ">= 1",
    ),
    ("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs", "20"),
    ("chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    ("chat/completions", {**CHAT, "messages": []}, 400, "messages", "at least one"),
    ("chat/completions", {**CHAT, "messages": "hi"}, 400, "messages", "list"),
    (
        "chat/completions",
        {**CHAT, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages.0.role",
        "user",
    ),
    (
        "chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages.0.content.0.type",
        "text",
    ),
    ("chat/completions", {k: v for k, v in CHAT.items() if k != "model"}, 400, "model", "required"),
    ("chat/completions", {**CHAT, "model": "gpt-4"}, 404, "model", "gpt-4"),
    ("chat/completions", {**CHAT, "max_tokens": 5000}, 400, "max_tokens", "context length"),
    (
        "chat/completions",
        {**CHAT, "composition": {"weights": {"zz": 1.0}}},
        400,
        "composition.weights",
        "zz",
    ),
    (
        "chat/completions",
        {**CHAT, "composition": {"weights": {"a": 0.7, "b": 0.7}}},
        400,
        "composition.weights",
        "sum to 1",
    ),
    ("chat/completions", {**CHAT, "composition": {"alpha": 2}}, 400, "composition.alpha", "alpha"),
    (
        "chat/completions",
        {**CHAT, "model": "a", "composition": {"weights": {"a": 1.0}}},
        400,
        "composition",
        "member",
    ),
    (  # structured outputs: tools are served; a malformed one is named
        "chat/completions",
        {**CHAT, "tools": [{"type": "function"}]},
        400,
        "tools.0.function",
        "must be an object",
    ),
    (
        "chat/completions",
        {**CHAT, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        "stream",
    ),
    ("completions", {**COMPLETION, "prompt": ""}, 400, "prompt", "empty"),
    ("completions", {**COMPLETION, "prompt": []}, 400, "prompt", "empty"),
    ("completions", {**COMPLETION, "prompt": [1, "a"]}, 400, "prompt", "accepted type"),
    ("completions", {**COMPLETION, "prompt": [99999]}, 400, "prompt", "vocabulary"),
    ("completions", {**COMPLETION, "prompt": "x " * 300}, 400, "prompt", "context length"),  # alone too long
    ("completions", {**COMPLETION, "logit_bias": {"abc": 1}}, 400, "logit_bias", "token ids"),
    ("completions", {**COMPLETION, "stop": ["a"] * 20}, 400, "stop", "16"),
    (  # echo with logprobs is served (prompt log-probs); vLLM's field refuses a stream, as vLLM
        "completions",
        {**COMPLETION, "prompt_logprobs": 1, "stream": True},
        400,
        "prompt_logprobs",
        "stream",
    ),
    ("completions", {**COMPLETION, "prompt_logprobs": 21}, 400, "prompt_logprobs", "20"),
    ("completions", {**COMPLETION, "max_tokens": 0}, 400, "max_tokens", "1"),
    ("completions", {**COMPLETION, "suffix": "x"}, 400, "suffix", "not supported"),
    ("completions", {**COMPLETION, "seed": 1.5}, 400, "seed", "integer"),
    ("completions", {**COMPLETION, "n": 1000}, 400, "n", "64"),
]


def _check_error(response: httpx.Response, status: int, param: str | None, words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert words.lower() in error["message"].lower(), error
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


@pytest.mark.parametrize(
    ("route", "body", "status", "param", "words"),
    BAD,
    ids=[f"{b[0]}:{b[3]}:{i}" for i, b in enumerate(BAD)],
)
def test_bad_request_named(live, route, body, status, param, words):
    _check_error(
        httpx.post(f"{live.base_url}/{route}", json=body, timeout=30), status, param, words
    )


def test_malformed_json_and_non_json_bodies(live):
    broken = httpx.post(
        f"{live.base_url}/completions",
        content=b'{"model": "tiny-mix", "prompt": ',
        headers={"content-type": "application/json"},
    )
    _check_error(broken, 400, None, "not valid JSON")
    not_object = httpx.post(f"{live.base_url}/completions", json=[1, 2])
    _check_error(not_object, 400, None, "JSON object")


def test_unknown_route_and_method_are_openai_errors(live):
    missing = httpx.get(f"{live.base_url}/embeddings")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong_method = httpx.get(f"{live.base_url}/completions")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_openai_client_raises_typed_errors(live):
    with openai.OpenAI(base_url=live.base_url, api_key="x", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "x"}]
            )
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model="tiny-mix", prompt="x", temperature=5.0, top_p=2.0)
    assert bad.value.body["param"] == "top_p"


def test_bad_requests_do_not_disturb_good_ones(live):
    good = {**COMPLETION, "max_tokens": 6, "temperature": 0, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(base_url=live.base_url, timeout=60) as client:
            posts = []
            for i, (route, body, *_rest) in enumerate(BAD):
                posts.append(client.post(f"/{route}", json=body))
                if i % 4 == 0:
                    posts.append(client.post("/completions", json=good))
            return await asyncio.gather(*posts)

    answers = asyncio.run(main())
    good_ones = [a for a in answers if a.status_code == 200]
    assert len(good_ones) == len(range(0, len(BAD), 4))
    assert (
        len({a.json()["choices"][0]["text"] for a in good_ones}) == 1
    )  # greedy: the same text each time
    assert all(a.json()["usage"]["completion_tokens"] == 6 for a in good_ones)
    assert sorted({a.status_code for a in answers}) == [200, 400, 404]
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_api_key_guards_every_route_but_health(tiny):
    server, _ = start_server(tiny, api_key="sesame")
    try:
        assert httpx.get(server.url + "/health").status_code == 200
        for path in ("/v1/models", "/metrics"):
            denied = httpx.get(server.url + path)
            assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        wrong = httpx.post(
            server.base_url + "/completions",
            json=COMPLETION,
            headers={"Authorization": "Bearer no"},
        )
        assert wrong.status_code == 401
        with openai.OpenAI(base_url=server.base_url, api_key="sesame", max_retries=0) as client:
            assert client.completions.create(**COMPLETION).usage.completion_tokens >= 1
            assert (
                httpx.get(
                    server.url + "/metrics", headers={"Authorization": "Bearer sesame"}
                ).status_code
                == 200
            )
    finally:
        server.stop()
