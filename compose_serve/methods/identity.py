"""The ``interweave`` method: its one member (a siamese pair with an IMSM gate) already returns
the interwoven logits, so the method only normalises them: ``log_softmax(z) [B, V]`` float32.
The gate itself lives in ``methods/interweave.py`` and runs inside the siamese member.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Fused, Method


class Interweave(Method):
    name = "interweave"

    def __init__(self, member_names) -> None:
        self.member_names = list(member_names)

    def default_weights(self) -> list[float]:
        return [1.0]

    def fuse(self, member_logits: Sequence[torch.Tensor], weights: torch.Tensor) -> Fused:
        return Fused(torch.log_softmax(member_logits[0].float(), dim=-1), weights)
