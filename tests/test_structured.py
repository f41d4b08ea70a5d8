"""Structured outputs in the engine: the grammar's token mask on the fused distribution.

The tiny random models write garbage; every output below parses only because the mask forces it
(``test_unconstrained_output_is_not_json`` shows what they write without it).
"""

from __future__ import annotations

import itertools
import json
import re

import jsonschema
import pytest
import regex as partial_re
import torch
from transformers import AutoTokenizer

from compose_serve.engine import Engine, Request
from compose_serve.errors import InvalidRequestError
from compose_serve.http.outputs import BYTE_DECODER
from compose_serve.sampling import SamplingParams
from compose_serve.structured import StructuredSpec, compiler_for, fill_masks, unpack

from .http.live import PERSON_SCHEMA, build_composition_named

SCHEMA = PERSON_SCHEMA
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def tok(tiny):
    return AutoTokenizer.from_pretrained(tiny["tokenizer"])


@pytest.fixture(scope="module")
def mix(tiny):
    return build_composition_named(tiny, "tiny-mix")


@pytest.fixture(scope="module")
def engine(mix):
    return Engine(mix, max_batch=4)


def _token_bytes(tok, token_id: int) -> bytes:
    return bytes(BYTE_DECODER[c] for c in tok.convert_ids_to_tokens(token_id))


def _brute_force(tok, prefix: bytes, viable, complete) -> set[int]:
    """Tokens whose bytes keep ``prefix`` viable (``viable(text)``: some output starts with it),
    plus EOS when ``prefix`` is a whole output; special tokens never (they are not text)."""
    specials = set(tok.all_special_ids)
    allowed = set()
    for t in range(len(tok)):
        if t in specials:
            continue
        try:
            text = (prefix + _token_bytes(tok, t)).decode("utf-8")
        except UnicodeDecodeError:  # every language below is ASCII: half a character never fits
            continue
        if viable(text):
            allowed.add(t)
    if complete(prefix.decode("utf-8")):
        allowed.add(tok.eos_token_id)
    return allowed


def _finite(language: list[str]):
    return (lambda text: any(s.startswith(text) for s in language)), (lambda text: text in language)


def _regex(pattern: str):
    return (
        lambda text: partial_re.fullmatch(pattern, text, partial=True) is not None,
        lambda text: partial_re.fullmatch(pattern, text) is not None,
    )


def _json_enum_language() -> list[str]:
    return [json.dumps({"size": s, "ok": b}) for s, b in itertools.product(["S", "M", "XL"], [True, False])]


