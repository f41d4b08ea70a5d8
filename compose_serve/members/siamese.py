"""A siamese member: one copy of the base, a PEFT adapter, both streams in ONE forward.

Every slot owns two cache rows, ``(slot, "base")`` and ``(slot, "adapted")``, kept side by side.
Each forward sends ``2B`` rows through the decoder with PEFT's per-row ``adapter_names``
(``"__base__"`` for the frozen base), then the IMSM gate interweaves the two final hidden states
``[B, 2, d]`` and the shared LM head runs once per slot: ``logits [B, V]``.
At prefill the prompt means ``hq [B, 2, d]`` of both streams are computed once and kept per slot.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..errors import ConfigError
from ..methods.interweave import ImsmGate, interweave, prompt_means
from .base import Scores
from .hf import HFMember

STREAMS = ("base", "adapted")


class SiameseMember(HFMember):
    """Base + adapter in one forward, fused by an IMSM gate (a module or a scalar g)."""

    def __init__(self, name: str, peft_model, tokenizer, gate: ImsmGate | float, adapter_name: str = "default") -> None:
        if not hasattr(peft_model, "peft_config"):
            raise ConfigError(f"member {name!r}: a siamese member needs a PEFT adapter", param="adapter")
        super().__init__(name, peft_model, tokenizer)
        if any(getattr(m, "merged", False) for m in peft_model.modules() if hasattr(m, "merged_adapters")):
            raise ConfigError(f"member {name!r}: the adapter must not be merged in a siamese pair", param="adapter")
        self.adapter_name = adapter_name
        self._row_adapters: list[str] = []
        self._install_row_adapter_hooks()
        self.gate = gate.to(self.device) if isinstance(gate, ImsmGate) else gate
        self.prompt_means: dict[int, torch.Tensor] = {}  # slot -> hq [2, d]
        self.last_streams: torch.Tensor | None = None  # [B, 2, d] of the latest call, for inspection

    @property
    def live_slots(self) -> list[int]:
        return [key[0] for key in self.kv.keys[::2]]

    def _install_row_adapter_hooks(self) -> None:
        """Give every LoRA layer PEFT's per-row ``adapter_names`` argument, once.

        PEFT's own ``adapter_names=`` path walks every module to attach and remove these hooks on
        each forward (tens of thousands of calls a step on a 30-layer model); a siamese member
        always runs mixed rows, so its hooks stay and read the row names of the current call.
        """
        from peft.tuners.lora import LoraLayer

        known = set()
        for module in self.lm.modules():
            if isinstance(module, LoraLayer):
                known |= set(module.lora_A.keys())
                module.register_forward_pre_hook(self._inject_row_adapters, with_kwargs=True)
        if self.adapter_name not in known:
            raise ConfigError(f"member {self.name!r}: adapter {self.adapter_name!r} has no LoRA layers "
                              f"(found {sorted(known)})", param="adapter")

    def _inject_row_adapters(self, module, args, kwargs):
        kwargs["adapter_names"] = self._row_adapters
        return args, kwargs

    def run_decoder(self, ids, mask, positions, cache):
        """The decoder over rows base, adapted, base, ...: one adapter name per row."""
        self._row_adapters = ["__base__", self.adapter_name] * (ids.shape[0] // 2)
        return super().run_decoder(ids, mask, positions, cache)

    @torch.inference_mode()
    def prefill(self, slots, token_ids, want_prompt_nll: bool = False) -> Scores:
        doubled = [tokens for tokens in token_ids for _ in STREAMS]
        ids, mask = self.pad_prompts(doubled)
        cache = DynamicCache(config=self.config)
        hidden = self.run_decoder(ids, mask, self.positions(mask), cache)
        self.kv.extend(cache, mask, [(slot, s) for slot in slots for s in STREAMS])
        means = prompt_means(hidden, mask.bool()).view(len(slots), 2, -1)  # [n, 2, d], real tokens only
        for slot, hq in zip(slots, means, strict=True):
            self.prompt_means[slot] = hq
        scores = self._fuse(hidden[:, -1], means)
        if want_prompt_nll:  # the fused model's NLL is not defined per stream: use the adapted one
            scores.prompt_nll = self.prompt_nll(hidden[1::2], ids[1::2], mask[1::2])
        return scores

    @torch.inference_mode()
    def decode(self, slots, last_tokens: torch.Tensor) -> Scores:
        self.kv.select([(slot, s) for slot in slots for s in STREAMS])
        mask, positions = self.kv.step_inputs()
        ids = last_tokens.view(-1, 1).to(self.device).repeat_interleave(2, dim=0)  # [2B, 1]
        hidden = self.run_decoder(ids, mask, positions, self.kv.cache)
        self.kv.advance(mask)
        means = torch.stack([self.prompt_means[slot] for slot in slots])  # [B, 2, d]
        return self._fuse(hidden[:, -1], means)

    def release(self, slots) -> None:
        self.kv.drop([(slot, s) for slot in slots for s in STREAMS])
        for slot in slots:
            self.prompt_means.pop(slot, None)

    @torch.inference_mode()
    def sequence_logits(self, ids, mask, prompt, select=None) -> torch.Tensor:
        """Teacher forcing of the interwoven model (see ``HFMember.sequence_logits``): both streams
        in one forward over ``2B`` rows, the prompt means taken over ``prompt [B, T]`` as at prefill,
        the gate applied at every position, one LM head."""
        self._row_adapters = ["__base__", self.adapter_name] * ids.shape[0]
        hidden = self.forward_sequences(ids.repeat_interleave(2, dim=0), mask.repeat_interleave(2, dim=0))
        means = prompt_means(hidden, prompt.to(self.device).repeat_interleave(2, dim=0))  # [2B, 1, d]
        streams, means = hidden.view(-1, 2, *hidden.shape[1:]), means.view(-1, 2, 1, hidden.shape[-1])
        fused, _ = interweave(self.gate, means[:, 0], streams[:, 0], streams[:, 1], means[:, 1])  # [B, T, d]
        return self.logits(fused if select is None else fused[select.to(self.device)])

    def _fuse(self, last_hidden: torch.Tensor, means: torch.Tensor) -> Scores:
        """``last_hidden [2B, d]`` (rows base, adapted, base, ...), ``means [B, 2, d]``."""
        streams = last_hidden.view(-1, 2, last_hidden.shape[-1])  # [B, 2, d]
        self.last_streams = streams
        fused, gate_mean = interweave(self.gate, means[:, 0], streams[:, 0], streams[:, 1], means[:, 1])
        return Scores(logits=self.logits(fused), hidden=fused, diagnostics={"gate_mean": gate_mean})

    def stream_logits(self) -> torch.Tensor:
        """Logits of both streams of the latest call ``[B, 2, V]`` (tests and diagnostics)."""
        return self.logits(self.last_streams)
