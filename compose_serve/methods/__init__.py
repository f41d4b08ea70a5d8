"""Fusion methods, one module each: ``mixture`` (MoD), ``logit_mix`` (product of experts),
``delta`` (proxy-tuning / DExperts / EFT / contrastive), ``interweave`` (IMSM; the gate is in
``interweave.py`` and runs inside the siamese member)."""

from __future__ import annotations

from ..config import CompositionSpec, DeltaParams, LogitMixParams, MixtureParams
from .base import Fused, Method
from .delta import Delta
from .identity import Interweave
from .logit_mix import LogitMix
from .mixture import Mixture


def build_method(spec: CompositionSpec) -> Method:
    """The method object of a validated composition."""
    names = [m.name for m in spec.members]
    params = spec.parsed_params()
    if spec.method == "mixture":
        assert isinstance(params, MixtureParams)
        temps = [m.temperature for m in spec.members]
        return Mixture(names, spec.fixed_weights(), temps, params.weights, params.tau)
    if spec.method == "logit_mix":
        assert isinstance(params, LogitMixParams)
        return LogitMix(names, spec.fixed_weights(), params.weights, params.tau)
    if spec.method == "delta":
        assert isinstance(params, DeltaParams)
        return Delta(names, spec.roles(), params.alpha, params.space, params.plausibility)
    return Interweave(names)


__all__ = ["Delta", "Fused", "Interweave", "LogitMix", "Method", "Mixture", "build_method"]
