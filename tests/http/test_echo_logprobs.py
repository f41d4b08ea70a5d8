"""Prompt log-probs over HTTP: ``echo`` with ``logprobs`` (OpenAI's shape), ``max_tokens: 0``, and
vLLM's ``prompt_logprobs`` field on completions and chat, streamed and not.

The values are the engine's own (``Engine.generate`` on a separately loaded copy of the
composition, each request alone), which ``tests/engine/test_prompt_logprobs.py`` checks against
the formulas by hand; here the translation, the shapes and the SDK's parsing are under test.
"""

from __future__ import annotations

import json
import math

import httpx
import openai
import pydantic
import pytest

from compose_serve.composition import build_composition
from compose_serve.config import parse_composition
from compose_serve.engine import Engine, Request
from compose_serve.sampling import SamplingParams

from .live import serve_specs, specs

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "2 + 2 ="}]


def _contrastive(tiny) -> dict:
    """Contrastive decoding: its plausibility cut gives most prompt tokens a log-prob of -inf."""
    return {
        "name": "tiny-cd",
        "method": "delta",
        "members": [
            {"name": "expert", "model": str(tiny["a"])},
            {"name": "antiexpert", "model": str(tiny["b"])},
        ],
        "params": {"alpha": 0.5, "plausibility": 0.5},
    }


@pytest.fixture(scope="module")
def server(tiny):
    live, engines = serve_specs([specs(tiny)["tiny-mix"], _contrastive(tiny)])
    yield live
    live.stop()
    for engine in engines.values():
        engine.close(timeout=30)


@pytest.fixture(scope="module")
def engines(tiny):
    """A separate copy of each served composition, for the reference values."""
    spec = {"tiny-mix": specs(tiny)["tiny-mix"], "tiny-cd": _contrastive(tiny)}
    return {
        name: Engine(build_composition(parse_composition(s)), max_batch=1)
        for name, s in spec.items()
    }


def _want(engines, name: str, ids: list[int], **params):
    return engines[name].generate([Request(list(ids), SamplingParams(**params))])[0]


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=60)