CASES = {
    "choice": (StructuredSpec.choice(["red", "green", "blue", "grey", "re"]), _finite(["red", "green", "blue", "grey", "re"]), "green"),
    "regex": (StructuredSpec.regex(r"[a-d]{2,4}(,[0-9]+)*"), _regex(r"[a-d]{2,4}(,[0-9]+)*"), "abca,12,7"),
    "json": (
        StructuredSpec.json_schema({
            "type": "object",
            "properties": {"size": {"enum": ["S", "M", "XL"]}, "ok": {"type": "boolean"}},
            "required": ["size", "ok"],
            "additionalProperties": False,
        }),
        _finite(_json_enum_language()),
        '{"size": "XL", "ok": false}',
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mask_allows_exactly_what_the_grammar_allows(tok, case):
    """At every step along a valid output, the mask's allowed set equals a brute-force check of
    every token of the (320-token) vocabulary against the language."""
    spec, (viable, complete), output = CASES[case]
    compiler = compiler_for(tok, len(tok), [tok.eos_token_id])
    matcher = compiler.matcher(spec)
    path = tok.encode(output)
    prefix = b""
    for step, token in enumerate([*path, tok.eos_token_id]):
        mask = unpack(fill_masks([matcher], compiler.words), len(tok))[0]
        got = set(mask.nonzero().flatten().tolist())
        want = _brute_force(tok, prefix, viable, complete)
        assert got == want, (case, step, prefix, sorted(got ^ want)[:10])
        assert token in got
        assert matcher.accept(token)
        if token != tok.eos_token_id:
            prefix += _token_bytes(tok, token)
    assert matcher.finished


def test_length_bounded_strings_stay_json(tok):
    """xgrammar 0.2.9 lets raw control characters into strings with maxLength (not JSON; the
    tiny models found it); ``structured._json_grammar`` fixes that. Inside such a string, the
    allowed ASCII tokens are exactly those the JSON string language allows."""
    compiler = compiler_for(tok, len(tok), [tok.eos_token_id])
    schema = {"type": "object", "properties": {"n": {"type": "string", "maxLength": 4}}, "required": ["n"]}
    pattern = r'\{"n": "[^\x00-\x1f"\\]{0,4}"\}'
    viable, complete = _regex(pattern)
    matcher = compiler.matcher(StructuredSpec.json_schema(schema))
    prefix = b""
    for token in tok.encode('{"n": "ab'):
        assert matcher.accept(token)
        prefix += _token_bytes(tok, token)
    got = set(unpack(fill_masks([matcher], compiler.words), len(tok))[0].nonzero().flatten().tolist())
    ascii_tokens = {t for t in range(len(tok)) if t not in tok.all_special_ids and max(_token_bytes(tok, t)) < 0x80}
    assert got & ascii_tokens == _brute_force(tok, prefix, viable, complete) & ascii_tokens
    assert not any(min(_token_bytes(tok, t)) < 0x20 for t in got if t not in tok.all_special_ids)
    assert got & ascii_tokens  # a character or the closing quote is allowed


def test_unconstrained_output_is_not_json(engine, tok):
    out = engine.generate([Request(tok.encode(PROMPT), SamplingParams(max_tokens=40, seed=s)) for s in range(3)])
    for completion in out:
        with pytest.raises(ValueError):
            json.loads(completion.text)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_json_schema_generation_validates(engine, tok, seed):
    params = SamplingParams(max_tokens=120, seed=seed, structured=StructuredSpec.json_schema(SCHEMA))
    (out,) = engine.generate([Request(tok.encode(PROMPT), params)])
    assert out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), SCHEMA)


def test_greedy_json_object_and_logprobs_stay_unmasked(engine, tok):
    """``json_object``: one JSON object. The returned top log-probs are the fused distribution's,
    not the masked one's: tokens the grammar forbade still show up in them."""
    params = SamplingParams(max_tokens=200, temperature=0, logprobs=5, structured=StructuredSpec.json_object())
    (out,) = engine.generate([Request(tok.encode(PROMPT), params)])
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)
    assert out.text.startswith("{")
    compiler = compiler_for(tok, engine.composition.vocab_size, engine.composition.eos_token_ids)
    matcher = compiler.matcher(params.structured)
    forbidden_in_top = 0
    for token, top in zip(out.token_ids, out.top_logprobs, strict=True):
        allowed = unpack(fill_masks([matcher], compiler.words), engine.composition.vocab_size)[0]
        forbidden_in_top += sum(not allowed[t] for t, _ in top)
        assert allowed[token]
        matcher.accept(token)
    assert forbidden_in_top > 0


def test_guided_choice_returns_a_choice(engine, tok):
    choices = ["yes", "no", "maybe later"]
    outs = engine.generate([
        Request(tok.encode(PROMPT), SamplingParams(max_tokens=30, seed=s, structured=StructuredSpec.choice(choices)))
        for s in range(6)
    ])
    for out in outs:
        assert out.text in choices
        assert out.finish_reason == "stop"


def test_guided_regex_fullmatches(engine, tok):
    pattern = r"(ab|cd)-[0-9]{2,3}-(x|y|z)"
    outs = engine.generate([
        Request(tok.encode(PROMPT), SamplingParams(max_tokens=30, seed=s, structured=StructuredSpec.regex(pattern)))
        for s in range(4)
    ])
    for out in outs:
        assert re.fullmatch(pattern, out.text), out.text
        assert out.finish_reason == "stop"


