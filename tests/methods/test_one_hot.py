"""The one-hot fast path of mixture / logit_mix equals the full fusion (the torch reference)."""

from __future__ import annotations

import torch
from compose_serve.kernels.reference import mix_logits as mix_logits_reference
from compose_serve.kernels.reference import mix_probs as mix_probs_reference

from compose_serve.methods.logit_mix import LogitMix
from compose_serve.methods.mixture import Mixture


def test_one_hot_rows_equal_the_reference_fusion_and_mixed_rows_take_the_full_path():
    torch.manual_seed(0)
    logits = [torch.randn(5, 1000) * 4 for _ in range(3)]
    logits[1][2, 7] = float("-inf")
    weights = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
    temps = [1.0, 0.7, 1.3]
    mixture = Mixture(["a", "b", "c"], [1 / 3] * 3, temps)
    got = mixture.fuse(logits, weights).logprobs
    want = mix_probs_reference(logits, weights, torch.tensor(temps))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert Mixture.one_hot_rows(logits, weights) is not None
    assert Mixture.one_hot_rows(logits, torch.full((5, 3), 1 / 3)) is None  # a real mixture
    got = LogitMix(["a", "b", "c"], [1 / 3] * 3).fuse(logits, weights).logprobs
    torch.testing.assert_close(got, mix_logits_reference(logits, weights), atol=1e-6, rtol=0)
