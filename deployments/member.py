"""Distributed placement: one member per Ray Serve deployment, and its stand-in in the engine.

``MemberServer`` (a deployment) holds one member (a transformers model, or a siamese pair with its
gate) and its KV cache. ``RemoteMember`` implements the Member contract in the composition's
engine by calling it: ``prefill``/``decode`` return the handle's response, a future, so the engine
issues every member's call before waiting on any (the members run in parallel). What crosses the
wire per step: the last token ids in; the logits rows ``[B, V]`` out, in ``transfer_dtype``
(float32 by default, so results equal colocated serving exactly; bfloat16 halves the bytes).
A siamese member gates inside its own replica, so IMSM moves fused logits, not hidden states.
Releases ride along with the next call instead of costing a round trip of their own. Every call
has a timeout (``MEMBER_TIMEOUT_S``): a hung member fails the step, never wedges the engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from compose_serve.composition import eos_ids, load_member
from compose_serve.config import InterweaveParams, MemberSpec
from compose_serve.members.base import Member, Scores
from compose_serve.members.hf import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MEMBER_TIMEOUT_S = 60.0  # one prefill or decode call of a member replica; past it the step fails


class MemberServer:
    """A deployment holding one member; its methods mirror the Member contract."""

    def __init__(self, member: dict, interweave: dict | None = None, transfer_dtype: str = "float32") -> None:
        params = InterweaveParams.model_validate(interweave) if interweave else None
        self.member = load_member(MemberSpec.model_validate(member), params)
        self.dtype = DTYPES[transfer_dtype]

    def info(self) -> dict:
        return {"name": self.member.name, "vocab_size": self.member.vocab_size,
                "max_context": self.member.max_context, "eos_token_ids": sorted(eos_ids(self.member))}

    def _payload(self, scores: Scores) -> dict:
        return {"logits": scores.logits.to(self.dtype).cpu(),
                "prompt_nll": None if scores.prompt_nll is None else scores.prompt_nll.float().cpu(),
                "diagnostics": {k: v.float().cpu() for k, v in scores.diagnostics.items()}}

    def prefill(self, slots: list[int], token_ids: list[list[int]], want_prompt_nll: bool,
                release: list[int]) -> dict:
        self.member.release(release)
        return self._payload(_resolved(self.member.prefill(slots, token_ids, want_prompt_nll)))

    def decode(self, slots: list[int], last_tokens: list[int], release: list[int]) -> dict:
        self.member.release(release)
        return self._payload(_resolved(self.member.decode(slots, torch.tensor(last_tokens, device=self.member.device))))

    def release(self, slots: list[int]) -> None:
        self.member.release(slots)

    def check_health(self) -> None:
        """A member that failed to load never reaches here: its constructor raised."""


def _resolved(scores) -> Scores:
    """A member on a shared base answers with a future (its host batches the step): wait for it."""
    return scores.result() if hasattr(scores, "result") else scores


class _Pending:
    """A handle response that becomes Scores on ``result()``, or raises TimeoutError after
    ``timeout_s``: a hung member replica fails the step (the scheduler ends that batch and goes
    on) instead of wedging the composition forever."""

    def __init__(self, response, device: torch.device, member: str, timeout_s: float) -> None:
        self.response, self.device, self.member, self.timeout_s = response, device, member, timeout_s

    def result(self) -> Scores:
        try:
            payload = self.response.result(timeout_s=self.timeout_s)
        except TimeoutError:
            self.response.cancel()
            raise TimeoutError(f"member {self.member!r} did not answer within {self.timeout_s:g} s") from None
        return Scores(logits=payload["logits"].to(self.device, torch.float32),
                      prompt_nll=payload["prompt_nll"],
                      diagnostics=payload["diagnostics"])


class RemoteMember(Member):
    """A member that lives in a MemberServer replica, reached through a deployment handle."""

    def __init__(self, handle, model: str, info: dict, device: str = "cpu",
                 timeout_s: float = MEMBER_TIMEOUT_S) -> None:
        self.handle = handle
        self.timeout_s = timeout_s
        self.name = info["name"]
        self.tokenizer = load_tokenizer(model)
        self.vocab_size = info["vocab_size"]
        self.max_context = info["max_context"]
        self.eos_token_ids = frozenset(info["eos_token_ids"])
        self.device = torch.device(device)
        self._live: list[int] = []
        self._released: list[int] = []

    @property
    def live_slots(self) -> list[int]:
        return list(self._live)

    def _take_released(self) -> list[int]:
        released, self._released = self._released, []
        return released

    def prefill(self, slots: Sequence[int], token_ids: Sequence[Sequence[int]], want_prompt_nll: bool = False):
        self._live.extend(slots)
        response = self.handle.prefill.remote(list(slots), [list(t) for t in token_ids], want_prompt_nll,
                                              self._take_released())
        return _Pending(response, self.device, self.name, self.timeout_s)

    def decode(self, slots: Sequence[int], last_tokens: torch.Tensor):
        self._live = list(slots)
        response = self.handle.decode.remote(list(slots), last_tokens.tolist(), self._take_released())
        return _Pending(response, self.device, self.name, self.timeout_s)

    def release(self, slots: Sequence[int]) -> None:
        gone = set(slots)
        self._live = [s for s in self._live if s not in gone]
        self._released.extend(gone)