def _text(tok, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _sse(response: httpx.Response) -> list[dict]:
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _check_echo_logprobs(logprobs: dict, tok, want, n: int, prompt_text: str) -> None:
    """OpenAI's echo shape over prompt + generated tokens against the engine's values."""
    ids = want.prompt_ids
    texts = [_text(tok, t) for t in ids + want.token_ids]
    assert logprobs["tokens"] == texts
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    prompt_lps = [e.logprob for e in want.prompt_logprobs[1:]]
    assert logprobs["token_logprobs"][1:] == pytest.approx(prompt_lps + want.logprobs, abs=1e-5)
    for t, entry in enumerate(want.prompt_logprobs[1:], start=1):
        top = logprobs["top_logprobs"][t]
        expected = {_text(tok, i): lp for i, lp in entry.top[:n]}
        expected.setdefault(texts[t], entry.logprob)  # the prompt token too, as OpenAI does
        assert top == pytest.approx(expected, abs=1e-5)
        assert len(top) <= n + 1
    offsets = [sum(len(x) for x in texts[:t]) for t in range(len(ids))]
    offsets += [
        len(prompt_text) + sum(len(x) for x in texts[len(ids) : t])
        for t in range(len(ids), len(texts))
    ]
    assert logprobs["text_offset"] == offsets


def _only_the_first_nulls_break_the_sdk_types(body: dict) -> None:
    """``openai.types.Completion`` types ``token_logprobs`` as ``List[float]``, yet OpenAI's echo
    answers null for the first token: those two entries are the only mismatch."""
    try:
        openai.types.Completion.model_validate(body)
    except pydantic.ValidationError as exc:
        locs = {tuple(e["loc"]) for e in exc.errors()}
        nulls = {
            ("choices", c, "logprobs", field, 0)
            for c in range(len(body["choices"]))
            for field in ("token_logprobs", "top_logprobs")
        }
        assert locs == nulls, exc.errors()
    else:
        pytest.fail("the first prompt token's null entries are expected")


def test_echo_with_logprobs_returns_prompt_and_generated_tokens(server, tok, engines):
    ids = tok.encode(PROMPT)
    want = _want(
        engines,
        "tiny-mix",
        ids,
        max_tokens=3,
        temperature=0.0,
        ignore_eos=True,
        logprobs=2,
        prompt_logprobs=2,
    )
    body = {
        "model": "tiny-mix",
        "prompt": PROMPT,
        "echo": True,
        "logprobs": 2,
        "max_tokens": 3,
        "temperature": 0,
        "ignore_eos": True,
    }
    out = _post(server, "/completions", body)
    assert out.status_code == 200, out.text
    data = out.json()
    choice = data["choices"][0]
    assert choice["text"] == PROMPT + want.text
    assert choice["finish_reason"] == "length"
    assert "prompt_logprobs" not in choice or choice["prompt_logprobs"] is None  # not asked for
    _check_echo_logprobs(choice["logprobs"], tok, want, 2, PROMPT)
    assert data["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 3,
        "total_tokens": len(ids) + 3,
    }
    _only_the_first_nulls_break_the_sdk_types(data)
    with openai.OpenAI(
        base_url=server.base_url, api_key="unused", max_retries=0
    ) as client:  # the SDK parses it
        parsed = client.completions.create(
            model="tiny-mix",
            prompt=PROMPT,
            echo=True,
            logprobs=2,
            max_tokens=3,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    assert parsed.choices[0].logprobs.token_logprobs[0] is None
    assert parsed.choices[0].logprobs.tokens == choice["logprobs"]["tokens"]


def test_streamed_echo_with_logprobs_sends_the_prompt_in_the_first_chunk(server, tok):
    body = {
        "model": "tiny-mix",
        "prompt": PROMPT,
        "echo": True,
        "logprobs": 1,
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
    }
    whole = _post(server, "/completions", body).json()["choices"][0]
    chunks = _sse(_post(server, "/completions", {**body, "stream": True}))
    first = chunks[0]["choices"][0]
    n_prompt = len(tok.encode(PROMPT))
    assert first["text"].startswith(PROMPT)
    assert len(first["logprobs"]["tokens"]) == n_prompt + 1  # the prompt's, then the first token's
    assert first["logprobs"]["token_logprobs"][0] is None
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        for key in merged:
            merged[key] += chunk["choices"][0]["logprobs"][key]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert merged == whole["logprobs"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_zero_echoes_the_scored_prompt_and_counts_no_token(server, tok, engines, stream):
    ids = tok.encode(PROMPT)
    want = _want(engines, "tiny-mix", ids, max_tokens=0, prompt_logprobs=3)
    body = {
        "model": "tiny-mix",
        "prompt": [ids],
        "echo": True,
        "logprobs": 3,
        "max_tokens": 0,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }
    out = _post(server, "/completions", body)
    assert out.status_code == 200, out.text
    if stream:
        chunks = _sse(out)
        assert len(chunks) == 2 and chunks[-1]["choices"] == []  # one chunk, then the usage
        choice, used = chunks[0]["choices"][0], chunks[-1]["usage"]
    else:
        choice, used = out.json()["choices"][0], out.json()["usage"]
    assert choice["text"] == tok.decode(ids) and choice["finish_reason"] == "length"
    _check_echo_logprobs(choice["logprobs"], tok, want, 3, tok.decode(ids))
    assert used == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_echo_alone_with_max_tokens_zero_validates_with_the_sdk(server, tok):
    out = _post(
        server,
        "/completions",
        {"model": "tiny-mix", "prompt": PROMPT, "echo": True, "max_tokens": 0},
    )
    data = out.json()
    parsed = openai.types.Completion.model_validate(data)
    assert parsed.choices[0].text == PROMPT and parsed.choices[0].logprobs is None
    assert parsed.choices[0].finish_reason == "length" and parsed.usage.completion_tokens == 0


def test_token_id_prompts_in_a_batch_as_lm_eval_sends_them(server, tok, engines):
    """lm-eval's loglikelihood request: token ids, several prompts, echo, logprobs 1,
    max_tokens 1."""
    prompts = [tok.encode(PROMPT), tok.encode("def add(a, b):\n    return a + b")]
    out = _post(
        server,
        "/completions",
        {
            "model": "tiny-mix",
            "prompt": prompts,
            "echo": True,
            "logprobs": 1,
            "max_tokens": 1,
            "temperature": 0,
            "seed": 1234,
        },
    )
    choices = sorted(out.json()["choices"], key=lambda c: c["index"])
    for ids, choice in zip(prompts, choices, strict=True):
        want = _want(
            engines,
            "tiny-mix",
            ids,
            max_tokens=1,
            temperature=0.0,
            logprobs=1,
            prompt_logprobs=1,
            seed=1234,
        )
        _check_echo_logprobs(choice["logprobs"], tok, want, 1, tok.decode(ids))


def test_vllm_prompt_logprobs_on_completions(server, tok, engines):
    ids = tok.encode(PROMPT)
    want = _want(
        engines, "tiny-mix", ids, max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=2
    )
    out = _post(
        server,
        "/completions",
        {
            "model": "tiny-mix",
            "prompt": PROMPT,
            "max_tokens": 2,
            "temperature": 0,
            "ignore_eos": True,
            "prompt_logprobs": 2,
        },
    )
    data = out.json()
    choice = data["choices"][0]
    assert choice["logprobs"] is None and choice["text"] == want.text
    _check_vllm(choice["prompt_logprobs"], tok, want, 2)
    parsed = openai.types.Completion.model_validate(data)  # extra fields are allowed
    assert parsed.choices[0].model_extra["prompt_logprobs"][0] is None


def _check_vllm(got: list, tok, want, k: int) -> None:
    """vLLM's shape: [None, {str(id): {logprob, rank, decoded_token}}, ...], top k + the token."""
    assert len(got) == len(want.prompt_ids) and got[0] is None
    for t, (entry, position) in enumerate(
        zip(want.prompt_logprobs[1:], got[1:], strict=True), start=1
    ):
        expected = {str(i): (lp, r) for r, (i, lp) in enumerate(entry.top[:k], start=1)}
        expected[str(entry.token_id)] = (entry.logprob, entry.rank)
        assert set(position) == set(expected)
        assert entry.token_id == want.prompt_ids[t]
        for key, (lp, rank) in expected.items():
            assert position[key]["logprob"] == pytest.approx(lp, abs=1e-5)
            assert position[key]["rank"] == rank
            assert position[key]["decoded_token"] == _text(tok, int(key))


def test_vllm_prompt_logprobs_on_chat_sit_on_the_response(server, tok, engines):
    ids = list(
        tok.apply_chat_template(
            MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )
    want = _want(engines, "tiny-mix", ids, max_tokens=0, prompt_logprobs=1)
    out = _post(
        server,
        "/chat/completions",
        {
            "model": "tiny-mix",
            "messages": MESSAGES,
            "max_tokens": 0,
            "prompt_logprobs": 1,
            "logprobs": True,
        },
    )
    assert out.status_code == 200, out.text
    data = out.json()
    _check_vllm(data["prompt_logprobs"], tok, want, 1)
    choice = data["choices"][0]
    assert choice["message"]["content"] == "" and choice["finish_reason"] == "length"
    assert (
        choice["logprobs"] == {"content": [], "refusal": None}
        or choice["logprobs"]["content"] == []
    )
    assert data["usage"]["completion_tokens"] == 0
    parsed = openai.types.chat.ChatCompletion.model_validate(data)
    assert parsed.model_extra["prompt_logprobs"][0] is None
    generated = _post(
        server,
        "/chat/completions",
        {"model": "tiny-mix", "messages": MESSAGES, "max_tokens": 2, "prompt_logprobs": 0},
    ).json()
    assert [p and list(p) for p in generated["prompt_logprobs"]] == [None] + [
        [str(t)] for t in ids[1:]
    ]
    assert generated["usage"]["completion_tokens"] == 2


def test_minus_infinity_is_written_as_minus_9999(server, tok, engines):
    ids = tok.encode(PROMPT)
    want = _want(engines, "tiny-cd", ids, max_tokens=0, prompt_logprobs=20)
    assert any(e.logprob == -math.inf for e in want.prompt_logprobs[1:])  # the cut removed some
    out = _post(
        server,
        "/completions",
        {
            "model": "tiny-cd",
            "prompt": PROMPT,
            "echo": True,
            "logprobs": 20,
            "max_tokens": 0,
            "prompt_logprobs": 20,
        },
    )
    assert "Infinity" not in out.text and "NaN" not in out.text
    choice = out.json()["choices"][0]
    for entry, lp, position in zip(
        want.prompt_logprobs[1:],
        choice["logprobs"]["token_logprobs"][1:],
        choice["prompt_logprobs"][1:],
        strict=True,
    ):
        expected = -9999.0 if entry.logprob == -math.inf else pytest.approx(entry.logprob, abs=1e-5)
        assert lp == expected
        assert position[str(entry.token_id)]["logprob"] == expected
    assert -9999.0 in {v for top in choice["logprobs"]["top_logprobs"][1:] for v in top.values()}
