"""Members that share one copy of a base model: one decoder forward per step carries every row.

``SharedBase`` holds the base model once, every adapter of its members loaded as per-row LoRA
(``row_lora.py``), and ONE slot cache whose rows are keyed ``(member, slot)`` (a siamese member
keys ``(member, slot, stream)``): each row runs its own adapter, the bare base as ``"__base__"``.

Members on it (``SharedMember``, and ``SiameseMember`` in ``siamese.py``) keep the Member contract,
but their ``prefill`` / ``decode`` return a ``RowCall`` future instead of Scores. The engine issues
every member's call before it waits on any (``engine.core.resolve``), so by the first
``result()`` every call of the step is pending, and the host runs them all in one forward:

    decode:   rows of every member, in call order     -> hidden [R, d]      -> each call's slice
    prefill:  prompts of every member, right-padded   -> hidden [R, L, d]   -> each call's slice
    both:     a step's decode calls, then its prefill calls: one packed forward (``packed_rows``)

and each member turns its slice into Scores (its own LM head, or the IMSM gate first). The row
order is stable between steps, so the cache is not reordered. Calls still pending when the host is
touched otherwise (``release``, another ``prefill``) are run first, so none is ever lost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import torch

from ..errors import ConfigError
from .base import Member, Scores
from .hf import Chunk, HFMember
from .row_lora import BASE, RowAdapters, install_row_lora


class RowCall:
    """A pending share of one forward: ``result()`` runs the host's pending calls if needed."""

    def __init__(self, host: SharedBase, kind: str, keys: list, adapters: list[str], inputs, finish: Callable) -> None:
        self.host, self.kind, self.keys, self.adapters, self.inputs, self.finish = (
            host, kind, keys, adapters, inputs, finish)
        self.scores: Scores | None = None

    def result(self) -> Scores:
        if self.scores is None:
            self.host.flush()
        assert self.scores is not None
        return self.scores