def test_eos_waits_for_the_grammar_then_ends_it(engine, tok):
    """EOS pushed up by logit_bias: masked while the grammar is incomplete (no empty output),
    taken as soon as the grammar allows it ("stop" after one token of digits)."""
    params = SamplingParams(max_tokens=20, seed=0, logit_bias={tok.eos_token_id: 100.0},
                            structured=StructuredSpec.regex(r"[0-9]+"))
    (out,) = engine.generate([Request(tok.encode(PROMPT), params)])
    assert re.fullmatch(r"[0-9]+", out.text) and out.finish_reason == "stop"
    assert len(out.token_ids) == 2 and out.token_ids[-1] == tok.eos_token_id


def test_unconstrained_rows_are_untouched(tiny, tok):
    """A constrained sequence in the batch changes nothing for its neighbours (seeded)."""
    engine = Engine(build_composition_named(tiny, "tiny-mix"), max_batch=4)
    free = Request(tok.encode(PROMPT), SamplingParams(max_tokens=20, seed=7))
    (alone,) = engine.generate([free])
    constrained = Request(tok.encode("Compose"), SamplingParams(max_tokens=40, seed=3, structured=StructuredSpec.json_schema(SCHEMA)))
    mixed = engine.generate([Request(free.prompt_ids, free.params), constrained])
    assert mixed[0].token_ids == alone.token_ids
    assert mixed[0].logprobs == pytest.approx(alone.logprobs)


def test_compiled_grammars_are_cached_per_tokenizer_and_spec(tok):
    compiler = compiler_for(tok, len(tok), [tok.eos_token_id])
    assert compiler_for(tok, len(tok), [tok.eos_token_id]) is compiler
    a = compiler.compile(StructuredSpec.json_schema(SCHEMA))
    assert compiler.compile(StructuredSpec.json_schema(json.dumps(SCHEMA), param="guided_json")) is a
    assert compiler.compile(StructuredSpec.regex("a+")) is not a


@pytest.mark.parametrize(
    "build, param",
    [
        (lambda: StructuredSpec.json_schema({"type": "no-such-type"}), "response_format"),
        (lambda: StructuredSpec.json_schema("{not json", param="guided_json"), "guided_json"),
        (lambda: StructuredSpec.json_schema([1, 2]), "response_format"),
        (lambda: StructuredSpec.regex("a(?=b)"), "guided_regex"),
        (lambda: StructuredSpec.regex(""), "guided_regex"),
        (lambda: StructuredSpec.choice([]), "guided_choice"),
        (lambda: StructuredSpec.choice(["a", 3]), "guided_choice"),
        (lambda: StructuredSpec.grammar("root ::= undefined_rule"), "guided_grammar"),
    ],
)
def test_invalid_specs_name_their_field(build, param):
    with pytest.raises(InvalidRequestError) as err:
        build()
    assert err.value.param == param


def test_grammar_accepts_ebnf_and_lark(engine, tok):
    for text in ('root ::= "cat" | "dog" | "bird"', 'start: "cat" | "dog" | "bird"'):
        spec = StructuredSpec.grammar(text)
        (out,) = engine.generate([Request(tok.encode(PROMPT), SamplingParams(max_tokens=10, seed=1, structured=spec))])
        assert out.text in {"cat", "dog", "bird"}


def test_mask_rows_copies_and_masks_only_constrained_rows(tok):
    compiler = compiler_for(tok, len(tok), [tok.eos_token_id])
    matcher = compiler.matcher(StructuredSpec.choice(["red"]))
    from compose_serve.structured import mask_rows

    logprobs = torch.randn(3, len(tok)).log_softmax(-1)
    before = logprobs.clone()
    picking = mask_rows(logprobs, [1], [matcher])
    assert torch.equal(logprobs, before)
    assert torch.equal(picking[0], logprobs[0]) and torch.equal(picking[2], logprobs[2])
    finite = picking[1].isfinite().nonzero().flatten().tolist()
    assert finite and all(b"red".startswith(_token_bytes(tok, t)) for t in finite)
