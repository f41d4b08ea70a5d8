"""vLLM's request fields, OpenAI's response shape and the token endpoints, against a live server.

References are independent of the server's code: transformers' own forward and
``RepetitionPenaltyLogitsProcessor``, the tokenizer's own ``apply_chat_template`` / ``encode`` /
``decode``, and the openai SDK's response types.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from transformers import AutoModelForCausalLM, RepetitionPenaltyLogitsProcessor

from compose_serve.engine.sequence import TokenEvent
from compose_serve.http.outputs import TokenText, add_completion_logprobs, chat_logprob, sse
from compose_serve.http.protocol import CompletionLogprobs, CompletionResponse

PROMPT = "The quick brown"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2 ="}]


def _ids(choice) -> list[int]:
    """Token ids from log-probs returned with ``return_tokens_as_token_ids``."""
    return [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]


def _greedy(oai, prompt=PROMPT, model="a", max_tokens=8, **extra):
    return oai.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True, **extra},
    ).choices[0]


# -- repetition_penalty: vLLM's and transformers' rule on raw logits -----------------------------
def test_repetition_penalty_of_a_member_alone_equals_transformers(oai, tiny, tok):
    # half the vocabulary is in the prompt: the penalty reorders seen against unseen tokens
    prompt = list(range(10, 160))
    model = AutoModelForCausalLM.from_pretrained(tiny["a"]).eval()
    processor = RepetitionPenaltyLogitsProcessor(2.0)
    ids = torch.tensor([prompt])
    want = []
    with torch.no_grad():
        for _ in range(10):
            logits = model(ids).logits[:, -1, :].float()
            token = int(processor(ids, logits).argmax(-1))
            want.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    got = _ids(_greedy(oai, prompt=prompt, max_tokens=10, repetition_penalty=2.0))
    plain = _ids(_greedy(oai, prompt=prompt, max_tokens=10))
    assert got == want
    assert plain != want  # the penalty changed the output (else this test could not fail)


# -- min_tokens, stop_token_ids, stop strings, stop_reason ---------------------------------------
def test_min_tokens_bans_the_stop_token_until_reached(oai):
    first = _ids(_greedy(oai, max_tokens=1))[0]
    early = _greedy(oai, stop_token_ids=[first])
    assert _ids(early) == [first] and early.finish_reason == "stop"
    assert early.model_extra["stop_reason"] == first
    held = _greedy(oai, stop_token_ids=[first], min_tokens=4)
    assert len(_ids(held)) >= 4 and first not in _ids(held)[:4]


def test_include_stop_str_in_output_keeps_the_stop_string(oai):
    text = _greedy(oai, max_tokens=12).text
    stop = text[4:7]
    assert stop.strip(), f"pick another slice of {text!r}"
    start = text.index(stop)
    cut = _greedy(oai, max_tokens=12, stop=[stop])
    kept = _greedy(oai, max_tokens=12, stop=[stop], include_stop_str_in_output=True)
    assert cut.text == text[:start] and cut.model_extra["stop_reason"] == stop
    assert kept.text == text[: start + len(stop)] and kept.finish_reason == "stop"


def test_skip_special_tokens_false_keeps_their_text(oai, tok):
    forced = {"logit_bias": {str(tok.eos_token_id): 100}}
    skipped = _greedy(oai, max_tokens=3, **forced)
    kept = _greedy(oai, max_tokens=3, skip_special_tokens=False, **forced)
    assert _ids(skipped) == _ids(kept) == [tok.eos_token_id] * 3
    assert skipped.text == "" and kept.text == tok.eos_token * 3


def test_truncate_prompt_tokens_keeps_the_last_ones(oai, tok):
    ids = tok.encode("Compose models at decoding time instead of merging")
    cut = oai.completions.create(
        model="a", prompt=ids, max_tokens=5, temperature=0,
        extra_body={"truncate_prompt_tokens": 4, "ignore_eos": True},
    )
    direct = oai.completions.create(
        model="a", prompt=ids[-4:], max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert cut.usage.prompt_tokens == 4
    assert cut.choices[0].text == direct.choices[0].text


# -- chat template controls ----------------------------------------------------------------------
def test_continue_final_message_and_template_kwargs_reach_the_template(live, tok):
    messages = [*MESSAGES, {"role": "assistant", "content": "It is"}]
    body = {"model": "tiny-mix", "messages": messages, "continue_final_message": True,
            "add_generation_prompt": False}
    got = httpx.post(live.url + "/tokenize", json=body).json()
    want = tok.apply_chat_template(messages, continue_final_message=True, tokenize=True,
                                   return_dict=False)
    assert got["tokens"] == list(want) and got["count"] == len(want)
    template = "{% for m in messages %}{{ greeting }}{{ m['content'] }}{% endfor %}"
    custom = httpx.post(live.url + "/tokenize", json={
        "model": "tiny-mix", "messages": MESSAGES, "chat_template": template,
        "chat_template_kwargs": {"greeting": "2 + "}, "add_generation_prompt": False,
    }).json()
    assert custom["tokens"] == tok.encode("2 + Be brief.2 + 2 + 2 =")
    both = httpx.post(live.base_url + "/chat/completions", json={
        **body, "add_generation_prompt": True, "max_tokens": 2})
    assert both.status_code == 400
    assert both.json()["error"]["param"] == "continue_final_message"


def test_a_continued_message_is_generated_from_the_open_turn(oai, tok):
    messages = [*MESSAGES, {"role": "assistant", "content": "It is"}]
    chat = oai.chat.completions.create(
        model="a", messages=messages, max_tokens=4, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False,
                    "ignore_eos": True},
    )
    ids = tok.apply_chat_template(messages, continue_final_message=True, tokenize=True,
                                  return_dict=False)
    plain = oai.completions.create(model="a", prompt=list(ids), max_tokens=4, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.usage.prompt_tokens == len(ids)


# -- fields that would change the output and are not implemented ---------------------------------
@pytest.mark.parametrize(
    ("route", "field", "value"),
    [
        ("completions", "use_beam_search", True),
        ("completions", "bad_words", ["fox"]),
        ("completions", "allowed_token_ids", [1, 2]),
        ("chat/completions", "echo", True),
        ("chat/completions", "prediction", {"type": "content", "content": "x"}),
        ("chat/completions", "functions", [{"name": "f"}]),
    ],
)
def test_an_unimplemented_field_that_changes_the_output_is_a_400_naming_it(live, route, field, value):
    body = {"model": "tiny-mix", "max_tokens": 2, field: value}
    body.update({"prompt": PROMPT} if route == "completions" else {"messages": MESSAGES})
    response = httpx.post(f"{live.base_url}/{route}", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field


def test_no_op_values_and_descriptive_fields_are_accepted(live):
    body = {"model": "tiny-mix", "prompt": PROMPT, "max_tokens": 2, "use_beam_search": False,
            "length_penalty": 1.0, "spaces_between_special_tokens": True, "user": "u",
            "metadata": {"k": "v"}, "store": False, "service_tier": "auto"}
    assert httpx.post(live.base_url + "/completions", json=body).status_code == 200


# -- OpenAI's response shape ---------------------------------------------------------------------
def test_chat_bodies_carry_refusal_and_system_fingerprint(live):
    body = {"model": "tiny-mix", "messages": MESSAGES, "max_tokens": 3, "logprobs": True,
            "top_logprobs": 2}
    raw = httpx.post(live.base_url + "/chat/completions", json=body).json()
    ChatCompletion.model_validate(raw)
    choice = raw["choices"][0]
    assert "refusal" in choice["message"] and choice["message"]["refusal"] is None
    assert "refusal" in choice["logprobs"] and choice["logprobs"]["refusal"] is None
    assert raw["system_fingerprint"].startswith("fp_")
    with httpx.stream("POST", live.base_url + "/chat/completions",
                      json={**body, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: {")]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
        assert chunk["system_fingerprint"] == raw["system_fingerprint"]


def test_completion_top_logprobs_hold_the_sampled_token(live):
    body = {"model": "tiny-mix", "prompt": PROMPT, "max_tokens": 12, "logprobs": 1,
            "temperature": 1.5, "seed": 3, "ignore_eos": True,
            "return_tokens_as_token_ids": True}  # two tokens may share a text, never an id
    raw = httpx.post(live.base_url + "/completions", json=body).json()
    Completion.model_validate(raw)
    assert raw["system_fingerprint"].startswith("fp_")
    logprobs = raw["choices"][0]["logprobs"]
    outside = 0
    for token, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"],
                              logprobs["top_logprobs"], strict=True):
        assert top[token] == pytest.approx(lp) and 1 <= len(top) <= 2
        outside += len(top) == 2
    assert outside > 0  # sampled at 1.5, some token was not the most likely one


def test_a_minus_infinity_log_prob_is_valid_json(tok):
    """No member gives a token any mass: its log-prob is -inf, written as vLLM does (-9999.0)."""
    token_text = TokenText(tok)
    event = TokenEvent("r", 5, "x", float("-inf"), [(7, -0.1), (5, float("-inf"))], {}, "length")
    logprobs = CompletionLogprobs()
    add_completion_logprobs(logprobs, [event], token_text, 0, 2)
    line = sse(CompletionResponse(id="c", created=0, model="m", choices=[
        {"index": 0, "text": "x", "logprobs": logprobs}]), include_usage=False)

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    data = json.loads(line[6:], parse_constant=refuse)
    assert data["choices"][0]["logprobs"]["token_logprobs"] == [-9999.0]
    chat = chat_logprob(event, token_text, 2).model_dump_json()
    assert json.loads(chat, parse_constant=refuse)["logprob"] == -9999.0


# -- /tokenize, /detokenize, /version ------------------------------------------------------------
def test_tokenize_and_detokenize_match_the_tokenizer(live, tok):
    got = httpx.post(live.url + "/tokenize", json={"model": "tiny-mix", "prompt": PROMPT,
                                                    "return_token_strs": True}).json()
    assert got["tokens"] == tok.encode(PROMPT) and got["count"] == len(got["tokens"])
    assert got["token_strs"] == tok.convert_ids_to_tokens(got["tokens"])
    assert got["max_model_len"] > 0
    chat = httpx.post(live.url + "/tokenize", json={"model": "a", "messages": MESSAGES}).json()
    assert chat["tokens"] == list(tok.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False))
    back = httpx.post(live.url + "/detokenize", json={"model": "tiny-mix", "tokens": got["tokens"]})
    assert back.json() == {"prompt": PROMPT}
    bad = httpx.post(live.url + "/detokenize", json={"model": "tiny-mix", "tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    missing = httpx.post(live.url + "/tokenize", json={"prompt": PROMPT})  # 3 compositions served
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
    unknown = httpx.post(live.url + "/tokenize", json={"model": "nope", "prompt": PROMPT})
    assert unknown.status_code == 404


def test_version(live):
    import compose_serve

    assert httpx.get(live.url + "/version").json() == {"version": compose_serve.__version__}


def test_langchain_passes_min_tokens_and_include_stop_str_through(live, oai):
    """LangChain's ChatOpenAI sends vLLM's fields in ``extra_body``; the reply is the one the
    openai client gets for the same body."""
    from langchain_openai import ChatOpenAI

    fields = {"min_tokens": 6, "ignore_eos": True, "include_stop_str_in_output": True}
    plain = oai.chat.completions.create(
        model="a", messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    ).choices[0].message.content
    stop = plain[6:8]
    assert stop.strip(), f"pick another slice of {plain!r}"
    chat = ChatOpenAI(base_url=live.base_url, api_key="x", model="a", max_tokens=12,
                      temperature=0, stop=[stop], extra_body=fields)
    got = chat.invoke(MESSAGES)
    want = oai.chat.completions.create(
        model="a", messages=MESSAGES, max_tokens=12, temperature=0, stop=[stop], extra_body=fields
    ).choices[0]
    assert got.content == want.message.content and got.content.endswith(stop)
    assert got.response_metadata["finish_reason"] == want.finish_reason == "stop"
    assert want.model_extra["stop_reason"] == stop