class SharedBase(HFMember):
    """One base model, every member's adapter, one keyed slot cache (module docstring).

    It is an ``HFMember`` whose rows are keyed by ``(member, slot[, stream])`` and carry an adapter
    name each; it is not itself a member of a composition: ``SharedMember`` views are.
    """

    packs_steps = False  # not a member; its members' pending decode + prefill calls pack in ``flush``

    def __init__(self, lm: torch.nn.Module, tokenizer, adapters: dict[str, str] | None = None) -> None:
        """``lm``: a transformers causal LM, and ``adapters`` {name: PEFT folder} to load on it; or a
        ``PeftModel`` whose loaded adapters are taken as they are (its LoRA layers are replaced)."""
        if adapters:
            lm = load_adapters(lm, adapters)
        if hasattr(lm, "peft_config"):
            lm, self.plan = install_row_lora(lm)
        else:
            self.plan = RowAdapters([], [])
        super().__init__("shared-base", lm, tokenizer)
        self._row_adapters: list[str] = []
        self._pending: list[RowCall] = []

    @property
    def adapter_names(self) -> list[str]:
        return list(self.plan.names)

    # -- calls from members ---------------------------------------------------------------
    def submit(self, kind: str, keys: list[Hashable], adapters: list[str], inputs, finish: Callable) -> RowCall:
        """Queue ``keys`` (rows with ``adapters``) for the next forward; ``inputs`` are token lists
        (prefill: each key's next chunk of prompt) or ``last_tokens [n]`` (decode);
        ``finish(Chunk | hidden [n, d]) -> Scores`` shapes the result; Scores whose ``logits`` are
        None get the LM head of their ``hidden`` in one product with the other calls'."""
        if self._pending and (self._pending[-1].kind, kind) == ("prefill", "decode"):
            self.flush()  # decode calls then prefill calls go in one packed forward; not the reverse
        call = RowCall(self, kind, keys, adapters, inputs, finish)
        self._pending.append(call)
        return call

    @torch.inference_mode()
    def flush(self) -> None:
        """Run every pending call in one forward and hand each its slice."""
        calls, self._pending = self._pending, []
        if not calls:
            return
        keys = [k for c in calls for k in c.keys]
        self._row_adapters = [a for c in calls for a in c.adapters]
        decoding = [c for c in calls if c.kind == "decode"]  # submit() keeps them before prefill calls
        prefilling = calls[len(decoding) :]
        split = sum(len(c.keys) for c in decoding)
        d_keys, p_keys = keys[:split], keys[split:]
        last = torch.cat([c.inputs.reshape(-1) for c in decoding]) if decoding else None
        pieces = [p for c in prefilling for p in c.inputs]
        if decoding and prefilling:  # a step's decode and prefill chunk: one packed forward
            hidden, chunk = self.packed_rows(d_keys, last, p_keys, pieces)
        else:
            hidden = self.decode_rows(d_keys, last) if decoding else None  # [R, d], in the order of keys
            chunk = self.prefill_rows(p_keys, pieces) if prefilling else None
        scores = []
        for group, out in ((decoding, hidden), (prefilling, chunk)):
            start = 0
            for call in group:
                end = start + len(call.keys)
                scores.append(call.finish(out[start:end] if isinstance(out, torch.Tensor) else out.rows(start, end)))
                start = end
        heads = [sc for sc in scores if sc.logits is None]  # the LM head once for every call (it reads
        if heads:  # the whole [V, d] matrix: one product, not one per member)
            logits = self.logits(torch.cat([sc.hidden for sc in heads])).split([len(sc.hidden) for sc in heads])
            for sc, rows in zip(heads, logits, strict=True):
                sc.logits = rows
        for call, sc in zip(calls, scores, strict=True):
            call.scores = sc

    def release_rows(self, keys: Sequence[Hashable]) -> None:
        self.flush()
        super().release(list(keys))

    def rollback(self, saved: tuple) -> None:
        """``HFMember.rollback``; calls still pending (their forward failed) are dropped."""
        self._pending = []
        super().rollback(saved)

    # -- the forwards: HFMember's, with one adapter name per row ---------------------------
    def before_decode(self, perm: torch.Tensor) -> None:
        """The decode forward runs rows in the cache's order: put the adapter names in it too."""
        physical = [""] * len(self._row_adapters)
        for name, row in zip(self._row_adapters, perm.tolist(), strict=True):
            physical[row] = name
        self._row_adapters = physical

    def run_decoder(self, ids, mask, positions, cache):
        self.plan.rows(self._row_adapters, self.device, self.dtype)
        return super().run_decoder(ids, mask, positions, cache)

    def before_packed(self, perm: torch.Tensor, chunk_lens: list[int]) -> None:
        """A packed forward runs the decode rows in the cache's order, then each chunk's tokens:
        one adapter name per token, in that order."""
        b = len(perm)
        physical = [""] * b
        for name, row in zip(self._row_adapters[:b], perm.tolist(), strict=True):
            physical[row] = name
        self._token_adapters = physical + [a for a, n in zip(self._row_adapters[b:], chunk_lens, strict=True)
                                           for _ in range(n)]

    def run_packed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.plan.tokens(self._token_adapters, self.device, self.dtype)
        return super().run_packed(ids, positions)

    def forward_sequences(self, ids: torch.Tensor, mask: torch.Tensor, adapters: Sequence[str] = ()) -> torch.Tensor:
        """Teacher forcing (``HFMember.forward_sequences``) with one adapter name per row."""
        self.plan.rows(list(adapters) or [BASE] * ids.shape[0], self.device, self.dtype)
        return super().forward_sequences(ids, mask)

    def bare_base(self, rows: int):
        """Every row runs ``"__base__"`` (the router's features come from the bare base)."""
        self.plan.rows([BASE] * rows, self.device, self.dtype)
        return contextlib.nullcontext()

    # HFMember's own slot API is not used on a host: members go through submit()
    def prefill(self, slots, token_ids, want_prompt_nll: bool = False) -> Scores:
        raise TypeError("a SharedBase serves members; call a SharedMember")

    def decode(self, slots, last_tokens: torch.Tensor) -> Scores:
        raise TypeError("a SharedBase serves members; call a SharedMember")


