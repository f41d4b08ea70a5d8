"""Structured outputs and tool calls over HTTP, with the official ``openai`` client and LangChain.

The server runs the tiny random models (``tests/conftest.py``) with a longer context (1,024
positions: the tools' system message takes a few hundred of the tiny tokenizer's tokens). Their
unconstrained text is garbage (``test_unconstrained_reply_is_not_json``): every valid object
below is the grammar's doing.
"""

from __future__ import annotations

import json
import re
import shutil
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from compose_serve.http.inputs import chat_prompt_ids
from compose_serve.http.protocol import ChatMessage
from compose_serve.http.structured_io import tool_plan

from .live import PERSON_SCHEMA, serve_specs

MODEL = "tiny-long"
PERSON = PERSON_SCHEMA
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": -99, "maximum": 99},
                "b": {"type": "integer", "minimum": -99, "maximum": 99},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = {t["function"]["name"]: t for t in (WEATHER, ADD)}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    members = []
    for key in ("a", "b"):
        folder = root / key
        shutil.copytree(tiny[key], folder)
        config = json.loads((folder / "config.json").read_text())
        config["max_position_embeddings"] = 1024
        (folder / "config.json").write_text(json.dumps(config))
        members.append({"name": key, "model": str(folder)})
    spec = {"name": MODEL, "method": "mixture", "members": members, "engine": {"max_batch": 4, "max_queue": 64}}
    live, _ = serve_specs([spec])
    yield live
    live.stop()


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
        yield client


def _chat(oai, **kw):
    kw.setdefault("messages", MESSAGES)
    kw.setdefault("max_tokens", 200)
    return oai.chat.completions.create(model=MODEL, **kw)


def _validate_call(call, name: str | None = None) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in TOOLS if name is None else call.function.name == name
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, TOOLS[call.function.name]["function"]["parameters"])
    return arguments


# -- response formats --------------------------------------------------------------------------
def test_unconstrained_reply_is_not_json(oai):
    for seed in range(3):
        text = _chat(oai, seed=seed, max_tokens=40).choices[0].message.content
        with pytest.raises(ValueError):
            json.loads(text)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_reply_validates(oai, seed):
    out = _chat(
        oai,
        seed=seed,
        n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_schema_reply_parses_with_the_sdk(oai):
    class Person(BaseModel):
        name: str = Field(max_length=8)
        age: int = Field(ge=0, le=120)
        color: Literal["red", "green", "blue"]

    out = oai.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Person, max_tokens=200, seed=5)
    assert isinstance(out.choices[0].message.parsed, Person)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_json_object_reply_parses(oai, seed):
    out = _chat(oai, seed=seed, temperature=0.0 if seed == 0 else 1.0, max_tokens=400,
                response_format={"type": "json_object"})
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    else:  # cut by max_tokens inside a string: still an object's prefix
        assert out.choices[0].message.content.startswith("{")


def test_json_schema_streams_the_same_text(oai):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    whole = _chat(oai, seed=11, response_format=fmt).choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in _chat(oai, seed=11, response_format=fmt, stream=True) if c.choices]
    assert "".join(pieces) == whole
    jsonschema.validate(json.loads(whole), PERSON)


def test_completions_guided_fields(oai):
    def complete(**extra):
        out = oai.completions.create(model=MODEL, prompt="Answer:", max_tokens=80, seed=3, extra_body=extra)
        return out.choices[0]

    choice = complete(guided_choice=["alpha", "beta", "gamma delta"])
    assert choice.text in {"alpha", "beta", "gamma delta"} and choice.finish_reason == "stop"
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    assert re.fullmatch(pattern, complete(guided_regex=pattern).text)
    jsonschema.validate(json.loads(complete(guided_json=PERSON).text), PERSON)
    assert complete(guided_grammar='root ::= "yes" | "no"').text in {"yes", "no"}
    assert complete(structured_outputs={"choice": ["up", "down"]}).text in {"up", "down"}
    assert re.fullmatch(pattern, complete(structured_outputs={"regex": pattern}).text)
    jsonschema.validate(json.loads(complete(structured_outputs={"json": PERSON}).text), PERSON)
    out = oai.completions.create(model=MODEL, prompt="Answer:", max_tokens=80, seed=3,
                                 extra_body={"response_format": {"type": "json_schema",
                                                                 "json_schema": {"name": "p", "schema": PERSON}}})
    jsonschema.validate(json.loads(out.choices[0].text), PERSON)


def test_chat_guided_choice(oai):
    out = _chat(oai, seed=1, extra_body={"guided_choice": ["sunny", "rainy"]})
    assert out.choices[0].message.content in {"sunny", "rainy"}


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"guided_regex": "a(?=b)"}, "guided_regex"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_grammar": "root ::= missing"}, "guided_grammar"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
        ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]}, "tools.0.function.parameters"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "add"}}}, "tool_choice.function.name"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_invalid_constraints_are_400s_naming_the_field(oai, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        _chat(oai, max_tokens=5, extra_body=extra)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param, err.value.body


def test_completions_invalid_schema_is_a_400(oai):
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=MODEL, prompt="x", max_tokens=5, extra_body={"guided_json": {"type": 5}})
    assert err.value.body["param"] == "guided_json"


