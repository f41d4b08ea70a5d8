"""Sampler tests by properties, each against a plain-Python/numpy reference written here.

greedy = argmax; the allowed sets of top-k / top-p / min-p match a per-row loop; penalties and
logit_bias match the formulas by hand; a seed repeats alone and batched; draws pass chi-square
against the target distribution; returned log-probs are the fused ones; bad params name the field.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import compose_serve.sampling as sampling
from compose_serve.errors import InvalidRequestError
from compose_serve.sampling import Sampler, SamplingParams, make_generator

# ---------------------------------------------------------------------------------------------
# References: one row at a time, plain Python over float64
# ---------------------------------------------------------------------------------------------


def ref_penalised(row: np.ndarray, p: SamplingParams, prompt: list[int], output: list[int]):
    scores = row.astype(np.float64).copy()
    for token, bias in (p.logit_bias or {}).items():
        scores[token] += bias
    for token in set(prompt) | set(output):
        if scores[token] < 0:
            scores[token] *= p.repetition_penalty
        else:
            scores[token] /= p.repetition_penalty
    for token, count in Counter(output).items():
        scores[token] -= p.frequency_penalty * count + p.presence_penalty
    return scores


def ref_target(scores: np.ndarray, p: SamplingParams) -> dict[int, float]:
    """The distribution a row samples from: ``{token: prob}`` over its allowed set."""
    if p.greedy:
        return {int(np.argmax(scores)): 1.0}
    tempered = scores.astype(np.float64) / p.temperature
    order = sorted(range(len(scores)), key=lambda t: (-tempered[t], t))
    if p.top_k > 0:
        order = order[: p.top_k]
    probs = _softmax_over(tempered, order)
    kept, mass = [], 0.0
    for token in order:  # top-p: the smallest prefix reaching top_p
        kept.append(token)
        mass += probs[token]
        if mass >= p.top_p:
            break
    probs = _softmax_over(tempered, kept)
    highest = max(probs.values())
    kept = [t for t in kept if probs[t] >= p.min_p * highest]
    return _softmax_over(tempered, kept)


def _softmax_over(scores: np.ndarray, tokens: list[int]) -> dict[int, float]:
    top = max(scores[t] for t in tokens)
    weights = {t: math.exp(scores[t] - top) for t in tokens}
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


def random_logprobs(batch: int, vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(batch, vocab, generator=g) * scale, dim=-1)


def run(sampler, logprobs, params, generators=None, prompts=None, outputs=None):
    batch = len(params)
    generators = generators or [make_generator(i) for i in range(batch)]
    prompts = prompts if prompts is not None else [[] for _ in range(batch)]
    outputs = outputs if outputs is not None else [[] for _ in range(batch)]
    return sampler(logprobs, params, generators, prompts, outputs)


# ---------------------------------------------------------------------------------------------
# Greedy
# ---------------------------------------------------------------------------------------------


def test_greedy_equals_argmax_and_draws_nothing():
    logprobs = random_logprobs(6, 300, seed=0)
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1, temperature=1.5)] * 3
    generators = [make_generator(i) for i in range(6)]
    states = [g.get_state().clone() for g in generators]
    out = run(Sampler(), logprobs, params, generators)
    assert torch.equal(out.tokens, logprobs.argmax(dim=-1))
    assert all(torch.equal(g.get_state(), s) for g, s in zip(generators, states, strict=True))


def test_greedy_rows_in_a_mixed_batch_draw_nothing():
    logprobs = random_logprobs(3, 100, seed=1)
    params = [SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(temperature=0.0)]
    generators = [make_generator(i) for i in range(3)]
    states = [g.get_state().clone() for g in generators]
    out = run(Sampler(), logprobs, params, generators)
    assert out.tokens[0] == logprobs[0].argmax() and out.tokens[2] == logprobs[2].argmax()
    assert torch.equal(generators[0].get_state(), states[0])
    assert torch.equal(generators[2].get_state(), states[2])
    assert not torch.equal(generators[1].get_state(), states[1])


def test_tiny_temperature_stays_finite_and_picks_the_argmax():
    logprobs = random_logprobs(4, 500, seed=2)
    params = [SamplingParams(temperature=1e-30)] * 4
    processed = Sampler().processed_logits(logprobs, params, [[]] * 4, [[]] * 4)
    assert not torch.isnan(processed).any()
    assert torch.equal(run(Sampler(), logprobs, params).tokens, logprobs.argmax(dim=-1))


def test_temperatures_and_top_p_that_underflow_float32_keep_the_argmax():
    """Issue 13, item 3: temperature 1e-300 and top_p 1e-46 are 0 in float32; they used to turn
    every row into NaN, and every token into id 0 (an empty 200)."""
    logprobs = random_logprobs(4, 500, seed=3)
    params = [SamplingParams(temperature=1e-300), SamplingParams(temperature=3e-6),
              SamplingParams(top_p=1e-46, seed=1), SamplingParams(top_p=1e-46, temperature=0.5)]
    assert params[0].greedy and params[1].greedy and not params[2].greedy
    processed = Sampler().processed_logits(logprobs, params, [[]] * 4, [[]] * 4)
    assert torch.equal(processed.argmax(dim=-1), logprobs.argmax(dim=-1))
    assert (torch.isfinite(processed).sum(dim=-1) == 1).all()  # exactly one token allowed per row
    generators = [make_generator(i) for i in range(4)]
    assert torch.equal(run(Sampler(), logprobs, params, generators).tokens, logprobs.argmax(dim=-1))


# ---------------------------------------------------------------------------------------------
# Truncation masks against the reference
# ---------------------------------------------------------------------------------------------

MASK_PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=0.0),
    SamplingParams(top_k=5),
    SamplingParams(top_k=20, temperature=0.5),
    SamplingParams(top_p=0.9),
    SamplingParams(top_p=0.3, temperature=1.7),
    SamplingParams(top_p=1e-6),  # only the most likely token
    SamplingParams(min_p=0.1),
    SamplingParams(min_p=1.0),
    SamplingParams(top_k=30, top_p=0.8, min_p=0.05, temperature=0.8),
    SamplingParams(top_k=1000),  # larger than the vocabulary: no-op
]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allowed_sets_match_the_reference(seed: int):
    vocab = 257
    logprobs = random_logprobs(len(MASK_PARAMS), vocab, seed=100 + seed)
    batch = len(MASK_PARAMS)
    processed = Sampler().processed_logits(logprobs, MASK_PARAMS, [[]] * batch, [[]] * batch)
    assert processed.shape == logprobs.shape
    for row, p in enumerate(MASK_PARAMS):
        target = ref_target(logprobs[row].double().numpy(), p)
        allowed = set(torch.isfinite(processed[row]).nonzero().flatten().tolist())
        assert allowed == set(target), f"row {row}: {p}"
        got = torch.log_softmax(processed[row].double(), dim=-1)
        for token, prob in target.items():
            assert got[token].item() == pytest.approx(math.log(prob), abs=1e-4)


def test_each_row_is_truncated_as_if_alone():
    logprobs = random_logprobs(len(MASK_PARAMS), 129, seed=7)
    sampler = Sampler()
    batch = len(MASK_PARAMS)
    together = sampler.processed_logits(logprobs, MASK_PARAMS, [[]] * batch, [[]] * batch)
    for row, p in enumerate(MASK_PARAMS):
        alone = sampler.processed_logits(logprobs[row : row + 1], [p], [[]], [[]])
        assert torch.equal(alone[0], together[row])


def test_sort_and_penalty_passes_are_skipped_when_no_row_needs_them(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("this pass should have been skipped")

    monkeypatch.setattr(sampling, "_top_k_top_p", fail)
    monkeypatch.setattr(sampling, "_token_counts", fail)
    logprobs = random_logprobs(3, 50, seed=3)
    params = [SamplingParams(temperature=0.7, min_p=0.1), SamplingParams(), SamplingParams(top_k=0)]
    run(Sampler(), logprobs, params, outputs=[[1, 2], [3], []])
    greedy = [SamplingParams(temperature=0.0, top_p=0.5)] * 3
    run(Sampler(), logprobs, greedy)  # all greedy: no sort even though top_p < 1
    assert Sampler().apply_penalties(logprobs, params, [[1]] * 3, [[2]] * 3) is logprobs


# ---------------------------------------------------------------------------------------------
# Penalties and logit_bias against the formulas
# ---------------------------------------------------------------------------------------------

PENALTY_PARAMS = [
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(frequency_penalty=0.5, presence_penalty=-0.7),
    SamplingParams(logit_bias={"3": 5.0, 7: -100.0, 10: 20.0}, repetition_penalty=2.0),
    SamplingParams(logit_bias={4: 1.5}, frequency_penalty=-1.0, repetition_penalty=0.5),
    SamplingParams(),
]
PROMPTS = [[1, 2, 2, 9], [1, 5], [3, 10, 11], [4, 4, 4], [1, 2, 3]]
OUTPUTS = [[5, 5, 6], [5, 5, 5, 8, 1], [10, 12], [4, 6, 6, 6], [7, 7]]


def test_penalties_and_bias_match_the_formulas():
    vocab = 40
    logprobs = random_logprobs(len(PENALTY_PARAMS), vocab, seed=11)
    scores = Sampler().apply_penalties(logprobs, PENALTY_PARAMS, PROMPTS, OUTPUTS)
    for row, p in enumerate(PENALTY_PARAMS):
        want = ref_penalised(logprobs[row].numpy(), p, PROMPTS[row], OUTPUTS[row])
        np.testing.assert_allclose(scores[row].numpy(), want, rtol=1e-6, atol=1e-5)
    # Token 10 of row 2 is positive after its bias, so the division branch was exercised.
    assert scores[2, 10] > 0
    assert torch.equal(logprobs, random_logprobs(len(PENALTY_PARAMS), vocab, seed=11))


def test_greedy_choice_follows_the_penalties():
    logprobs = random_logprobs(len(PENALTY_PARAMS), 40, seed=12)
    greedy = [SamplingParams(**{**vars(p), "temperature": 0.0}) for p in PENALTY_PARAMS]
    out = run(Sampler(), logprobs, greedy, prompts=PROMPTS, outputs=OUTPUTS)
    for row, p in enumerate(greedy):
        want = ref_penalised(logprobs[row].numpy(), p, PROMPTS[row], OUTPUTS[row])
        assert out.tokens[row].item() == int(np.argmax(want))


# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------

TARGET = SamplingParams(
    temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.2, presence_penalty=0.3, seed=1234
)
OTHERS = [
    SamplingParams(temperature=0.0, frequency_penalty=0.4),
    SamplingParams(temperature=1.4, min_p=0.02, seed=7),
    SamplingParams(top_k=3, logit_bias={0: 3.0}),
]


def generate(position: int, others: list[SamplingParams], seed: int, steps: int = 20) -> list[int]:
    """Run TARGET at ``position`` in a batch with ``others`` for ``steps`` steps; its tokens."""
    params = [*others[:position], TARGET, *others[position:]]
    batch, vocab = len(params), 200
    generators = [make_generator(seed if i == position else p.seed) for i, p in enumerate(params)]
    prompts = [[1, 2, 3, 4] for _ in params]
    outputs: list[list[int]] = [[] for _ in params]
    sampler = Sampler()
    for step in range(steps):
        logprobs = random_logprobs(batch, vocab, seed=1000 + step + 17 * len(others))
        logprobs[position] = random_logprobs(1, vocab, seed=step)[0]  # the target's own scores
        tokens = sampler(logprobs, params, generators, prompts, outputs).tokens.tolist()
        for row, token in enumerate(tokens):
            outputs[row].append(token)
    return outputs[position]


def test_a_seed_repeats_alone_and_batched():
    alone = generate(0, [], seed=TARGET.seed)
    assert generate(0, [], seed=TARGET.seed) == alone
    for position in (0, 1, 3):
        assert generate(position, OTHERS, seed=TARGET.seed) == alone, f"position {position}"
    assert generate(0, [], seed=TARGET.seed + 1) != alone


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rows_repeat_and_stay_in_their_allowed_sets():
    logprobs = random_logprobs(len(MASK_PARAMS), 32000, seed=5).cuda()
    batch = len(MASK_PARAMS)
    processed = Sampler().processed_logits(logprobs, MASK_PARAMS, [[]] * batch, [[]] * batch)
    runs = []
    for _ in range(2):
        generators = [make_generator(i, device="cuda") for i in range(batch)]
        runs.append(run(Sampler(), logprobs, MASK_PARAMS, generators).tokens)
    assert runs[0].device.type == "cuda" and torch.equal(runs[0], runs[1])
    assert torch.isfinite(processed.gather(-1, runs[0].unsqueeze(-1))).all()


def test_make_generator():
    a, b = make_generator(5), make_generator(5)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    c, d = make_generator(None), make_generator(None)
    assert not torch.equal(torch.rand(4, generator=c), torch.rand(4, generator=d))
    assert torch.equal(make_generator(-1).get_state(), make_generator(2**64 - 1).get_state())


# ---------------------------------------------------------------------------------------------
# Draws match the target distribution
# ---------------------------------------------------------------------------------------------

FUSED = torch.log_softmax(
    torch.tensor([[0.3, 2.0, -1.0, 1.0, -0.5, 1.5, -2.5, 0.0, 0.7, -1.5]]), -1
)
CHI_PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=0.7),
    SamplingParams(top_k=4),
    SamplingParams(top_p=0.8, temperature=1.3),
    SamplingParams(top_k=6, top_p=0.9, min_p=0.2, temperature=0.8),
]


@pytest.mark.parametrize("case", range(len(CHI_PARAMS)))
def test_draws_pass_chi_square(case: int):
    draws, vocab = 5000, FUSED.shape[-1]
    p = CHI_PARAMS[case]
    generator = make_generator(42 + case)
    logprobs = FUSED.expand(draws, vocab).contiguous()
    # One generator shared by every row: the rows draw one after another from one stream.
    tokens = run(Sampler(), logprobs, [p] * draws, [generator] * draws).tokens
    observed = np.bincount(tokens.numpy(), minlength=vocab)
    target = ref_target(FUSED[0].double().numpy(), p)
    expected = np.array([target.get(t, 0.0) for t in range(vocab)]) * draws
    assert observed[expected == 0].sum() == 0
    allowed = expected > 0
    assert chisquare(observed[allowed], expected[allowed]).pvalue > 1e-3
    if p.temperature != 1.0:  # the test has power: the same set without temperature is rejected
        untempered = _softmax_over(FUSED[0].double().numpy(), list(target))
        wrong = np.array([untempered.get(t, 0.0) for t in range(vocab)]) * draws
        assert chisquare(observed[allowed], wrong[allowed]).pvalue < 1e-3


# ---------------------------------------------------------------------------------------------
# Returned log-probs come from the fused distribution
# ---------------------------------------------------------------------------------------------


def test_returned_logprobs_are_the_fused_ones():
    logprobs = random_logprobs(4, 90, seed=21)
    params = [
        SamplingParams(logprobs=3, temperature=0.5, top_k=4, repetition_penalty=1.5),
        SamplingParams(logprobs=0, logit_bias={5: 50.0}),
        SamplingParams(temperature=0.0, presence_penalty=2.0),
        SamplingParams(logprobs=1, top_p=0.5),
    ]
    outputs = [[1, 2], [3], [int(logprobs[2].argmax())], []]
    out = run(Sampler(), logprobs, params, prompts=[[4]] * 4, outputs=outputs)
    assert out.tokens[1] == 5  # the bias decided the token; its log-prob is still the fused one
    for row in range(4):
        assert out.chosen_logprobs[row] == logprobs[row, out.tokens[row]]
    assert out.top_ids.shape == (4, 3) and out.top_ids.dtype == torch.int64
    for row in range(4):
        order = sorted(range(90), key=lambda t: -logprobs[row, t].item())[:3]
        assert out.top_ids[row].tolist() == order
        assert torch.equal(out.top_logprobs[row], logprobs[row, order])
    assert out.chosen_logprobs.dtype == torch.float32


def test_no_top_logprobs_unless_asked():
    out = run(Sampler(), random_logprobs(2, 30, seed=22), [SamplingParams()] * 2)
    assert out.top_ids is None and out.top_logprobs is None
    out = run(Sampler(), random_logprobs(2, 30, seed=22), [SamplingParams(logprobs=0)] * 2)
    assert out.top_ids.shape == (2, 0) and out.top_logprobs.shape == (2, 0)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
        ({"logit_bias": {1.5: 1.0}}, "logit_bias"),
        ({"logit_bias": {"-3": 1.0}}, "logit_bias"),
        ({"logit_bias": {3: 101.0}}, "logit_bias"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"n": 0}, "n"),
        ({"seed": "1"}, "seed"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_invalid_params_name_the_field(kwargs: dict, param: str):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert param in info.value.message


def test_params_are_normalised():
    p = SamplingParams(
        top_k=-1, stop="END", stop_token_ids=[2, 3], logit_bias={"12": 3, 4: -1.5}, temperature=1
    )
    assert p.top_k == 0 and p.stop == ("END",) and p.stop_token_ids == (2, 3)
    assert p.logit_bias == {12: 3.0, 4: -1.5}
    assert isinstance(p.temperature, float) and not p.greedy
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(top_k=1).greedy and SamplingParams(temperature=0).greedy
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(logit_bias={99: 1.0}).check_vocab(50)
    assert info.value.param == "logit_bias"
    SamplingParams(logit_bias={49: 1.0}, stop_token_ids=[49]).check_vocab(50)
