"""Plain-torch specification of every fusion kernel.

This file is the contract: the CPU path, the test oracle and the benchmark baseline. Every
function takes the members' scores as a stacked tensor ``[K, B, V]`` or a list of K ``[B, V]``
tensors (any float dtype, any strides), computes in float32 and returns float32.

- ``mix_probs``: mixture of distributions,
  ``logprobs[b] = logsumexp_k(log w[b, k] + log_softmax(z_k[b] / T_k))``.
  A zero weight contributes nothing (its log-weight is -inf, and the -inf is never multiplied).
  A member's -inf logit removes only that member's share of the token.
- ``mix_logits``: product of experts / logit arithmetic,
  ``logprobs[b] = log_softmax(sum_k c[b, k] * z_k[b])``. A zero coefficient contributes nothing,
  even where that member's logit is -inf.
- ``sample_*``: the same fusion followed by Gumbel-max sampling (temperature 0 = greedy), returning
  the token ids ``[B]`` and the chosen token's fused log-prob ``[B]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Logits = torch.Tensor | Sequence[torch.Tensor]


def stack_members(member_logits: Logits) -> torch.Tensor:
    """Return the members' scores as one float32 tensor ``[K, B, V]``."""
    if isinstance(member_logits, torch.Tensor):
        if member_logits.dim() != 3:
            raise ValueError(f"member_logits must be [K, B, V], got shape {tuple(member_logits.shape)}")
        return member_logits.float()
    if len(member_logits) == 0:
        raise ValueError("member_logits is empty: a fusion needs at least one member")
    return torch.stack([z.float() for z in member_logits])


def mix_probs(
    member_logits: Logits,
    weights: torch.Tensor,
    temperatures: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mixture of distributions. weights ``[B, K]`` (>= 0, rows sum to 1), temperatures ``[K]``.

    Returns fused log-probs ``[B, V]`` float32.
    """
    z = stack_members(member_logits)  # [K, B, V]
    if temperatures is not None:
        z = z / temperatures.float().view(-1, 1, 1).to(z.device)
    member_logprobs = torch.log_softmax(z, dim=-1)  # [K, B, V]
    log_w = torch.log(weights.float().t().to(z.device)).unsqueeze(-1)  # [K, B, 1], log 0 = -inf
    terms = log_w + member_logprobs
    # A zero weight times a -inf logit must give "no contribution", not NaN: -inf + -inf = -inf. OK.
    return torch.logsumexp(terms, dim=0)


def mix_logits(member_logits: Logits, coeffs: torch.Tensor) -> torch.Tensor:
    """Logit arithmetic. coeffs ``[B, K]`` (any sign). Returns ``log_softmax(sum_k c_k z_k)`` ``[B, V]``."""
    z = stack_members(member_logits)  # [K, B, V]
    c = coeffs.float().t().to(z.device).unsqueeze(-1)  # [K, B, 1]
    # 0 * -inf is NaN in IEEE arithmetic; a member with coefficient 0 must not contribute at all.
    weighted = torch.where(c == 0, torch.zeros((), device=z.device), c * z)
    return torch.log_softmax(weighted.sum(dim=0), dim=-1)


def gumbel_argmax(
    logprobs: torch.Tensor,
    temperature: torch.Tensor,
    generators: Sequence[torch.Generator | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logprobs [B, V]`` at ``temperature [B]`` (0 = greedy).

    Gumbel-max: ``argmax(logprobs / T + G)`` with ``G = -log(Exp(1))`` noise from each row's own
    generator, which is exactly a draw from ``softmax(logprobs / T)``.
    Returns ``(tokens [B] int64, chosen_logprobs [B] float32)`` where the log-prob is the fused
    (untempered) one.
    """
    rows = []
    for b in range(logprobs.shape[0]):
        t = float(temperature[b])
        if t == 0.0:
            rows.append(torch.argmax(logprobs[b]))
            continue
        gen = generators[b] if generators is not None else None
        noise = torch.empty_like(logprobs[b]).exponential_(generator=gen)
        rows.append(torch.argmax(logprobs[b] / t - torch.log(noise)))
    tokens = torch.stack(rows)
    return tokens, logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)


def sample_mix_probs(member_logits, weights, temperatures, temperature, generators=None):
    """``mix_probs`` followed by ``gumbel_argmax``: returns ``(tokens [B], logprobs [B])``."""
    return gumbel_argmax(mix_probs(member_logits, weights, temperatures), temperature, generators)


def sample_mix_logits(member_logits, coeffs, temperature, generators=None):
    """``mix_logits`` followed by ``gumbel_argmax``: returns ``(tokens [B], logprobs [B])``."""
    return gumbel_argmax(mix_logits(member_logits, coeffs), temperature, generators)
