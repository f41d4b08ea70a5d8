"""Plain-torch specification of every fusion kernel.

This file is the contract: the CPU path, the test oracle and the benchmark baseline. Every
function takes the members' scores as a stacked tensor ``[K, B, V]`` or a list of K ``[B, V]``
tensors (any float dtype, any strides), computes in float32 and returns float32.

- ``mix_probs``: mixture of distributions,
  ``logprobs[b] = logsumexp_k(log w[b, k] + log_softmax(z_k[b] / T_k))``.
  A zero weight contributes nothing, whatever that member's scores are (even -inf or NaN: a
  member with weight 0 need not be run). A member's -inf logit removes only that member's share
  of the token; a member whose row is -inf everywhere has no distribution and contributes
  nothing (its share is lost, the rest is not renormalised). Weights must be >= 0 (rows summing
  to 1 give a normalised result) and temperatures > 0; values are not checked.
- ``mix_logits``: product of experts / logit arithmetic,
  ``logprobs[b] = log_softmax(sum_k c[b, k] * z_k[b])``. A zero coefficient contributes nothing,
  even where that member's logit is -inf.
- ``sample_*``: the same fusion followed by Gumbel-max sampling (temperature 0 = greedy), returning
  the token ids ``[B]`` and the chosen token's fused log-prob ``[B]``. ``generators_from_seeds``
  turns per-row seeds into the per-row generators these take, so a seed repeats its draw.
- ``naive_mix_probs``: the textbook form of ``mix_probs`` (K softmaxes, a weighted sum of
  probabilities, a log). Not the specification: it underflows to -inf where the log-space form
  stays finite. It exists as the benchmark's naive baseline.
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


def unstack_members(member_logits: Logits) -> list[torch.Tensor]:
    """The members' scores as K ``[B, V]`` tensors (views of a stacked input)."""
    if isinstance(member_logits, torch.Tensor):
        if member_logits.dim() != 3:
            raise ValueError(f"member_logits must be [K, B, V], got shape {tuple(member_logits.shape)}")
        return list(member_logits.unbind(0))
    if len(member_logits) == 0:
        raise ValueError("member_logits is empty: a fusion needs at least one member")
    return list(member_logits)


def mix_probs(
    member_logits: Logits,
    weights: torch.Tensor,
    temperatures: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mixture of distributions. weights ``[B, K]`` (>= 0, rows sum to 1), temperatures ``[K]``.

    Returns fused log-probs ``[B, V]`` float32.
    """
    members = unstack_members(member_logits)  # K x [B, V], no copy into one buffer
    w = weights.float()  # [B, K]
    mixed = None
    for k, z in enumerate(members):
        w_k = w[:, k : k + 1].to(z.device)  # [B, 1]
        z = z.float() if temperatures is None else z.float() / float(temperatures[k])
        # A member takes part where its weight is > 0 and its row is not -inf everywhere (a NaN
        # row of a live member stays visible). Selecting, not adding -inf, keeps a dropped
        # member's NaN or empty row out of the result.
        live = (w_k > 0) & ~torch.isneginf(z.amax(dim=-1, keepdim=True))  # [B, 1]
        term = torch.log_softmax(z, dim=-1).add_(torch.log(w_k)).masked_fill_(~live, float("-inf"))
        # Folding members pairwise with logaddexp is the same logsumexp over k, without a
        # [K, B, V] buffer or a strided reduction (2-5x faster on CPU than stack + logsumexp).
        mixed = term if mixed is None else torch.logaddexp(mixed, term)
    return mixed


def naive_mix_probs(
    member_logits: Logits,
    weights: torch.Tensor,
    temperatures: torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive ``mix_probs`` for benchmarks: ``log(sum_k w_k softmax(z_k / T_k))`` ``[B, V]`` float32.

    K separate softmaxes, a weighted sum of probabilities, then a log. Equal to ``mix_probs``
    where the mixture probability is above float32's underflow (about 1e-38); -inf below it.
    """
    z = stack_members(member_logits)  # [K, B, V]
    w = weights.float().to(z.device)  # [B, K]
    mixed = torch.zeros(z.shape[1:], dtype=torch.float32, device=z.device)  # [B, V]
    for k in range(z.shape[0]):
        zk = z[k] if temperatures is None else z[k] / float(temperatures[k])
        mixed += w[:, k : k + 1] * torch.softmax(zk, dim=-1)
    return torch.log(mixed)


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


def generators_from_seeds(seeds: torch.Tensor, device: torch.device) -> list[torch.Generator]:
    """One ``torch.Generator`` on ``device`` per row, seeded with ``seeds [B]`` (integers)."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds.tolist()]


def sample_mix_probs(
    member_logits: Logits,
    weights: torch.Tensor,
    temperatures: torch.Tensor | None,
    temperature: torch.Tensor,
    generators: Sequence[torch.Generator | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mix_probs`` followed by ``gumbel_argmax``: returns ``(tokens [B], logprobs [B])``."""
    return gumbel_argmax(mix_probs(member_logits, weights, temperatures), temperature, generators)


def sample_mix_logits(
    member_logits: Logits,
    coeffs: torch.Tensor,
    temperature: torch.Tensor,
    generators: Sequence[torch.Generator | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mix_logits`` followed by ``gumbel_argmax``: returns ``(tokens [B], logprobs [B])``."""
    return gumbel_argmax(mix_logits(member_logits, coeffs), temperature, generators)
