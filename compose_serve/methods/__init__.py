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
    """The method object of a validated composition (its router loaded, when it has one)."""
    names = [m.name for m in spec.members]
    params = spec.parsed_params()
    if spec.method in ("mixture", "logit_mix"):
        assert isinstance(params, (MixtureParams, LogitMixParams))
        if spec.method == "mixture":
            temps = [m.temperature for m in spec.members]
            method: Method = Mixture(names, spec.fixed_weights(), temps, params.weights, params.tau)
        else:
            method = LogitMix(names, spec.fixed_weights(), params.weights, params.tau)
        if params.weights == "router":
            from ..router import Router

            method.router = Router.load(params.router, member_names=names)
            method.top_k, method.min_confidence = params.top_k, params.min_confidence
        return method
    if spec.method == "delta":
        assert isinstance(params, DeltaParams)
        return Delta(names, spec.roles(), params.alpha, params.space, params.plausibility)
    return Interweave(names)


__all__ = ["Delta", "Fused", "Interweave", "LogitMix", "Method", "Mixture", "build_method"]
