"""Routed compositions: the router's weights by hand, top_k members only, fallback, exactness.

The router is a hand-made logistic regression over layer-1 mean-pooled hidden states of the tiny
base ``a``; its probabilities are recomputed here from transformers' own ``output_hidden_states``
and numpy, independently of ``compose_serve.router``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compose_serve.composition import build_composition
from compose_serve.config import parse_composition
from compose_serve.engine import Engine, Request
from compose_serve.errors import ConfigError
from compose_serve.members.shared import SharedMember
from compose_serve.router import Router
from compose_serve.sampling import SamplingParams

PROMPTS = ["The quick brown", "Compose models at decoding time", "2 +", "def add(a, b):\n", "Una frase"]
NAMES = ["general", "one", "two"]


def _router(tmp_path, weight, bias, names=NAMES):
    d = weight.shape[1]
    router = Router(list(names), layer=1, pooling="mean", mean=torch.zeros(d), std=torch.ones(d),
                    weight=weight, bias=bias)
    router.save(tmp_path / "router")
    return tmp_path / "router"


def _spec(tiny, router_dir, **params):
    return parse_composition({
        "name": "routed", "method": "mixture",
        "members": [{"name": "general", "model": str(tiny["a"])},
                    {"name": "one", "model": str(tiny["a"]), "adapter": str(tiny["lora_a"])},
                    {"name": "two", "model": str(tiny["a"]), "adapter": str(tiny["lora_a2"])}],
        "params": {"weights": "router", "router": str(router_dir), **params}})


def _hand_probs(tiny, ids, weight, bias) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(tiny["a"]).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]  # [L, d]
    features = hidden.double().numpy().mean(axis=0)
    z = weight.double().numpy() @ features + bias.double().numpy()
    return np.exp(z - z.max()) / np.exp(z - z.max()).sum()


@pytest.fixture(scope="module")
def router_weights():
    torch.manual_seed(0)
    return torch.randn(3, 64) * 2.0, torch.zeros(3)


def test_router_probabilities_equal_the_classifier_by_hand_and_top1_runs_one_member(tiny, tmp_path, router_weights):
    weight, bias = router_weights
    composition = build_composition(_spec(tiny, _router(tmp_path, weight, bias), top_k=1))
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    calls = {name: 0 for name in NAMES}
    for member in composition.members:
        assert isinstance(member, SharedMember)
        for kind in ("prefill", "decode"):
            original = getattr(member, kind)

            def counted(slots, *args, _orig=original, _name=member.name, **kwargs):
                calls[_name] += len(slots)
                return _orig(slots, *args, **kwargs)

            setattr(member, kind, counted)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outs = Engine(composition, max_batch=8).generate([Request(tok.encode(p), params) for p in PROMPTS])
    chosen = []
    for prompt, out in zip(PROMPTS, outs, strict=True):
        want = _hand_probs(tiny, tok.encode(prompt), weight, bias)
        got = out.diagnostics[0]["router"]
        np.testing.assert_allclose([got[n] for n in NAMES], want, atol=1e-5)
        top = NAMES[int(want.argmax())]
        chosen.append(top)
        assert out.diagnostics[0]["weights"] == {n: float(n == top) for n in NAMES}
    assert len(set(chosen)) > 1, "the test router should pick different members for different prompts"
    for name in NAMES:  # a member outside top_k is never prefilled nor decoded: rows counted per call
        assert calls[name] == chosen.count(name) * 4, (name, calls, chosen)


def test_a_long_prompt_is_routed_in_chunks_between_decode_steps(tiny, tmp_path, router_weights):
    """Under a 4-token budget the router reads a 40-token prompt over 10 steps while two others
    decode: its probabilities still equal the classifier by hand on the whole prompt, and the
    running sequences' tokens are those they get without it."""
    weight, bias = router_weights
    composition = build_composition(_spec(tiny, _router(tmp_path, weight, bias), top_k=1))
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    chunks = []
    inner = composition.prompt_features_chunk
    composition.prompt_features_chunk = lambda state, piece, *a: chunks.append(len(piece)) or inner(state, piece, *a)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    early = [Request(tok.encode(p), params) for p in PROMPTS[:2]]
    alone = Engine(composition, max_batch=3, max_prefill_tokens=4).generate(
        [Request(r.prompt_ids, params) for r in early])
    long_ids = (tok.encode(" ".join(PROMPTS)) * 3)[:40]
    engine = Engine(composition, max_batch=3, max_prefill_tokens=4)
    engine.add(early)
    while engine.prefilling:
        engine.step()
    chunks.clear()
    events = engine.step() + engine.add([Request(long_ids, params, request_id="long")])
    while engine.busy:
        events += engine.step()
    assert chunks == [4] * 10  # the router read the prompt 4 tokens a step
    first = next(e for e in events if e.request_id == "long")
    np.testing.assert_allclose([first.diagnostics["router"][n] for n in NAMES],
                               _hand_probs(tiny, long_ids, weight, bias), atol=1e-5)
    for request, want in zip(early, alone, strict=True):
        got = [e.token_id for e in events if e.request_id == request.request_id]
        assert got == want.token_ids[len(want.token_ids) - len(got):]


