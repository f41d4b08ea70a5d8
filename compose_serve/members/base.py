"""The Member contract: anything that scores the next token for a batch of slots.

A member keeps its own KV cache, one row per slot; the engine (its scheduler) owns slot numbers.

- ``prefill(slots, token_ids, want_prompt_nll=False) -> Scores``: append the next chunk of each
  slot's prompt (``token_ids``, one list per slot; a slot seen for the first time is admitted) and
  score the token after it. A prompt may come in one chunk or several (chunked prefill); the
  scores of its last chunk are the prompt's. Scores rows follow ``slots``.
- ``decode(slots, last_tokens [B]) -> Scores``: advance every listed slot by one token. ``slots``
  must be exactly the member's slots whose prompt is complete; the rows returned follow their order.
- ``release(slots)``: forget those slots now (prefilling or decoding); their rows are free.
- ``packed(decode_slots, last_tokens, prefill_slots, token_ids, want_prompt_nll) -> (Scores,
  Scores)``, offered where ``packs_steps`` is True: ``decode`` and ``prefill`` of one step in ONE
  forward (the decode tokens and the chunks packed into one sequence), with the same results.
- ``checkpoint() -> saved`` and ``rollback(saved)``, offered where ``can_rollback`` is True: undo
  every call since the checkpoint, one that raised half-way included (slots admitted since are
  forgotten, the others are as they were). The engine then lets a new request's first chunk ride
  in the step's packed forward: if that forward fails, it rolls the step back and tries the new
  request alone, so the running requests lose nothing.

``prefill`` and ``decode`` may instead return a future whose ``result()`` is the Scores (a remote
member does; so do members on one shared base, whose host runs every pending call of a step in one
forward): the engine issues every member's call before it waits on any.

``Scores.logits`` is ``[B, V]`` in the member's dtype; ``hidden`` ``[B, d]`` (final hidden state,
after the last norm); ``prompt_nll`` ``[B]`` (mean next-token NLL over the prompt so far, for
PackLLM weights) when asked at prefill; ``diagnostics`` maps a name to a ``[B]`` tensor (e.g. an
IMSM member's mean gate). Members may also offer ``prompt_features(token_ids, layer, pooling)``
(the bare base's pooled hidden states, a router's input) and ``sequence_logits`` (teacher forcing).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Scores:
    """One member's scores for a batch of slots."""

    logits: torch.Tensor  # [B, V]
    hidden: torch.Tensor | None = None  # [B, d]
    prompt_nll: torch.Tensor | None = None  # [B]
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B]


class Member(ABC):
    """Scores the next token for a batch of slots; see the module docstring for the contract."""

    name: str
    tokenizer: object  # a transformers tokenizer
    vocab_size: int  # width of the logits rows
    max_context: int  # prompt + generated tokens a slot can hold
    device: torch.device
    #: offers ``packed`` (one forward for a step's decode and prefill chunk)
    packs_steps: bool = False
    #: offers ``checkpoint`` and ``rollback``
    can_rollback: bool = False

    def checkpoint(self) -> object:
        """What ``rollback`` needs to undo the calls made after this one."""
        raise NotImplementedError(f"{type(self).__name__} cannot roll back")

    def rollback(self, saved: object) -> None:
        """Undo every call since ``saved = checkpoint()``."""
        raise NotImplementedError(f"{type(self).__name__} cannot roll back")

    @abstractmethod
    def prefill(
        self, slots: Sequence[int], token_ids: Sequence[Sequence[int]], want_prompt_nll: bool = False
    ) -> Scores: ...

    @abstractmethod
    def decode(self, slots: Sequence[int], last_tokens: torch.Tensor) -> Scores: ...

    @abstractmethod
    def release(self, slots: Sequence[int]) -> None: ...

    @property
    @abstractmethod
    def live_slots(self) -> list[int]:
        """The slots this member holds, in its cache's row order."""
