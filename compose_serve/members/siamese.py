"""A siamese member: the frozen base and its adapted twin, both streams in ONE forward.

It is a use of the shared-base machinery (``shared.py``), not a second copy of it: on a
``SharedBase`` every slot owns two cache rows, ``(name, slot, "base")`` running ``"__base__"`` and
``(name, slot, "adapted")`` running the adapter, side by side in the host's forward (which may
carry other members' rows too). The IMSM gate then interweaves the two final hidden states
``[B, 2, d]`` and the shared LM head runs once per slot: ``logits [B, V]``. At prefill the prompt
means ``hq [B, 2, d]`` of both streams are computed once and kept per slot.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..methods.interweave import ImsmGate, interweave, prompt_means
from .base import Scores
from .hf import Chunk
from .row_lora import BASE
from .shared import HostedMember, RowCall, SharedBase

STREAMS = ("base", "adapted")


class SiameseMember(HostedMember):
    """Base + adapter in one forward, fused by an IMSM gate (a module or a scalar g)."""

    def __init__(self, name: str, host: SharedBase, adapter: str, gate: ImsmGate | float) -> None:
        if adapter not in host.adapter_names:
            raise ConfigError(f"member {name!r}: a siamese member needs a LoRA adapter on its base "
                              f"(loaded: {host.adapter_names})", param="adapter")
        super().__init__(name, host)
        self.adapter = adapter
        self.gate = gate.to(host.device) if isinstance(gate, ImsmGate) else gate
        self.prompt_means: dict[int, torch.Tensor] = {}  # slot -> hq [2, d]
        self._prompt_sums: dict[int, tuple] = {}  # slot -> (sum [2, d], count [2, 1]) over the chunks so far
        self.last_streams: torch.Tensor | None = None  # [B, 2, d] of the latest call, for inspection

    @property
    def live_slots(self) -> list[int]:
        return [key[1] for key in self.host.kv.keys if key[0] == self.name and key[2] == STREAMS[0]]

    def checkpoint(self) -> tuple:
        return super().checkpoint(), dict(self.prompt_means), dict(self._prompt_sums)

    def rollback(self, saved: tuple) -> None:
        host, means, sums = saved
        super().rollback(host)
        self.prompt_means, self._prompt_sums = means, sums

    def _rows(self, slots) -> tuple[list, list[str]]:
        keys = [(self.name, slot, s) for slot in slots for s in STREAMS]
        return keys, [BASE, self.adapter] * len(slots)

    def prefill(self, slots, token_ids, want_prompt_nll: bool = False) -> RowCall:
        slots = list(slots)
        keys, adapters = self._rows(slots)

        def finish(chunk: Chunk) -> Scores:
            valid = chunk.valid.unsqueeze(-1).to(chunk.hidden.dtype)  # [2n, W, 1]
            sums = (chunk.hidden * valid).sum(1).view(len(slots), 2, -1)  # [n, 2, d], this chunk
            counts = valid.sum(1).view(len(slots), 2, 1)
            means = []
            for slot, s, c in zip(slots, sums, counts, strict=True):  # the prompt so far, over chunks
                total, count = self._prompt_sums.get(slot, (0, 0))
                self._prompt_sums[slot] = (total + s, count + c)
                self.prompt_means[slot] = (total + s) / (count + c)
                means.append(self.prompt_means[slot])
            scores = self._fuse(chunk.last, torch.stack(means))
            if want_prompt_nll:  # the fused model's NLL is not defined per stream: use the adapted one
                scores.prompt_nll = self.host.chunk_nll(keys[1::2], chunk.odd())
            return scores

        doubled = [tokens for tokens in token_ids for _ in STREAMS]
        return self.host.submit("prefill", keys, adapters, doubled, finish)

    def decode(self, slots, last_tokens: torch.Tensor) -> RowCall:
        slots = list(slots)

        def finish(hidden) -> Scores:
            means = torch.stack([self.prompt_means[slot] for slot in slots])  # [B, 2, d]
            return self._fuse(hidden, means)

        keys, adapters = self._rows(slots)
        return self.host.submit("decode", keys, adapters, last_tokens.reshape(-1).repeat_interleave(2), finish)

    def release(self, slots) -> None:
        self.host.release_rows(self._rows(slots)[0])
        for slot in slots:
            self.prompt_means.pop(slot, None)
            self._prompt_sums.pop(slot, None)

    @torch.inference_mode()
    def sequence_logits(self, ids, mask, prompt, select=None) -> torch.Tensor:
        """Teacher forcing of the interwoven model (see ``HFMember.sequence_logits``): both streams
        in one forward over ``2B`` rows, the prompt means taken over ``prompt [B, T]`` as at prefill,
        the gate applied at every position, one LM head."""
        self.host.flush()
        hidden = self.host.forward_sequences(ids.repeat_interleave(2, dim=0), mask.repeat_interleave(2, dim=0),
                                             [BASE, self.adapter] * ids.shape[0])
        means = prompt_means(hidden, prompt.to(self.device).repeat_interleave(2, dim=0))  # [2B, 1, d]
        streams, means = hidden.view(-1, 2, *hidden.shape[1:]), means.view(-1, 2, 1, hidden.shape[-1])
        fused, _ = interweave(self.gate, means[:, 0], streams[:, 0], streams[:, 1], means[:, 1])  # [B, T, d]
        return self.host.logits(fused if select is None else fused[select.to(self.device)])

    def _fuse(self, last_hidden: torch.Tensor, means: torch.Tensor) -> Scores:
        """``last_hidden [2B, d]`` (rows base, adapted, base, ...), ``means [B, 2, d]``."""
        streams = last_hidden.view(-1, 2, last_hidden.shape[-1])  # [B, 2, d]
        self.last_streams = streams
        fused, gate_mean = interweave(self.gate, means[:, 0], streams[:, 0], streams[:, 1], means[:, 1])
        return Scores(logits=None, hidden=fused, diagnostics={"gate_mean": gate_mean})  # the host applies the head

    def stream_logits(self) -> torch.Tensor:
        """Logits of both streams of the latest call ``[B, 2, V]`` (tests and diagnostics)."""
        return self.host.logits(self.last_streams)
