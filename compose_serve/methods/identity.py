"""The ``interweave`` method: its one member (a siamese pair with an IMSM gate) already returns
the interwoven logits, so the method only normalises them: ``log_softmax(z) [B, V]`` float32.
The gate itself lives in ``methods/interweave.py`` and runs inside the siamese member.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import kernels
from .base import Fused, Method


class Interweave(Method):
    name = "interweave"

    def __init__(self, member_names) -> None:
        self.member_names = list(member_names)

    def default_weights(self) -> list[float]:
        return [1.0]

    def fuse_sample(self, member_logits, weights, temperature, seeds):
        """``kernels.sample_mix_probs`` over the one member at weight 1: ``log_softmax(z)``."""
        ones = torch.ones((weights.shape[0], 1), dtype=torch.float32, device=weights.device)
        tokens, logprobs = kernels.sample_mix_probs(member_logits[:1], ones, None, temperature, seeds)
        return tokens, logprobs, weights

    def fuse(self, member_logits: Sequence[torch.Tensor], weights: torch.Tensor) -> Fused:
        return Fused(torch.log_softmax(member_logits[0].float(), dim=-1), weights)
