"""Inputs and tolerances shared by the kernel tests."""

from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Inputs are upcast exactly, so every dtype compares float32 arithmetic done in two orders; the
# half-precision inputs get a little more room for rows whose values tie after rounding.
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2e-5, "atol": 2e-5},
    torch.float16: {"rtol": 2e-5, "atol": 2e-5},
}


def make_members(K: int, B: int, V: int, dtype: torch.dtype, device, seed: int = 0,
                 scale: float = 3.0) -> torch.Tensor:
    """Random member logits ``[K, B, V]`` in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(K, B, V, generator=g) * scale).to(dtype).to(device)


def make_weights(B: int, K: int, device, seed: int = 0, zero: bool = True) -> torch.Tensor:
    """Mixture weights ``[B, K]``, rows summing to 1; with ``zero`` and K >= 3, member 1 gets 0."""
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.rand(B, K, generator=g) + 0.05
    if zero and K >= 3:
        w[:, 1] = 0.0
    return (w / w.sum(1, keepdim=True)).to(device)


def make_temperatures(K: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 2)
    return (0.5 + torch.rand(K, generator=g)).to(device)


def make_coeffs(B: int, K: int, device, seed: int = 0) -> torch.Tensor:
    """Logit-arithmetic coefficients ``[B, K]`` of both signs; with K >= 3, member 1 gets 0."""
    g = torch.Generator().manual_seed(seed + 3)
    c = torch.randn(B, K, generator=g)
    if K >= 3:
        c[:, 1] = 0.0
    return c.to(device)
