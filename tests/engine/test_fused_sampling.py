"""The engine's fused sampling path (``Engine._fused_draw``: ``Method.fuse_sample``, the Triton
samplers of ``compose_serve.kernels``), run here in the Triton interpreter on CPU tensors.

References: the unfused path (``method.fuse`` + ``Sampler``) for greedy tokens and log-probs, and a
no-cache teacher-forced recompute of the fused log-probs (``engine.scoring``) for sampled tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from compose_serve.composition import build_composition
from compose_serve.config import parse_composition
from compose_serve.engine import Engine, Request
from compose_serve.engine.scoring import score_prompts
from compose_serve.sampling import SamplingParams

PROMPTS = ["The quick brown fox", "def add(a, b):", "2 + 2", "Una frase"]


@pytest.fixture(autouse=True)
def triton_kernels(monkeypatch):
    """Every fusion goes through the Triton kernels (the interpreter here, compiled on CUDA)."""
    monkeypatch.setenv("COMPOSE_SERVE_KERNELS", "triton")


@pytest.fixture(scope="module")
def tok(tiny):
    return AutoTokenizer.from_pretrained(tiny["tokenizer"])


def _composition(tiny, method="mixture", members=("a", "b"), weights=(0.3, 0.7)):
    spec = parse_composition({"name": "t", "method": method, "members": [
        {"name": m, "model": str(tiny[m]), "weight": w} for m, w in zip(members, weights, strict=True)]})
    return build_composition(spec)


def _counting(engine):
    """Count the calls of the method's fused sampler."""
    calls = []
    inner = engine.method.fuse_sample

    def counted(*args):
        calls.append(args[0][0].shape[0])
        return inner(*args)

    engine.method.fuse_sample = counted
    return calls


@pytest.mark.parametrize("method", ["mixture", "logit_mix"])
def test_greedy_tokens_and_logprobs_equal_the_unfused_path(tiny, tok, method):
    composition = _composition(tiny, method)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    requests = [Request(tok.encode(p), params) for p in PROMPTS]
    fused = Engine(composition, max_batch=4, fused_sampling=True)
    calls = _counting(fused)
    got = fused.generate(requests)
    want = Engine(composition, max_batch=4, fused_sampling=False).generate(
        [Request(r.prompt_ids, params) for r in requests])
    assert len(calls) >= 12  # every step drew through the fused sampler
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5, rtol=0)
        assert g.top_logprobs == [[]] * 12  # logprobs 0: the chosen token's only, as unfused


def test_one_hot_rows_and_a_single_member(tiny, tok):
    """Per-request one-hot weights (a member served alone: the others get 0 and do not run) and a
    one-member composition give the member's own greedy tokens."""
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompt = tok.encode(PROMPTS[0])
    alone = Engine(_composition(tiny, members=("b",), weights=(1.0,)), fused_sampling=False).generate(
        [Request(prompt, params)])[0]
    single = Engine(_composition(tiny, members=("b",), weights=(1.0,)), fused_sampling=True).generate(
        [Request(prompt, params)])[0]
    mixed = Engine(_composition(tiny), fused_sampling=True)
    calls = _counting(mixed)
    routed = mixed.generate([Request(prompt, params, composition={"weights": {"b": 1.0}}),
                             Request(tok.encode(PROMPTS[1]), params)])[0]
    assert calls and single.token_ids == alone.token_ids == routed.token_ids
    torch.testing.assert_close(torch.tensor(routed.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)


def test_sampled_tokens_carry_their_fused_logprobs_and_follow_their_seed(tiny, tok):
    composition = _composition(tiny)
    seeded = SamplingParams(max_tokens=16, temperature=0.9, seed=77, ignore_eos=True)
    prompt = tok.encode(PROMPTS[0])
    engine = Engine(composition, max_batch=4, fused_sampling=True)
    calls = _counting(engine)
    alone = engine.generate([Request(prompt, seeded)])[0]
    crowd = engine.generate([Request(tok.encode(p), SamplingParams(max_tokens=9, temperature=1.2, ignore_eos=True))
                             for p in PROMPTS[1:]] + [Request(prompt, seeded)])[-1]
    other_seed = engine.generate([Request(prompt, SamplingParams(max_tokens=16, temperature=0.9, seed=78,
                                                                 ignore_eos=True))])[0]
    assert calls
    assert alone.token_ids == crowd.token_ids  # the row's draws depend on its seed alone
    assert other_seed.token_ids != alone.token_ids
    # each drawn token's log-prob is the fused one at its position: recomputed without a cache
    rows, _ = score_prompts(composition, [prompt + alone.token_ids], torch.tensor([[0.3, 0.7]]), [0])
    teacher = [entry.logprob for entry in rows[0][len(prompt):]]
    torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(teacher), atol=1e-4, rtol=0)


def test_rows_that_need_the_full_row_take_the_unfused_path(tiny, tok):
    """top-n log-probs, top_p, a penalty or an EOS ban of min_tokens need the fused row: a step with
    such a row is not fused; min_tokens only for its first tokens."""
    engine = Engine(_composition(tiny), max_batch=4, fused_sampling=True)
    calls = _counting(engine)
    plain = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for needs_row in (SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2),
                      SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True),
                      SamplingParams(max_tokens=6, temperature=0.0, repetition_penalty=1.3, ignore_eos=True)):
        engine.generate([Request(tok.encode(PROMPTS[0]), plain), Request(tok.encode(PROMPTS[1]), needs_row)])
        assert calls == []
    engine.generate([Request(tok.encode(PROMPTS[0]), SamplingParams(max_tokens=6, min_tokens=4, temperature=0.0))])
    assert calls == [1, 1]  # tokens 5 and 6: the first four had EOS banned


def test_a_failing_kernel_turns_fused_sampling_off_and_the_step_goes_on(tiny, tok, caplog):
    composition = _composition(tiny)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = Engine(composition, fused_sampling=False).generate([Request(tok.encode(PROMPTS[2]), params)])[0]
    engine = Engine(composition, fused_sampling=True)

    def broken(*args):
        raise RuntimeError("no kernel for this device")

    engine.method.fuse_sample = broken
    got = engine.generate([Request(tok.encode(PROMPTS[2]), params)])[0]
    assert got.token_ids == want.token_ids
    assert engine.fused_sampling is False
    assert "fused sampling failed" in caplog.text


def test_it_is_on_where_the_kernels_run_triton(tiny, monkeypatch):
    composition = _composition(tiny)
    assert Engine(composition).fused_sampling is True  # COMPOSE_SERVE_KERNELS=triton (fixture)
    monkeypatch.delenv("COMPOSE_SERVE_KERNELS")
    assert Engine(composition).fused_sampling is (composition.members[0].device.type == "cuda")
    delta = build_composition(parse_composition({
        "name": "d", "method": "delta", "params": {"alpha": 1.0},
        "members": [{"name": "base", "model": str(tiny["a"]), "role": "base"},
                    {"name": "expert", "model": str(tiny["b"]), "role": "expert"},
                    {"name": "anti", "model": str(tiny["c"]), "role": "antiexpert"}]}))
    assert Engine(delta, fused_sampling=True).fused_sampling is False  # delta has no fused sampler