# -- tools --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_named_tool_call(oai, seed):
    out = _chat(oai, seed=seed, tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    _validate_call(call, "get_weather")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_required_tool_call(oai, seed):
    out = _chat(oai, seed=seed, tools=[WEATHER, ADD], tool_choice="required")
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    _validate_call(call)


@pytest.mark.parametrize("seed", range(6))
def test_auto_is_a_call_or_plain_text(oai, seed):
    choice = _chat(oai, seed=seed, max_tokens=60, tools=[WEATHER, ADD]).choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        _validate_call(choice.message.tool_calls[0])
    else:
        assert not choice.message.content.lstrip().startswith("{")


@pytest.mark.parametrize("stream", [False, True])
def test_auto_opening_a_brace_commits_to_a_valid_call(oai, tiny, stream):
    """Pushed towards "{" (logit_bias), ``auto`` writes a call, which then has to be valid; the
    same request streamed gives the same call, the same text without the bias."""
    from transformers import AutoTokenizer

    brace = AutoTokenizer.from_pretrained(tiny["tokenizer"]).convert_tokens_to_ids("{")
    kw = {"seed": 2, "tools": [WEATHER, ADD], "logit_bias": {str(brace): 100}}
    (whole,) = _chat(oai, **kw).choices[0].message.tool_calls
    _validate_call(whole)
    text = _chat(oai, seed=2, max_tokens=30, tools=[WEATHER, ADD]).choices[0].message.content
    if stream:
        calls, finish, content = _assemble(_chat(oai, stream=True, **kw))
        assert finish == "tool_calls" and content == ""
        assert (calls[0]["name"], calls[0]["arguments"]) == (whole.function.name, whole.function.arguments)
        _, finish, content = _assemble(_chat(oai, seed=2, max_tokens=30, tools=[WEATHER, ADD], stream=True))
        assert content == text and finish == "length"


def _assemble(chunks) -> tuple[list[dict], str | None, str]:
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for piece in delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = piece.id or call["id"]
                if piece.function is not None:
                    call["name"] += piece.function.name or ""
                    call["arguments"] += piece.function.arguments or ""
            finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish, content


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_streamed_tool_call_assembles_to_the_same_call(oai, tool_choice):
    kw = {"seed": 7, "tools": [WEATHER, ADD], "tool_choice": tool_choice}
    (whole,) = _chat(oai, **kw).choices[0].message.tool_calls
    chunks = list(_chat(oai, stream=True, **kw))
    calls, finish, content = _assemble(chunks)
    assert finish == "tool_calls" and content == ""
    assert len(calls) == 1 and calls[0]["id"].startswith("call_")
    assert (calls[0]["name"], calls[0]["arguments"]) == (whole.function.name, whole.function.arguments)
    pieces = [p for c in chunks for ch in c.choices for p in ch.delta.tool_calls or []]
    assert len(pieces) > 2  # the arguments came in pieces, not in one block at the end
    json.loads(calls[0]["arguments"])


def test_multi_turn_with_tool_results(oai):
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    out = _chat(oai, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=10, seed=0)
    assert out.choices[0].message.tool_calls is None
    assert out.usage.prompt_tokens > _chat(oai, max_tokens=1).usage.prompt_tokens + 20


def test_prompt_tells_the_model_about_tools(server, tiny):
    """A template that ignores ``tools`` gets a system message listing them; one that renders
    them gets them through ``tools=`` and no extra message."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    messages = [ChatMessage(role="user", content="hi")]
    plan = tool_plan([WEATHER], "auto")
    text = tok.decode(chat_prompt_ids(tok, messages, tools=plan))
    assert text.startswith("<|system|>") and '"name":"get_weather"' in text and '{"name": <function name>' in text
    aware = (
        "{% if tools %}<|tools|>{{ tools | tojson }}<|end|>{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}<|assistant|>"
    )
    text = tok.decode(chat_prompt_ids(tok, messages, tools=plan, chat_template=aware))
    assert text.startswith("<|tools|>") and "get_weather" in text and "<|system|>" not in text


# -- LangChain ----------------------------------------------------------------------------------
class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=8, description="a short name")
    age: int = Field(ge=0, le=120)
    color: Literal["red", "green", "blue"]


@pytest.fixture(scope="module")
def chat_model(server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=server.base_url, api_key="x", model=MODEL, max_tokens=200, seed=3,
                      max_retries=0)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(chat_model, method):
    person = chat_model.with_structured_output(Person, method=method).invoke("Describe a person.")
    assert isinstance(person, Person)


class WeatherArgs(BaseModel):
    city: str = Field(max_length=10)
    unit: Literal["celsius", "fahrenheit"]


class AddArgs(BaseModel):
    a: int = Field(ge=-99, le=99)
    b: int = Field(ge=-99, le=99)


def test_langchain_bind_tools(chat_model):
    from langchain_core.tools import tool

    @tool(args_schema=WeatherArgs)
    def get_weather(city: str, unit: str) -> str:
        """The weather in a city."""
        return f"{city}: 18 {unit}"

    @tool(args_schema=AddArgs)
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    for choice, names in (("get_weather", {"get_weather"}), ("any", {"get_weather", "add"})):
        reply = chat_model.bind_tools([get_weather, add], tool_choice=choice).invoke("Weather in Paris?")
        assert len(reply.tool_calls) == 1
        call = reply.tool_calls[0]
        assert call["name"] in names and call["id"].startswith("call_")
        schema = (get_weather if call["name"] == "get_weather" else add).tool_call_schema.model_json_schema()
        jsonschema.validate(call["args"], schema)
    # the calls go back with their results, as an agent loop does
    from langchain_core.messages import HumanMessage, ToolMessage

    history = [HumanMessage("Weather in Paris?"), reply,
               ToolMessage(content="18 celsius", tool_call_id=reply.tool_calls[0]["id"])]
    answer = chat_model.bind_tools([get_weather, add], tool_choice="none").invoke(history)
    assert isinstance(answer.content, str) and not answer.tool_calls
