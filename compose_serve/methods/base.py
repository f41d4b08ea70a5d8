"""The Method contract: fuse K members' scores into one normalised log-prob row per sequence.

``fuse(member_logits, weights) -> Fused``
- ``member_logits``: K tensors ``[B, V]`` (any float dtype; a row of a member that does not run
  for that sequence holds zeros and has weight 0 there);
- ``weights``: ``[B, K]`` float32, one row per sequence: the method's per-row parameters
  (mixture weights, logit coefficients), resolved at admission by ``row_weights``;
- returns ``Fused.logprobs [B, V]`` float32, normalised, and ``Fused.weights [B, K]``, the
  effective weight of each member in each row (the per-row diagnostics).

A member whose row weight is 0 contributes nothing, so the engine need not run it for that row.

``fuse_sample(member_logits, weights, temperature [B], seeds [B]) -> (tokens [B], logprobs [B],
weights [B, K]) | None``: fuse and draw one token per row in one pass, without writing the
``[B, V]`` row (the fused Triton samplers of ``compose_serve.kernels``): ``tokens`` is an exact
draw from ``softmax(fused / temperature)`` (0 = greedy, argmax with ties to the lowest id),
``logprobs`` the chosen tokens' fused, untempered log-probs. None where the method has no fused
sampler; the engine then fuses and runs its ``Sampler``.

Routing (``mixture`` and ``logit_mix`` with ``weights: router``): before any member runs, the
router's probabilities ``[n, K]`` for the new requests become their weights through ``route``:
``top_k`` keeps the k most probable members per row, renormalised; a row whose top probability is
below ``min_confidence`` takes the composition's fixed weights instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InvalidRequestError

#: bound on a per-request coefficient (logit_mix weight, delta alpha): past it a float32 row of
#: scaled logits overflows into inf/NaN, and it only sharpens the distribution to its argmax anyway
MAX_COEFFICIENT = 1000.0


@dataclass
class Fused:
    """A fused batch: ``logprobs [B, V]`` float32 and effective ``weights [B, K]``."""

    logprobs: torch.Tensor
    weights: torch.Tensor


class Method(ABC):
    """A fusion rule over K members named ``member_names`` (in member order)."""

    name: str
    member_names: list[str]
    #: weights come from each member's prompt NLL at prefill (PackLLM)
    uses_prompt_nll: bool = False
    #: a one-hot row is one member's own distribution (mixture, logit_mix): ``solo_plan``
    serves_members_alone: bool = False
    #: weights come from a router over the prompt (``route``); None when the method has none
    router = None
    top_k: int | None = None
    min_confidence: float | None = None

    @abstractmethod
    def fuse(self, member_logits: Sequence[torch.Tensor], weights: torch.Tensor) -> Fused: ...

    def fuse_sample(self, member_logits: Sequence[torch.Tensor], weights: torch.Tensor, temperature: torch.Tensor,
                    seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Fused fusion + sampling (module docstring); None: this method has none."""
        return None

    def raw_shift(self, member_logits: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """``[B]`` float32 such that ``Fused.logprobs + raw_shift`` are the row's fused scores on
        the raw logit scale, which vLLM's repetition penalty acts on (its sign matters): here
        ``sum_k w_k logsumexp(z_k)``, which gives a member alone exactly its own logits back.
        Computed only for batches where some row has a repetition penalty."""
        shift = torch.zeros(weights.shape[0], dtype=torch.float32, device=weights.device)
        for k, z in enumerate(member_logits):
            w = weights[:, k].to(shift.device)
            if bool((w != 0).any()):
                shift += w * torch.logsumexp(z.float(), dim=-1).to(shift.device)
        return shift

    @abstractmethod
    def default_weights(self) -> list[float]:
        """The per-row weights of a request that overrides nothing."""

    def row_weights(self, override: dict | None) -> list[float]:
        """A request's per-row weights: its ``composition`` extension applied to the defaults."""
        if not override:
            return self.default_weights()
        unknown = set(override) - {"weights"}
        if unknown:
            raise InvalidRequestError(
                f"composition fields {sorted(unknown)} are not accepted by method {self.name!r}",
                param=f"composition.{sorted(unknown)[0]}",
            )
        return self.override_weights(override["weights"])

    def override_weights(self, weights: object) -> list[float]:
        """Per-request ``{"member": w}``; members left out get 0. Methods may check more."""
        if not isinstance(weights, dict) or not weights:
            raise InvalidRequestError("composition.weights must be a non-empty object {member: weight}",
                                      param="composition.weights")
        unknown = [k for k in weights if k not in self.member_names]
        if unknown:
            raise InvalidRequestError(
                f"composition.weights names unknown members {unknown}; members are {self.member_names}",
                param="composition.weights",
            )
        out = []
        for name in self.member_names:
            w = weights.get(name, 0.0)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w != w or abs(w) == float("inf"):
                raise InvalidRequestError(f"composition.weights.{name} must be a finite number, got {w!r}",
                                          param=f"composition.weights.{name}")
            if abs(w) > MAX_COEFFICIENT:
                raise InvalidRequestError(
                    f"composition.weights.{name} must be in [-{MAX_COEFFICIENT:g}, {MAX_COEFFICIENT:g}], got {w!r}",
                    param=f"composition.weights.{name}")
            out.append(float(w))
        if not any(out):
            raise InvalidRequestError("composition.weights gives every member weight 0: no member would run",
                                      param="composition.weights")
        return out

    def solo_plan(self, member: str) -> dict | None:
        """The ``composition`` override that serves ``member`` by itself (its own distribution),
        or None when this method gives a member alone no meaning (catalog and HTTP ask this)."""
        if self.serves_members_alone and len(self.member_names) > 1 and member in self.member_names:
            return {"weights": {member: 1.0}}
        return None

    def route(self, probs: torch.Tensor) -> torch.Tensor:
        """The router's probabilities ``[n, K]`` -> per-row weights ``[n, K]`` float32 (module docstring)."""
        probs = probs.float()
        weights = probs
        if self.top_k is not None and self.top_k < probs.shape[1]:
            keep = probs.topk(self.top_k, dim=1).indices
            weights = torch.zeros_like(probs).scatter(1, keep, probs.gather(1, keep))
            weights = weights / weights.sum(dim=1, keepdim=True)
        if self.min_confidence is not None:
            unsure = probs.max(dim=1).values < self.min_confidence
            fallback = torch.tensor(self.default_weights(), dtype=torch.float32)
            weights = torch.where(unsure.unsqueeze(1), fallback.expand_as(weights), weights)
        return weights

    @staticmethod
    def one_hot_rows(member_logits: Sequence[torch.Tensor], weights: torch.Tensor,
                     temperatures: torch.Tensor | None = None) -> torch.Tensor | None:
        """``log_softmax(z_k / T_k)`` per row when every row has one member at weight 1 (a top-1
        routed batch, a member served alone), which is what any mixture of them equals exactly;
        None otherwise. Saves the K-member fusion over the vocabulary on the hot path."""
        hot = weights == 1
        if not bool((hot.sum(dim=1) == 1).all()) or not bool(((weights == 0) | hot).all()):
            return None
        out = torch.empty((weights.shape[0], member_logits[0].shape[1]), dtype=torch.float32, device=weights.device)
        for k, z in enumerate(member_logits):
            rows = hot[:, k].nonzero().squeeze(1)
            if len(rows):
                scaled = z.index_select(0, rows.to(z.device)).float()
                if temperatures is not None:
                    scaled = scaled / temperatures[k]
                out[rows] = torch.log_softmax(scaled, dim=-1).to(out.device)
        return out

    def weights_from_prompt_nll(self, prompt_nll: torch.Tensor, tau: float) -> torch.Tensor:
        """PackLLM: ``w = softmax(-nll / tau)`` over members; ``prompt_nll [B, K]`` -> ``[B, K]``."""
        return torch.softmax(-prompt_nll.float() / tau, dim=-1)
