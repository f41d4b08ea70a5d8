"""Mixture of distributions (MoD), per step:

    log p_mix = logsumexp_k( log w_k + log_softmax(z_k / T_k) )        w_k >= 0, sum_k w_k = 1

Weights are fixed (config), per request, PackLLM's prompt-perplexity weights
``softmax(-CE_k(prompt) / tau)`` computed at prefill, or per step from each member's entropy,
``w_k ∝ exp(-H(p_k) / tau)`` (members with prior weight 0 stay out).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import kernels
from ..config import check_mixture_weights
from ..errors import ConfigError, InvalidRequestError
from .base import Fused, Method


class Mixture(Method):
    name = "mixture"
    serves_members_alone = True

    def __init__(self, member_names, weights, temperatures, dynamic: str = "fixed", tau: float = 1.0) -> None:
        self.member_names = list(member_names)
        self.weights = list(weights)
        self.dynamic = dynamic
        self.tau = tau
        self.uses_prompt_nll = dynamic == "prompt_perplexity"
        self.temperatures = torch.tensor(temperatures, dtype=torch.float32)
        self._plain_temperatures = bool((self.temperatures == 1.0).all())

    def default_weights(self) -> list[float]:
        return list(self.weights)

    def override_weights(self, weights) -> list[float]:
        values = super().override_weights(weights)
        try:
            check_mixture_weights(self.member_names, values, "composition.weights")
        except ConfigError as exc:
            raise InvalidRequestError(exc.message, param=exc.param) from None
        return values

    def raw_shift(self, member_logits: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """``sum_k w_k logsumexp(z_k / T_k)``: a member alone gets its own tempered logits back."""
        if self._plain_temperatures:
            return super().raw_shift(member_logits, weights)
        scaled = [z.float() / t for z, t in zip(member_logits, self.temperatures.tolist(), strict=True)]
        return super().raw_shift(scaled, weights)

    def _step_weights(self, member_logits, weights: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """This step's member temperatures (None: all 1) and weights (entropy weights when dynamic)."""
        temperatures = None if self._plain_temperatures else self.temperatures.to(weights.device)
        if self.dynamic == "entropy":
            weights = entropy_weights(member_logits, weights, self.temperatures.to(weights.device), self.tau)
        return temperatures, weights

    def fuse_sample(self, member_logits, weights, temperature, seeds):
        """``kernels.sample_mix_probs`` (entropy weights first, when dynamic)."""
        temperatures, weights = self._step_weights(member_logits, weights)
        tokens, logprobs = kernels.sample_mix_probs(member_logits, weights, temperatures, temperature, seeds)
        return tokens, logprobs, weights

    def fuse(self, member_logits: Sequence[torch.Tensor], weights: torch.Tensor) -> Fused:
        temperatures, weights = self._step_weights(member_logits, weights)
        one_hot = self.one_hot_rows(member_logits, weights, temperatures)
        if one_hot is not None:
            return Fused(one_hot, weights)
        return Fused(kernels.mix_probs(member_logits, weights, temperatures), weights)


def entropy_weights(member_logits, prior: torch.Tensor, temperatures: torch.Tensor, tau: float) -> torch.Tensor:
    """``w_bk ∝ exp(-H(softmax(z_k[b] / T_k)) / tau)`` over the members with ``prior[b, k] > 0``.

    ``member_logits`` K x ``[B, V]``, ``prior [B, K]`` -> ``[B, K]`` float32.
    """
    entropies = []
    for k, z in enumerate(member_logits):
        logprobs = torch.log_softmax(z.float() / temperatures[k], dim=-1)
        probs = logprobs.exp()
        entropies.append(-torch.where(probs > 0, probs * logprobs, torch.zeros_like(probs)).sum(-1))
    scores = -torch.stack(entropies, dim=1) / tau  # [B, K]
    scores = scores.masked_fill(prior <= 0, float("-inf"))
    return torch.softmax(scores, dim=-1)