def test_top1_greedy_tokens_and_logprobs_equal_the_member_served_alone(tiny, tmp_path, router_weights):
    weight, bias = router_weights
    routed = Engine(build_composition(_spec(tiny, _router(tmp_path, weight, bias), top_k=1)), max_batch=3)
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=5)
    outs = routed.generate([Request(tok.encode(p), params) for p in PROMPTS])
    for prompt, out in zip(PROMPTS, outs, strict=True):
        member = max(out.diagnostics[0]["weights"], key=out.diagnostics[0]["weights"].get)
        adapter = {"general": None, "one": tiny["lora_a"], "two": tiny["lora_a2"]}[member]
        alone = {"name": member, "model": str(tiny["a"])} | ({"adapter": str(adapter)} if adapter else {})
        spec = parse_composition({"name": "alone", "method": "mixture", "members": [alone]})
        [want] = Engine(build_composition(spec), max_batch=1).generate([Request(tok.encode(prompt), params)])
        assert out.token_ids == want.token_ids
        np.testing.assert_allclose(out.logprobs, want.logprobs, atol=1e-5)


def test_min_confidence_falls_back_to_the_fixed_weights(tiny, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    unsure = _router(tmp_path / "u", torch.zeros(3, 64), torch.zeros(3))  # 1/3 each
    engine = Engine(build_composition(_spec(tiny, unsure, top_k=1, min_confidence=0.5)), max_batch=2)
    [out] = engine.generate([Request(tok.encode(PROMPTS[0]), params)])
    assert out.diagnostics[0]["weights"] == pytest.approx({n: 1 / 3 for n in NAMES})
    sure = _router(tmp_path / "s", torch.zeros(3, 64), torch.tensor([0.0, 6.0, 0.0]))  # p(one) = 0.995
    engine = Engine(build_composition(_spec(tiny, sure, top_k=1, min_confidence=0.5)), max_batch=2)
    [out] = engine.generate([Request(tok.encode(PROMPTS[0]), params)])
    assert out.diagnostics[0]["weights"] == {"general": 0.0, "one": 1.0, "two": 0.0}
    # top_k 2 keeps the two most probable, renormalised
    two = _router(tmp_path / "t", torch.zeros(3, 64), torch.tensor([1.0, 2.0, 0.0]))
    engine = Engine(build_composition(_spec(tiny, two, top_k=2)), max_batch=2)
    [out] = engine.generate([Request(tok.encode(PROMPTS[0]), params)])
    e1, e2 = np.exp(1.0), np.exp(2.0)
    assert out.diagnostics[0]["weights"] == pytest.approx({"general": e1 / (e1 + e2), "one": e2 / (e1 + e2), "two": 0})
    # a request's own weights win over the router
    [out] = engine.generate([Request(tok.encode(PROMPTS[0]), params, composition={"weights": {"two": 1.0}})])
    assert "router" not in out.diagnostics[0] and out.diagnostics[0]["weights"]["two"] == 1.0


def test_a_router_for_other_members_or_a_missing_one_is_a_config_error(tiny, tmp_path):
    other = _router(tmp_path, torch.zeros(3, 64), torch.zeros(3), names=["general", "one", "three"])
    with pytest.raises(ConfigError) as err:
        build_composition(_spec(tiny, other))
    assert err.value.param == "params.router" and "three" in err.value.message
    with pytest.raises(ConfigError) as err:
        build_composition(_spec(tiny, tmp_path / "missing"))
    assert err.value.param == "params.router"
    with pytest.raises(ConfigError) as err:
        parse_composition({"name": "r", "method": "mixture", "members": [{"name": "a", "model": str(tiny["a"])}],
                           "params": {"weights": "router"}})
    assert err.value.param.startswith("params")


def test_share_base_false_gives_each_member_its_own_copy_and_the_same_tokens(tiny, tmp_path, router_weights):
    weight, bias = router_weights
    router = _router(tmp_path, weight, bias)
    shared = build_composition(_spec(tiny, router, top_k=1))
    own = build_composition(_spec(tiny, router, top_k=1).model_copy(update={"share_base": False}))
    assert len({id(m.lm) for m in shared.members}) == 1
    assert len({id(m.lm) for m in own.members}) == 3
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    requests = [Request(tok.encode(p), params) for p in PROMPTS]
    a = Engine(shared, max_batch=4).generate(requests)
    b = Engine(own, max_batch=4).generate([Request(r.prompt_ids, params) for r in requests])
    assert [x.token_ids for x in a] == [y.token_ids for y in b]


def test_the_fused_teacher_routes_each_row_like_the_engine(tiny, tmp_path, router_weights):
    from compose_serve.train.teacher import FusedTeacher

    weight, bias = router_weights
    composition = build_composition(_spec(tiny, _router(tmp_path, weight, bias), top_k=1))
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    tails = [tok.encode(" and then"), tok.encode(" x"), tok.encode(" 12 * 3")]
    width = max(len(p) + len(t) for p, t in zip(prompts, tails, strict=True))
    ids = torch.zeros((3, width), dtype=torch.long)
    mask, prompt = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    for row, (p, t) in enumerate(zip(prompts, tails, strict=True)):
        ids[row, : len(p) + len(t)] = torch.tensor(p + t)
        mask[row, : len(p) + len(t)] = 1
        prompt[row, : len(p)] = True
    select = torch.zeros_like(prompt)
    select[:, :-1] = (mask[:, :-1] * mask[:, 1:]).bool()
    got = FusedTeacher(composition)(ids, mask, prompt, select)  # [N, V]
    rows_of = select.nonzero()[:, 0]
    for row, p in enumerate(prompts):
        chosen = NAMES[int(_hand_probs(tiny, p, weight, bias).argmax())]
        alone = FusedTeacher(composition, {"weights": {chosen: 1.0}})(ids[row:row + 1], mask[row:row + 1],
                                                                       prompt[row:row + 1], select[row:row + 1])
        torch.testing.assert_close(got[rows_of == row], alone, atol=1e-5, rtol=1e-5)
