"""The torch reference: the specification's edge cases, and the naive form it is measured against."""

from __future__ import annotations

import torch
from compose_serve.kernels import reference

NEG_INF = float("-inf")


def test_zero_weight_member_with_nan_or_empty_row_changes_nothing():
    z = torch.randn(3, 2, 10)
    w = torch.tensor([[0.5, 0.0, 0.5], [0.5, 0.0, 0.5]])
    expected = reference.mix_probs(z[[0, 2]], w[:, [0, 2]])
    z[1, 0] = float("nan")
    z[1, 1] = NEG_INF
    assert torch.equal(reference.mix_probs(z, w), expected)


def test_member_with_no_finite_score_contributes_nothing():
    z = torch.randn(2, 1, 10)
    z[1] = NEG_INF
    w = torch.tensor([[0.25, 0.75]])
    out = reference.mix_probs(z, w)
    torch.testing.assert_close(out, torch.log_softmax(z[0], -1) + torch.tensor(0.25).log())


def test_naive_form_agrees_until_it_underflows():
    z = torch.randn(3, 4, 100) * 3
    w = torch.softmax(torch.randn(4, 3), -1)
    t = torch.tensor([0.7, 1.0, 1.3])
    torch.testing.assert_close(reference.naive_mix_probs(z, w, t), reference.mix_probs(z, w, t))
    z[:, :, 0] = -200.0  # probability ~e^-200: 0 in float32 probability space
    assert torch.isneginf(reference.naive_mix_probs(z, w)[:, 0]).all()
    assert torch.isfinite(reference.mix_probs(z, w)[:, 0]).all()


def test_generators_from_seeds_repeat_a_draw():
    logprobs = torch.log_softmax(torch.randn(1, 50), -1).expand(5, 50)  # one distribution
    temp, seeds = torch.ones(5), torch.tensor([3, 1, 4, 1, 5])
    first = reference.gumbel_argmax(logprobs, temp, reference.generators_from_seeds(seeds, logprobs.device))
    again = reference.gumbel_argmax(logprobs, temp, reference.generators_from_seeds(seeds, logprobs.device))
    assert torch.equal(first[0], again[0])
    assert first[0][1] == first[0][3]  # same seed, same row: same token
