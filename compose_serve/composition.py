"""A composition, built: its members loaded, its method ready, its vocabulary checked.

``build_composition(spec)`` loads every member (``HFMember``, or ``SiameseMember`` for
``interweave``), refuses members whose tokenizers differ (naming both), and cuts logits rows that
differ only by padded tail entries to the shared width ``vocab_size``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .config import CompositionSpec, MemberSpec, check_composition
from .errors import ConfigError
from .members.base import Member
from .members.hf import (
    HFMember,
    attach_adapter,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from .members.siamese import SiameseMember
from .methods import Method, build_method
from .methods.interweave import ImsmGate

logger = logging.getLogger(__name__)


@dataclass
class Composition:
    """Members + method under one served name; ``vocab_size`` is the shared logits width."""

    spec: CompositionSpec
    members: list[Member]
    method: Method
    tokenizer: object
    vocab_size: int
    eos_token_ids: frozenset[int]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def max_context(self) -> int:
        return min(m.max_context for m in self.members)


def load_member(spec: MemberSpec, interweave_params=None) -> Member:
    """Load one member as its spec says (a siamese pair when ``interweave_params`` is given)."""
    device = resolve_device(spec.device)
    lm = load_causal_lm(spec.model, resolve_dtype(spec.dtype, device), device, spec.revision)
    tokenizer = load_tokenizer(spec.model, spec.revision)
    if interweave_params is not None:
        peft_model = attach_adapter(lm, spec.adapter, merge=False)
        gate: ImsmGate | float
        if interweave_params.gate is not None:
            gate = ImsmGate.load(interweave_params.gate, lm.config.hidden_size)
        else:
            gate = interweave_params.scalar
        return SiameseMember(spec.name, peft_model, tokenizer, gate)
    if spec.adapter is not None:
        lm = attach_adapter(lm, spec.adapter, merge=spec.merge_adapter)
    return HFMember(spec.name, lm, tokenizer)


def build_composition(spec: CompositionSpec, members: list[Member] | None = None) -> Composition:
    """Load the members (unless given, e.g. prebuilt in tests) and assemble the composition."""
    check_composition(spec)
    if members is None:
        interweave = spec.parsed_params() if spec.method == "interweave" else None
        members = []
        for m in spec.members:
            started = time.perf_counter()
            members.append(load_member(m, interweave))
            logger.info("member %s loaded (%s) in %.1f s", m.name, m.model, time.perf_counter() - started)
    vocab_size = shared_vocab_size(members)
    tokenizer = members[0].tokenizer
    return Composition(spec, members, build_method(spec), tokenizer, vocab_size, eos_ids(members[0]))


def shared_vocab_size(members: list[Member]) -> int:
    """The width every member's logits are cut to; raises if two tokenizers differ."""
    first = members[0]
    vocab = first.tokenizer.get_vocab()
    for other in members[1:]:
        if other.tokenizer.get_vocab() != vocab:
            raise ConfigError(
                f"members {first.name!r} and {other.name!r} do not share one vocabulary; "
                "compositions need the same tokenizer for every member",
                param="members",
            )
    width = min(m.vocab_size for m in members)
    if width < len(vocab):
        raise ConfigError(f"a member's logits ({width}) are narrower than its tokenizer ({len(vocab)})",
                          param="members")
    return width


def eos_ids(member: Member) -> frozenset[int]:
    """End-of-sequence ids from the tokenizer and the generation config (which may list several);
    a remote member brings its own."""
    if getattr(member, "eos_token_ids", None):
        return frozenset(member.eos_token_ids)
    ids = set()
    if member.tokenizer.eos_token_id is not None:
        ids.add(member.tokenizer.eos_token_id)
    gen = getattr(getattr(member, "lm", None), "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return frozenset(ids)
