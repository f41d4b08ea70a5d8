"""Requests in, token events out, and the state of one running sequence.

- ``Request``: prompt token ids, sampling settings, and the optional ``composition`` extension
  (per-request weights ``{"weights": {member: w}}``, or ``{"alpha": a}`` for delta).
- ``TokenEvent``: one per sequence per step: the token, the text it adds (possibly "" while a
  stop string or an incomplete character is held back), its fused log-prob (and the top-n), the
  per-member diagnostics, and ``finish_reason`` on the last one (``stop``, ``length``, ``abort``).
- ``Completion``: the events of one request gathered (what the library's ``generate`` returns).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import torch

from ..sampling import SamplingParams
from .detokenizer import Detokenizer


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    composition: dict | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class TokenEvent:
    request_id: str
    token_id: int
    text: str
    logprob: float
    top_logprobs: list[tuple[int, float]] | None
    diagnostics: dict[str, dict[str, float]]  # {"weights": {member: w}, "router": {member: p}, "gate_mean": ...}
    finish_reason: str | None = None


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    diagnostics: list[dict[str, dict[str, float]]] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, event: TokenEvent) -> None:
        self.token_ids.append(event.token_id)
        self.text += event.text
        self.logprobs.append(event.logprob)
        if event.top_logprobs is not None:
            self.top_logprobs.append(event.top_logprobs)
        self.diagnostics.append(event.diagnostics)
        self.finish_reason = event.finish_reason or self.finish_reason


@dataclass
class Sequence:
    """A running request: its slot, its per-member weights, its generator, what it produced."""

    request: Request
    slot: int
    weights: torch.Tensor  # [K] float32, this row of the method's weights
    generator: torch.Generator
    detokenizer: Detokenizer
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prefilled: int = 0  # prompt tokens the members have taken so far (chunked prefill)
    router_probs: torch.Tensor | None = None  # [K], when a router chose the weights

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def uses(self) -> list[bool]:
        """Which members run for this sequence (a zero weight contributes nothing)."""
        return [bool(w != 0) for w in self.weights]
