"""Requests in, token events out, and the state of one running sequence.

- ``Request``: prompt token ids, sampling settings, and the optional ``composition`` extension
  (per-request weights ``{"weights": {member: w}}``, or ``{"alpha": a}`` for delta).
- ``TokenEvent``: one per sequence per step: the token, the text it adds (possibly "" while a
  stop string or an incomplete character is held back), its fused log-prob (and the top-n), the
  per-member diagnostics, and ``finish_reason`` on the last one (``stop``, ``length``, ``abort``).
  A request with ``prompt_logprobs`` gets them on its first event (``PromptLogprobs``: one entry
  per prompt token, the first None). With ``max_tokens`` 0 its only event carries no token:
  ``token_id`` and ``logprob`` None, text "", ``finish_reason`` "length" (``generated`` False).
- ``Completion``: the events of one request gathered (what the library's ``generate`` returns).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import torch

from ..sampling import SamplingParams
from .detokenizer import Detokenizer
from .scoring import PromptLogprob

#: per prompt token: None for the first, then its fused log-prob, rank and the top n
PromptLogprobs = list[PromptLogprob | None]


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    composition: dict | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class TokenEvent:
    request_id: str
    token_id: int | None  # None: no token (a prompt scored with max_tokens 0)
    text: str
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    diagnostics: dict[str, dict[str, float]]  # {"weights": {member: w}, "router": {member: p}, "gate_mean": ...}
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    prompt_logprobs: PromptLogprobs | None = None  # on the first event, when the request asked

    @property
    def generated(self) -> bool:
        """Whether this event is a generated token (False: a prompt scored, nothing generated)."""
        return self.token_id is not None


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
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # when the request asked for them

    def add(self, event: TokenEvent) -> None:
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        if event.generated:  # a prompt scored with max_tokens 0 adds no token
            self.token_ids.append(event.token_id)
            self.text += event.text
            self.logprobs.append(event.logprob)
            if event.top_logprobs is not None:
                self.top_logprobs.append(event.top_logprobs)
            self.diagnostics.append(event.diagnostics)
        self.finish_reason = event.finish_reason or self.finish_reason
        self.stop_reason = event.stop_reason if event.stop_reason is not None else self.stop_reason


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
    #: structured outputs: this sequence's grammar matcher (``compose_serve.structured.Matcher``)
    grammar: object | None = None
    #: a routed request whose router features are still being computed, chunk by chunk
    #: (``router.FeatureState``); None once routed (its weights are then the router's)
    routing: object | None = None
    #: the fused samplers' Philox seed base (the request's seed, else random); a step's seed mixes
    #: it with the number of tokens drawn so far (``step_seed``)
    noise_seed: int = 0

    def step_seed(self) -> int:
        """A fresh 62-bit seed for this sequence's next draw (splitmix64 of base and position):
        the same request seed gives the same draws; other rows never change it."""
        x = (self.noise_seed + 0x9E3779B97F4A7C15 * (len(self.output_ids) + 1)) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return (x ^ (x >> 31)) >> 2

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def uses(self) -> list[bool]:
        """Which members run for this sequence (a zero weight contributes nothing)."""
        return [bool(w != 0) for w in self.weights]
