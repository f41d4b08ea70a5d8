"""Logit arithmetic between a base, an expert and an anti-expert (one line, then softmax):

    proxy-tuning / DExperts:  z = z_base + alpha * (z_expert - z_antiexpert)      (space: logits)
    EFT:                      the same over log_softmax of each member            (space: logprobs)
    no base member:           z = (1 + alpha) z_expert - alpha z_antiexpert       (contrastive,
                              with ``plausibility``: tokens with p_expert < plausibility * max
                              p_expert are removed, as in contrastive decoding)

Per row this is ``log_softmax(sum_k c_k s_k)`` with coefficients ``c`` from the roles and alpha;
a request may set its own ``alpha`` through the ``composition`` extension.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import kernels
from ..errors import ConfigError, InvalidRequestError
from .base import MAX_COEFFICIENT, Fused, Method


def check_alpha(alpha: object, param: str) -> float:
    """A finite alpha within +-MAX_COEFFICIENT (inf or 1e999 would turn rows into NaN)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha != alpha:
        raise InvalidRequestError(f"{param} must be a number, got {alpha!r}", param=param)
    if not -MAX_COEFFICIENT <= alpha <= MAX_COEFFICIENT:
        raise InvalidRequestError(f"{param} must be in [-{MAX_COEFFICIENT:g}, {MAX_COEFFICIENT:g}], got {alpha!r}",
                                  param=param)
    return float(alpha)


class Delta(Method):
    name = "delta"

    def __init__(self, member_names, roles: dict[str, int], alpha: float = 1.0, space: str = "logits",
                 plausibility: float | None = None) -> None:
        self.member_names = list(member_names)
        self.roles = roles
        try:
            self.alpha = check_alpha(alpha, "params.alpha")
        except InvalidRequestError as exc:
            raise ConfigError(exc.message, param=exc.param) from None
        self.space = space
        self.plausibility = plausibility

    def coefficients(self, alpha: float) -> list[float]:
        c = [0.0] * len(self.member_names)
        has_base = "base" in self.roles
        if has_base:
            c[self.roles["base"]] = 1.0
        c[self.roles["expert"]] = alpha if has_base else 1.0 + alpha
        c[self.roles["antiexpert"]] = -alpha
        return c

    def default_weights(self) -> list[float]:
        return self.coefficients(self.alpha)

    def row_weights(self, override: dict | None) -> list[float]:
        if not override:
            return self.default_weights()
        unknown = set(override) - {"alpha"}
        if unknown:
            raise InvalidRequestError(f"method 'delta' accepts composition.alpha only, got {sorted(unknown)}",
                                      param=f"composition.{sorted(unknown)[0]}")
        return self.coefficients(check_alpha(override["alpha"], "composition.alpha"))

    def fuse(self, member_logits: Sequence[torch.Tensor], weights: torch.Tensor) -> Fused:
        scores = member_logits
        if self.space == "logprobs":
            scores = [torch.log_softmax(z.float(), dim=-1) for z in member_logits]
        logprobs = kernels.mix_logits(scores, weights)
        if self.plausibility is not None:
            logprobs = plausible_only(logprobs, member_logits[self.roles["expert"]], self.plausibility)
        return Fused(logprobs, weights)


def plausible_only(logprobs: torch.Tensor, expert_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """Keep ``{y : p_exp(y) >= alpha * max p_exp}`` and renormalise: ``[B, V] -> [B, V]``."""
    expert = torch.log_softmax(expert_logits.float(), dim=-1)
    keep = expert >= expert.max(dim=-1, keepdim=True).values + torch.log(torch.tensor(alpha))
    return torch.log_softmax(logprobs.masked_fill(~keep, float("-inf")), dim=-1)