class HostedMember(Member):
    """What every member on a ``SharedBase`` shares: the host's model facts, its router features,
    and its checkpoint (every member on a host shares its cache; rolling back twice is harmless)."""

    can_rollback = True

    def __init__(self, name: str, host: SharedBase) -> None:
        self.name, self.host = name, host
        self.tokenizer, self.vocab_size, self.max_context = host.tokenizer, host.vocab_size, host.max_context
        self.device, self.config = host.device, host.config
        self.lm = host.lm  # the one model object (eos ids, tests of storage)

    def checkpoint(self) -> object:
        return self.host.checkpoint()

    def rollback(self, saved) -> None:
        self.host.rollback(saved)

    def prompt_features(self, token_ids, layer: int, pooling: str) -> torch.Tensor:
        return self.host.prompt_features(token_ids, layer, pooling)

    def prompt_features_chunk(self, state, piece: list[int], layer: int, pooling: str) -> None:
        self.host.flush()  # the bare-base plan must not leak into a pending call's forward
        self.host.prompt_features_chunk(state, piece, layer, pooling)


class SharedMember(HostedMember):
    """A member on a ``SharedBase``: its adapter (or the bare base) on its own cache rows."""

    def __init__(self, name: str, host: SharedBase, adapter: str | None) -> None:
        if adapter is not None and adapter not in host.adapter_names:
            raise ConfigError(f"member {name!r}: adapter {adapter!r} is not loaded on its base", param="adapter")
        super().__init__(name, host)
        self.adapter = adapter or BASE

    @property
    def live_slots(self) -> list[int]:
        return [key[1] for key in self.host.kv.keys if key[0] == self.name]

    def prefill(self, slots, token_ids, want_prompt_nll: bool = False) -> RowCall:
        keys = [(self.name, s) for s in slots]

        def finish(chunk: Chunk) -> Scores:
            nll = self.host.chunk_nll(keys, chunk) if want_prompt_nll else None
            return Scores(logits=None, hidden=chunk.last, prompt_nll=nll)  # the host applies the head

        return self.host.submit("prefill", keys, [self.adapter] * len(keys), list(token_ids), finish)

    def decode(self, slots, last_tokens: torch.Tensor) -> RowCall:
        def finish(hidden) -> Scores:
            return Scores(logits=None, hidden=hidden)  # the host applies the head

        keys = [(self.name, s) for s in slots]
        return self.host.submit("decode", keys, [self.adapter] * len(keys), last_tokens, finish)

    def release(self, slots) -> None:
        self.host.release_rows([(self.name, s) for s in slots])

    @torch.inference_mode()
    def sequence_logits(self, ids, mask, prompt, select=None) -> torch.Tensor:
        """Teacher forcing, as ``HFMember.sequence_logits``, through this member's adapter."""
        self.host.flush()
        hidden = self.host.forward_sequences(ids, mask, [self.adapter] * ids.shape[0])
        return self.host.logits(hidden if select is None else hidden[select.to(self.device)])


def load_adapters(lm: torch.nn.Module, adapters: dict[str, str]):
    """``lm`` wrapped by PEFT with every adapter loaded under its member's name."""
    from peft import PeftModel

    items = list(adapters.items())
    for name, path in items:
        if not Path(path).is_dir():
            raise ConfigError(f"adapter directory {path!r} of member {name!r} does not exist", param="adapter")
    first, path = items[0]
    peft_model = PeftModel.from_pretrained(lm, path, adapter_name=first)
    for name, path in items[1:]:
        peft_model.load_adapter(path, adapter_name=name)
    return peft_model.eval().requires_grad_(False)
