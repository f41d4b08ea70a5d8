"""The fusion API and the one place that chooses its backend (``backend_for``); re-exported by
``compose_serve.kernels``, see its docstring for the contracts."""

from __future__ import annotations

import logging
import os

import torch

from . import reference
from .launch import MAX_MEMBERS
from .reference import Logits

logger = logging.getLogger(__name__)
_logged: set[str] = set()


def backend_for(device: torch.device, members: int = 1) -> str:
    """Return ``"triton"`` or ``"torch"`` for ``members`` tensors on ``device``, logging the choice
    once. The Triton kernels take at most ``MAX_MEMBERS``: more members fall back to torch."""
    forced = os.environ.get("COMPOSE_SERVE_KERNELS", "").strip().lower()
    if forced not in ("", "triton", "torch"):
        raise ValueError(f"COMPOSE_SERVE_KERNELS must be 'triton' or 'torch', got {forced!r}")
    backend = forced or ("triton" if device.type == "cuda" else "torch")
    how = "forced by COMPOSE_SERVE_KERNELS" if forced else f"for {device.type} tensors"
    if backend == "triton" and members > MAX_MEMBERS:
        backend, how = "torch", f"{members} members: the Triton kernels take at most {MAX_MEMBERS}"
    if (backend, how) not in _logged:
        _logged.add((backend, how))
        logger.info("fusion kernels: %s (%s)", backend, how)
    return backend


def _device_of(member_logits: Logits) -> torch.device:
    if isinstance(member_logits, torch.Tensor):
        return member_logits.device
    if len(member_logits) == 0:
        raise ValueError("member_logits is empty: a fusion needs at least one member")
    return member_logits[0].device


def _backend(member_logits: Logits) -> str:
    return backend_for(_device_of(member_logits), len(member_logits))


def mix_probs(member_logits: Logits, weights: torch.Tensor, temperatures: torch.Tensor | None = None) -> torch.Tensor:
    """Mixture of distributions; see ``reference.mix_probs`` for the exact contract."""
    if _backend(member_logits) == "triton":
        from . import mix  # imported on first use: TRITON_INTERPRET is read at import

        return mix.mix_probs(member_logits, weights, temperatures)
    return reference.mix_probs(member_logits, weights, temperatures)


def mix_logits(member_logits: Logits, coeffs: torch.Tensor) -> torch.Tensor:
    """Logit arithmetic; see ``reference.mix_logits`` for the exact contract."""
    if _backend(member_logits) == "triton":
        from . import mix

        return mix.mix_logits(member_logits, coeffs)
    return reference.mix_logits(member_logits, coeffs)


def sample_mix_probs(
    member_logits: Logits,
    weights: torch.Tensor,
    temperatures: torch.Tensor | None,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``mix_probs`` + sampling: ``(tokens [B] int64, logprobs [B] float32)``, no ``[B, V]`` row
    written on the Triton path. ``temperature [B]`` (0 = greedy), ``seeds [B]`` int64."""
    device = _device_of(member_logits)
    if _backend(member_logits) == "triton":
        from . import sample

        return sample.sample_mix_probs(member_logits, weights, temperatures, temperature, seeds)
    generators = reference.generators_from_seeds(seeds, device)
    return reference.sample_mix_probs(member_logits, weights, temperatures, temperature, generators)


def sample_mix_logits(
    member_logits: Logits,
    coeffs: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``mix_logits`` + sampling: ``(tokens [B] int64, logprobs [B] float32)``."""
    device = _device_of(member_logits)
    if _backend(member_logits) == "triton":
        from . import sample

        return sample.sample_mix_logits(member_logits, coeffs, temperature, seeds)
    generators = reference.generators_from_seeds(seeds, device)
    return reference.sample_mix_logits(member_logits, coeffs, temperature, generators)
