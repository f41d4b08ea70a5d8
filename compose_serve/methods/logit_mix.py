"""Product of experts / logit mixture (PackLLM): ``log_softmax(sum_k w_k z_k)``.

Weights are fixed (config, uniform by default), per request, or PackLLM's prompt-perplexity
weights ``softmax(-CE_k(prompt) / tau)`` computed at prefill.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import kernels
from .base import Fused, Method


class LogitMix(Method):
    name = "logit_mix"
    serves_members_alone = True

    def __init__(self, member_names, weights, dynamic: str = "fixed", tau: float = 1.0) -> None:
        self.member_names = list(member_names)
        self.weights = list(weights)
        self.tau = tau
        self.uses_prompt_nll = dynamic == "prompt_perplexity"

    def default_weights(self) -> list[float]:
        return list(self.weights)

    def raw_shift(self, member_logits: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """Exact: ``log_softmax(s) + logsumexp(s) = s`` for ``s = sum_k w_k z_k``."""
        raw = sum(weights[:, k : k + 1].to(z.device) * z.float() for k, z in enumerate(member_logits))
        return torch.logsumexp(raw, dim=-1).to(weights.device)

    def fuse_sample(self, member_logits, weights, temperature, seeds):
        """``kernels.sample_mix_logits``: the coefficients are the row weights."""
        tokens, logprobs = kernels.sample_mix_logits(member_logits, weights, temperature, seeds)
        return tokens, logprobs, weights

    def fuse(self, member_logits: Sequence[torch.Tensor], weights: torch.Tensor) -> Fused:
        one_hot = self.one_hot_rows(member_logits, weights)
        if one_hot is not None:
            return Fused(one_hot, weights)
        return Fused(kernels.mix_logits(member_logits, weights), weights)
