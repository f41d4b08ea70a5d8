"""A composition, built: its members loaded, its method ready, its vocabulary checked.

``build_composition(spec)`` loads the members, refuses members whose tokenizers differ (naming
both), and cuts logits rows that differ only by padded tail entries to the shared width
``vocab_size``. Members whose ``model``, ``revision``, ``dtype`` and ``device`` are equal and that
differ only by their LoRA adapter (or have none) are ONE copy of the base in memory, every adapter
loaded on it (``SharedBase`` + ``SharedMember`` views; ``SiameseMember`` for ``interweave``), unless
the composition says ``share_base: false``; a member with ``merge_adapter: true`` stays its own
merged copy (``HFMember``), as does a lone member without an adapter.
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
from .members.shared import SharedBase, SharedMember
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

    def prompt_features(self, token_ids, layer: int, pooling: str):
        """The router's features ``[n, d]``: pooled hidden states of the members' bare base at
        block ``layer`` (from the first member, its adapter disabled)."""
        return self.members[0].prompt_features(token_ids, layer, pooling)

    def prompt_features_chunk(self, state, piece: list[int], layer: int, pooling: str) -> None:
        """``prompt_features`` for one prompt, a chunk at a time (``router.FeatureState``)."""
        self.members[0].prompt_features_chunk(state, piece, layer, pooling)


def load_member(spec: MemberSpec, interweave_params=None) -> Member:
    """Load one member on its own copy of its model (a siamese pair when ``interweave_params``)."""
    return load_members([spec], interweave_params, share_base=True)[0]


def load_members(specs: list[MemberSpec], interweave_params=None, share_base: bool = True) -> list[Member]:
    """Load ``specs`` in order; members on one base share one copy of it (module docstring)."""
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(specs):
        shareable = interweave_params is not None or (share_base and not m.merge_adapter)
        key = (m.model, m.revision, m.dtype, m.device) if shareable else ("own", i)
        groups.setdefault(key, []).append(i)
    members: list[Member | None] = [None] * len(specs)
    for indices in groups.values():
        started = time.perf_counter()
        group = [specs[i] for i in indices]
        for i, member in zip(indices, _load_group(group, interweave_params), strict=True):
            members[i] = member
        logger.info("members %s loaded (%s, one copy) in %.1f s", [m.name for m in group], group[0].model,
                    time.perf_counter() - started)
    return members


def _load_group(specs: list[MemberSpec], interweave_params) -> list[Member]:
    first = specs[0]
    device = resolve_device(first.device)
    lm = load_causal_lm(first.model, resolve_dtype(first.dtype, device), device, first.revision)
    tokenizer = load_tokenizer(first.model, first.revision)
    if interweave_params is None and len(specs) == 1 and (first.adapter is None or first.merge_adapter):
        if first.adapter is not None:
            lm = attach_adapter(lm, first.adapter, merge=True)
        return [HFMember(first.name, lm, tokenizer)]
    host = SharedBase(lm, tokenizer, {m.name: m.adapter for m in specs if m.adapter is not None})
    if interweave_params is not None:
        gate: ImsmGate | float
        if interweave_params.gate is not None:
            gate = ImsmGate.load(interweave_params.gate, lm.config.hidden_size)
        else:
            gate = interweave_params.scalar
        return [SiameseMember(m.name, host, m.name, gate) for m in specs]
    return [SharedMember(m.name, host, m.name if m.adapter is not None else None) for m in specs]


def build_composition(spec: CompositionSpec, members: list[Member] | None = None) -> Composition:
    """Load the members (unless given, e.g. prebuilt in tests) and assemble the composition."""
    check_composition(spec)
    if members is None:
        interweave = spec.parsed_params() if spec.method == "interweave" else None
        members = load_members(list(spec.members), interweave, spec.share_base)
    vocab_size = shared_vocab_size(members)
    tokenizer = members[0].tokenizer
    method = build_method(spec)
    if method.router is not None:
        check_router(method.router, members[0])
    return Composition(spec, members, method, tokenizer, vocab_size, eos_ids(members[0]))


def check_router(router, member: Member) -> None:
    """A router reads the members' base: it must fit its hidden size and layer count."""
    if not hasattr(member, "prompt_features"):
        raise ConfigError(f"member {member.name!r} cannot give the router its features (a remote member?)",
                          param="params.router")
    config = getattr(member, "config", None) or getattr(getattr(member, "host", None), "config", None)
    if config is None:
        return
    if router.hidden_size != config.hidden_size:
        raise ConfigError(f"the router reads hidden size {router.hidden_size}, the members' base has "
                          f"{config.hidden_size}", param="params.router")
    if not 1 <= router.layer <= config.num_hidden_layers:
        raise ConfigError(f"the router reads layer {router.layer}, the base has layers 1..{config.num_hidden_layers}",
                          param="params.router")


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
