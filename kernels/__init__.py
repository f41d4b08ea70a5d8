"""Fusion kernels: Triton on CUDA tensors, the plain-torch reference elsewhere.

Public API (all return float32):
- ``mix_probs(member_logits [K, B, V] | list[K x [B, V]], weights [B, K], temperatures [K] | None) -> [B, V]``
- ``mix_logits(member_logits, coeffs [B, K]) -> [B, V]``

The choice between Triton and torch is made in ``backend_for`` alone, logged once, and can be
forced with ``COMPOSE_SERVE_KERNELS=triton|torch`` (triton on CPU tensors needs
``TRITON_INTERPRET=1`` set before this package is imported).
"""

from __future__ import annotations

import logging
import os

import torch

from . import reference
from .reference import Logits

logger = logging.getLogger(__name__)
_logged: set[str] = set()


def backend_for(device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for tensors on ``device``, logging the choice once."""
    forced = os.environ.get("COMPOSE_SERVE_KERNELS", "").strip().lower()
    if forced not in ("", "triton", "torch"):
        raise ValueError(f"COMPOSE_SERVE_KERNELS must be 'triton' or 'torch', got {forced!r}")
    backend = forced or ("triton" if device.type == "cuda" else "torch")
    if backend not in _logged:
        _logged.add(backend)
        how = "forced by COMPOSE_SERVE_KERNELS" if forced else f"for {device.type} tensors"
        logger.info("fusion kernels: %s (%s)", backend, how)
    return backend


def _device_of(member_logits: Logits) -> torch.device:
    return member_logits.device if isinstance(member_logits, torch.Tensor) else member_logits[0].device


def mix_probs(member_logits: Logits, weights: torch.Tensor, temperatures: torch.Tensor | None = None) -> torch.Tensor:
    """Mixture of distributions; see ``reference.mix_probs`` for the exact contract."""
    return reference.mix_probs(member_logits, weights, temperatures)


def mix_logits(member_logits: Logits, coeffs: torch.Tensor) -> torch.Tensor:
    """Logit arithmetic; see ``reference.mix_logits`` for the exact contract."""
    return reference.mix_logits(member_logits, coeffs)


__all__ = ["backend_for", "mix_logits", "mix_probs", "reference"]
