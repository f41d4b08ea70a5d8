"""The Method contract: fuse K members' scores into one normalised log-prob row per sequence.

``fuse(member_logits, weights) -> Fused``
- ``member_logits``: K tensors ``[B, V]`` (any float dtype; a row of a member that does not run
  for that sequence holds zeros and has weight 0 there);
- ``weights``: ``[B, K]`` float32, one row per sequence: the method's per-row parameters
  (mixture weights, logit coefficients), resolved at admission by ``row_weights``;
- returns ``Fused.logprobs [B, V]`` float32, normalised, and ``Fused.weights [B, K]``, the
  effective weight of each member in each row (the per-row diagnostics).

A member whose row weight is 0 contributes nothing, so the engine need not run it for that row.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InvalidRequestError


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

    @abstractmethod
    def fuse(self, member_logits: Sequence[torch.Tensor], weights: torch.Tensor) -> Fused: ...

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
            out.append(float(w))
        return out

    def weights_from_prompt_nll(self, prompt_nll: torch.Tensor, tau: float) -> torch.Tensor:
        """PackLLM: ``w = softmax(-nll / tau)`` over members; ``prompt_nll [B, K]`` -> ``[B, K]``."""
        return torch.softmax(-prompt_nll.float() / tau, dim=-1)
