"""Engine behaviour against transformers and against itself run alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compose_serve.composition import build_composition
from compose_serve.config import parse_composition
from compose_serve.engine import Engine, Request
from compose_serve.errors import ConfigError, ContextLengthError, InvalidRequestError
from compose_serve.sampling import SamplingParams


def _engine(members, method="mixture", max_batch=4, **extra):
    spec = parse_composition({"name": "t", "method": method, "members": members, **extra})
    return Engine(build_composition(spec), max_batch=max_batch)


def _tok(tiny):
    return AutoTokenizer.from_pretrained(tiny["tokenizer"])


def test_one_member_reproduces_transformers_generate_greedy(tiny):
    engine = _engine([{"name": "a", "model": str(tiny["a"])}])
    model = AutoModelForCausalLM.from_pretrained(tiny["a"]).eval()
    tok = _tok(tiny)
    prompts = ["The quick brown fox", "def add(a, b):", "2"]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outs = engine.generate([Request(tok.encode(p), params) for p in prompts])
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([tok.encode(prompt)])
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                              eos_token_id=None, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        assert out.token_ids == want.tolist()


def test_mixture_of_a_model_with_itself_is_the_model(tiny):
    tok = _tok(tiny)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=5)
    prompts = [tok.encode("Compose models"), tok.encode("The quick")]
    single = _engine([{"name": "a", "model": str(tiny["a"])}]).generate([Request(p, params) for p in prompts])
    double = _engine([{"name": "x", "model": str(tiny["a"]), "weight": 0.4},
                      {"name": "y", "model": str(tiny["a"]), "weight": 0.6}]).generate(
        [Request(p, params) for p in prompts])
    for s, d in zip(single, double, strict=True):
        assert s.token_ids == d.token_ids
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(d.logprobs), atol=1e-5, rtol=0)


def test_seed_gives_the_same_text_whatever_else_is_batched(tiny):
    tok = _tok(tiny)
    members = [{"name": "a", "model": str(tiny["a"])}, {"name": "b", "model": str(tiny["b"])}]
    seeded = Request(tok.encode("The quick"), SamplingParams(max_tokens=20, temperature=0.9, seed=1234,
                                                             ignore_eos=True))
    alone = _engine(members).generate([seeded])[0].token_ids
    others = [Request(tok.encode(p), SamplingParams(max_tokens=n, temperature=t, top_p=0.9, ignore_eos=True))
              for p, n, t in [("def", 5, 1.0), ("Una frase en", 30, 0.5), ("2 + 2", 12, 1.3)]]
    seeded_again = Request(seeded.prompt_ids, seeded.params)
    batched = _engine(members, max_batch=2).generate([others[0], seeded_again, others[1], others[2]])
    assert batched[1].token_ids == alone
    other_seed = Request(seeded.prompt_ids, SamplingParams(max_tokens=20, temperature=0.9, seed=99, ignore_eos=True))
    assert _engine(members).generate([other_seed])[0].token_ids != alone


def test_padded_vocabulary_tail_is_cut_to_the_shared_part(tiny):
    engine = _engine([{"name": "a", "model": str(tiny["a"])}, {"name": "p", "model": str(tiny["padded"])}])
    assert engine.composition.vocab_size == len(_tok(tiny))
    assert engine.members[1].vocab_size == len(_tok(tiny)) + 12
    out = engine.generate([Request(_tok(tiny).encode("hi"), SamplingParams(max_tokens=5, ignore_eos=True))])
    assert all(t < len(_tok(tiny)) for t in out[0].token_ids)


def test_mismatched_vocabularies_are_refused_naming_both_members(tiny, other_tokenizer_model):
    with pytest.raises(ConfigError, match="'a' and 'other'") as err:
        _engine([{"name": "a", "model": str(tiny["a"])}, {"name": "other", "model": str(other_tokenizer_model)}])
    assert err.value.param == "members"


def test_missing_model_path_names_the_field(tmp_path):
    with pytest.raises(ConfigError) as err:
        _engine([{"name": "a", "model": str(tmp_path / "nowhere")}])
    assert err.value.param == "model"


def test_bad_requests_raise_typed_errors_naming_the_field(tiny):
    engine = _engine([{"name": "a", "model": str(tiny["a"])}, {"name": "b", "model": str(tiny["b"])}])
    tok = _tok(tiny)
    cases = [
        (Request([], SamplingParams()), "prompt"),
        (Request([10**6], SamplingParams()), "prompt"),
        (Request(tok.encode("hi"), SamplingParams(max_tokens=10_000)), "max_tokens"),
        (Request(tok.encode("hi"), composition={"weights": {"a": -1.0, "b": 2.0}}), "composition.weights.a"),
        (Request(tok.encode("hi"), composition={"weights": {"a": 0.2, "b": 0.2}}), "composition.weights"),
        (Request(tok.encode("hi"), composition={"weights": {"zz": 1.0}}), "composition.weights"),
        (Request(tok.encode("hi"), composition={"alpha": 1.0}), "composition.alpha"),
        (Request(tok.encode("hi"), SamplingParams(logit_bias={10**6: 1.0})), "logit_bias"),
    ]
    for request, param in cases:
        with pytest.raises(InvalidRequestError) as err:
            engine.generate([request])
        assert err.value.param == param, (request, err.value)
    assert isinstance(pytest.raises(ContextLengthError, engine.check, cases[2][0]).value, InvalidRequestError)
    for field, value in [("max_tokens", 0), ("top_p", 0.0), ("top_p", 1.5)]:
        with pytest.raises(InvalidRequestError) as err:
            SamplingParams(**{field: value})
        assert err.value.param == field
    assert not engine.running and engine.free_slots == 4  # nothing leaked


def test_stop_strings_and_max_tokens_finish_reasons(tiny):
    engine = _engine([{"name": "a", "model": str(tiny["a"])}])
    tok = _tok(tiny)
    free = engine.generate([Request(tok.encode("The"), SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))])[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 30
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 2]
    cut = free.text.index(stop)
    out = engine.generate([Request(tok.encode("The"), SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                                     stop=(stop,)))])[0]
    assert out.finish_reason == "stop" and out.text == free.text[:cut]
    stop_id = free.token_ids[5]
    out = engine.generate([Request(tok.encode("The"), SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                                     stop_token_ids=(stop_id,)))])[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]


def test_abort_frees_the_slot_at_once(tiny):
    engine = _engine([{"name": "a", "model": str(tiny["a"])}], max_batch=2)
    tok = _tok(tiny)
    r = Request(tok.encode("The"), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add([r])
    engine.step()
    assert engine.abort(r.request_id) and engine.free_slots == 2 and engine.members[0].live_slots == []
    assert not engine.abort(r.request_id)
