"""The official ``openai`` client against a live server: every answer equals the plain Engine's.

The reference for each request is ``Engine.generate`` on a separately loaded copy of the same
composition, run on that request alone (``live.reference``).
"""

from __future__ import annotations

import pytest

from compose_serve.composition import build_composition
from compose_serve.config import parse_composition
from compose_serve.engine import Engine, Request
from compose_serve.sampling import SamplingParams

from .live import reference

PROMPT = "The quick brown"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2 ="}]


def _chat_ids(tok, messages=MESSAGES):
    return list(
        tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


def _req(ids, composition=None, **params):
    return Request(list(ids), SamplingParams(**params), composition)


def test_models_list_compositions_and_mixture_members(oai):
    cards = {m.id: m for m in oai.models.list().data}
    assert set(cards) == {
        "tiny-mix",
        "tiny-delta",
        "held",
        "a",
        "b",
    }  # delta members are not models
    assert cards["a"].model_extra["parent"] == "tiny-mix"
    assert cards["tiny-mix"].model_extra["composition"] == {
        "method": "mixture",
        "members": ["a", "b"],
    }
    assert cards["tiny-mix"].model_extra["max_model_len"] == 256


def test_completion_equals_engine(oai, tok, tiny):
    want = reference(
        tiny,
        "tiny-mix",
        [_req(tok.encode(PROMPT), max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)],
    )[0]
    out = oai.completions.create(
        model="tiny-mix",
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    choice = out.choices[0]
    assert choice.text == want.text
    assert choice.finish_reason == "length"
    assert choice.logprobs.token_logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert choice.logprobs.tokens == [tok.decode([t]) for t in want.token_ids]
    for top, want_top in zip(choice.logprobs.top_logprobs, want.top_logprobs, strict=True):
        assert top == pytest.approx(
            {tok.decode([t]): lp for t, lp in want_top}, abs=1e-4
        )  # a dict, as OpenAI's
    assert out.usage.prompt_tokens == len(tok.encode(PROMPT))
    assert out.usage.completion_tokens == len(want.token_ids) == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert choice.model_extra["composition"]["weights"] == pytest.approx({"a": 0.5, "b": 0.5})


def test_streamed_completion_equals_the_whole_one(oai):
    kwargs = {
        "model": "tiny-mix",
        "prompt": PROMPT,
        "max_tokens": 10,
        "temperature": 0,
        "echo": True,
        "extra_body": {"ignore_eos": True},
    }
    whole = oai.completions.create(**kwargs)
    chunks = list(
        oai.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert whole.choices[0].text.startswith(PROMPT)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_equals_engine_streamed_and_not(oai, tok, tiny):
    want = reference(
        tiny, "tiny-mix", [_req(_chat_ids(tok), max_tokens=9, temperature=0.0, logprobs=2)]
    )[0]
    out = oai.chat.completions.create(
        model="tiny-mix",
        messages=MESSAGES,
        max_tokens=9,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason
    assert [e.logprob for e in choice.logprobs.content] == pytest.approx(want.logprobs, abs=1e-4)
    assert [len(e.top_logprobs) for e in choice.logprobs.content] == [2] * len(want.token_ids)
    assert out.usage.completion_tokens == len(choice.logprobs.content) == len(want.token_ids)
    assert out.usage.prompt_tokens == len(_chat_ids(tok))
    stream = oai.chat.completions.create(
        model="tiny-mix",
        messages=MESSAGES,
        max_tokens=9,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_token_bytes_rebuild_the_text(oai, tok, tiny):
    """Every token's ``bytes`` joined decode to the whole text, even across split characters."""
    out = oai.chat.completions.create(
        model="tiny-mix",
        messages=[{"role": "user", "content": "ünïcödé 日本"}],
        max_tokens=16,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    content = out.choices[0].logprobs.content
    joined = bytes(b for entry in content for b in entry.bytes).decode("utf-8", errors="replace")
    assert joined == out.choices[0].message.content


def test_n_choices_with_a_seed_each_equal_their_own_seed(oai, tok, tiny):
    ids = _chat_ids(tok)
    wants = reference(
        tiny,
        "tiny-mix",
        [_req(ids, max_tokens=8, temperature=0.9, seed=7 + i, ignore_eos=True) for i in range(3)],
    )
    out = oai.chat.completions.create(
        model="tiny-mix",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0.9,
        n=3,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.message.content for c in out.choices] == [w.text for w in wants]
    assert out.usage.completion_tokens == 24


def test_stop_string_ends_the_text_before_it(oai, tok, tiny):
    free = reference(
        tiny,
        "tiny-mix",
        [_req(tok.encode(PROMPT), max_tokens=16, temperature=0.0, ignore_eos=True)],
    )[0].text
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    cut = free[: free.index(stop)]
    out = oai.completions.create(
        model="tiny-mix",
        prompt=PROMPT,
        max_tokens=16,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert out.choices[0].text == cut
    assert out.choices[0].finish_reason == "stop"
    assert stop not in out.choices[0].text


def test_composition_weights_change_the_output_as_the_engine_does(oai, tok, tiny):
    ids = tok.encode(PROMPT)
    weights = {"a": 0.9, "b": 0.1}
    plain, weighted = reference(
        tiny,
        "tiny-mix",
        [
            _req(ids, max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=0),
            _req(
                ids,
                {"weights": weights},
                max_tokens=10,
                temperature=0.0,
                ignore_eos=True,
                logprobs=0,
            ),
        ],
    )
    kwargs = {
        "model": "tiny-mix",
        "prompt": PROMPT,
        "max_tokens": 10,
        "temperature": 0,
        "logprobs": 0,
    }
    got_plain = oai.completions.create(**kwargs, extra_body={"ignore_eos": True}).choices[0]
    got = oai.completions.create(
        **kwargs, extra_body={"ignore_eos": True, "composition": {"weights": weights}}
    )
    choice = got.choices[0]
    assert choice.text == weighted.text and got_plain.text == plain.text
    assert choice.logprobs.token_logprobs == pytest.approx(weighted.logprobs, abs=1e-4)
    assert choice.logprobs.token_logprobs[0] != pytest.approx(
        got_plain.logprobs.token_logprobs[0], abs=1e-3
    )
    assert choice.model_extra["composition"]["weights"] == pytest.approx(weights)


def test_a_member_served_alone_is_that_model(oai, tok, tiny):
    """Model ``a`` equals a composition that holds only member a (an independent reference)."""
    alone = build_composition(
        parse_composition(
            {
                "name": "only-a",
                "method": "mixture",
                "members": [{"name": "a", "model": str(tiny["a"])}],
            }
        )
    )
    request = _req(tok.encode(PROMPT), max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=0)
    want = Engine(alone, max_batch=1).generate([request])[0]
    got = oai.completions.create(
        model="a",
        prompt=PROMPT,
        max_tokens=10,
        temperature=0,
        logprobs=0,
        extra_body={"ignore_eos": True},
    ).choices[0]
    assert got.text == want.text
    assert got.logprobs.token_logprobs == pytest.approx(want.logprobs, abs=1e-4)


def test_delta_alpha_per_request(oai, tok, tiny):
    ids = tok.encode(PROMPT)
    want = reference(
        tiny,
        "tiny-delta",
        [_req(ids, {"alpha": 2.0}, max_tokens=8, temperature=0.0, ignore_eos=True)],
    )
    got = oai.completions.create(
        model="tiny-delta",
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True, "composition": {"alpha": 2.0}},
    )
    assert got.choices[0].text == want[0].text


def test_batch_of_prompts_and_token_id_prompts(oai, tok, tiny):
    prompts = ["The quick brown", "def add(a, b):"]
    wants = reference(
        tiny,
        "tiny-mix",
        [_req(tok.encode(p), max_tokens=5, temperature=0.0, ignore_eos=True) for p in prompts],
    )
    out = oai.completions.create(
        model="tiny-mix",
        prompt=prompts,
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert [c.text for c in out.choices] == [w.text for w in wants]
    by_ids = oai.completions.create(
        model="tiny-mix",
        prompt=tok.encode(prompts[1]),
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert by_ids.choices[0].text == wants[1].text
    assert out.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
