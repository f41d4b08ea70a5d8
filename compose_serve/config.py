"""What a user writes: a composition in YAML, validated with pydantic.

```yaml
name: math-and-code          # served model name
method: mixture              # mixture | logit_mix | delta | interweave
members:
  - {name: math, model: smollm2-135m-instruct, adapter: adapters/math, weight: 0.5}
  - {name: code, model: smollm2-135m-instruct, adapter: adapters/code, weight: 0.5}
params: {weights: fixed}     # method parameters, see the *Params models below
```
Relative paths (model folders, adapters, gate files) are read relative to the YAML file. Every
error is a ``ConfigError`` whose ``param`` is the dotted path of the field (``members.1.weight``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

Method = Literal["mixture", "logit_mix", "delta", "interweave"]
ROLES = ("base", "expert", "antiexpert")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemberSpec(_Strict):
    """One member: a causal LM, optionally with a PEFT adapter."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]+$", max_length=64)]
    model: str = Field(description="local folder, hub id, or 'smollm2-135m-instruct'")
    adapter: str | None = Field(default=None, description="PEFT adapter folder")
    merge_adapter: bool = Field(default=False, description="merge the adapter into the weights at load")
    weight: float | None = Field(default=None, description="fixed weight (mixture, logit_mix)")
    temperature: Annotated[float, Field(gt=0)] = Field(default=1.0, description="T_k of the mixture")
    role: Literal["base", "expert", "antiexpert"] | None = Field(default=None, description="delta only")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    revision: str | None = None


class RoutedParams(_Strict):
    """The router's settings, shared by ``mixture`` and ``logit_mix`` (``weights: router``).

    ``router``: a folder written by ``compose-serve fit-router`` (its member names must be the
    composition's). Its softmax over members is the request's weights; ``top_k`` keeps the k most
    probable members, renormalised, and the others are never prefilled nor decoded for that request.
    ``min_confidence``: when the router's top probability is below it, the request falls back to
    the composition's fixed weights (the members' ``weight``, uniform when none is given).
    """

    router: str | None = None
    top_k: Annotated[int, Field(ge=1)] | None = None
    min_confidence: Annotated[float, Field(gt=0, le=1)] | None = None

    @model_validator(mode="after")
    def _router_needs_a_file(self):
        weights = getattr(self, "weights", None)
        if weights == "router" and self.router is None:
            raise ValueError("weights: router needs router: FOLDER (written by compose-serve fit-router)")
        if weights != "router" and (self.router, self.top_k, self.min_confidence) != (None, None, None):
            raise ValueError("router, top_k and min_confidence go with weights: router")
        return self


class MixtureParams(RoutedParams):
    """MoD: ``weights`` fixed (from the members), ``prompt_perplexity`` (PackLLM), ``entropy``, or
    ``router`` (a fitted router picks each request's weights; see RoutedParams)."""

    weights: Literal["fixed", "prompt_perplexity", "entropy", "router"] = "fixed"
    tau: Annotated[float, Field(gt=0)] = 1.0


class LogitMixParams(RoutedParams):
    """Product of experts ``softmax(sum_k w_k z_k)``; weights fixed, from prompt perplexity, or
    from a router (see RoutedParams)."""

    weights: Literal["fixed", "prompt_perplexity", "router"] = "fixed"
    tau: Annotated[float, Field(gt=0)] = 1.0


class DeltaParams(_Strict):
    """``s_base + alpha (s_expert - s_antiexpert)`` in logits (proxy-tuning, DExperts) or
    log-probs (EFT). Without a base the expert is the base: ``(1 + alpha) s_exp - alpha s_anti``,
    which with ``plausibility: 0.1`` is contrastive decoding."""

    alpha: float = 1.0
    space: Literal["logits", "logprobs"] = "logits"
    plausibility: Annotated[float, Field(gt=0, le=1)] | None = None


class InterweaveParams(_Strict):
    """IMSM: a trained ``gate`` (safetensors file or folder) or a ``scalar`` g in [0, 1]."""

    gate: str | None = None
    scalar: Annotated[float, Field(ge=0, le=1)] | None = None

    @model_validator(mode="after")
    def _one_gate(self) -> InterweaveParams:
        if (self.gate is None) == (self.scalar is None):
            raise ValueError("give exactly one of gate (a file) or scalar (a number)")
        return self


PARAMS: dict[str, type[_Strict]] = {
    "mixture": MixtureParams,
    "logit_mix": LogitMixParams,
    "delta": DeltaParams,
    "interweave": InterweaveParams,
}


class EngineSpec(_Strict):
    """How the engine batches: running sequences at most, the waiting queue's bound, the prompt
    tokens prefilled (and routed) per step at most (0: no limit; a long prompt or a burst is
    prefilled in chunks of at most this many tokens), how much a step's chunk may slow the running
    streams (``prefill_slowdown``: while sequences run, the chunk is sized from the measured cost of
    a decode step and of a prompt token so that a step takes about ``1 + prefill_slowdown`` times a
    decode step alone, ``engine/pacing.py``; null: every chunk gets ``max_prefill_tokens``), and
    whether a step's chunk rides in its decode forward (``pack_steps``; false: two forwards)."""

    max_batch: Annotated[int, Field(ge=1, le=1024)] = 16
    max_queue: Annotated[int, Field(ge=0)] = 256
    max_prefill_tokens: Annotated[int, Field(ge=0)] = 256
    prefill_slowdown: Annotated[float, Field(gt=0)] | None = None
    pack_steps: bool = True


class DeploymentSpec(_Strict):
    """How Ray Serve runs a composition (ignored by the in-process server).

    ``colocated``: one deployment whose replicas each hold the whole composition, so a step never
    leaves the process. ``distributed``: one deployment per member plus the composition's engine,
    which calls every member each step; its member replicas keep KV caches, so each member and the
    composition run exactly one replica. The defaults ask for no CPU, so they schedule on 2 cores.
    """

    placement: Literal["colocated", "distributed"] = "colocated"
    num_replicas: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0})
    max_ongoing_requests: Annotated[int, Field(ge=1)] = 1024
    member_ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0})
    transfer_dtype: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _one_replica_when_distributed(self) -> DeploymentSpec:
        if self.placement == "distributed" and (self.num_replicas != 1 or self.autoscaling_config):
            raise ValueError("distributed placement runs one composition replica (its members hold KV state)")
        return self


class CompositionSpec(_Strict):
    """Members + method + parameters, served under ``name``."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:/-]+$", max_length=128)]
    method: Method
    members: Annotated[list[MemberSpec], Field(min_length=1)]
    params: dict[str, Any] = Field(default_factory=dict)
    share_base: bool = Field(default=True, description="members on one base model share one copy of it")
    engine: EngineSpec = Field(default_factory=EngineSpec)
    deployment: DeploymentSpec = Field(default_factory=DeploymentSpec)

    def parsed_params(self):
        """``params`` as the method's own model (MixtureParams, DeltaParams, ...)."""
        try:
            return PARAMS[self.method].model_validate(self.params)
        except ValidationError as exc:
            raise _config_error(exc, prefix="params") from None

    def roles(self) -> dict[str, int]:
        """delta only: role -> member index (a member's ``role``, else its name)."""
        return {(m.role or m.name): i for i, m in enumerate(self.members)}

    def fixed_weights(self) -> list[float]:
        """The members' weights, uniform when none was given."""
        if all(m.weight is None for m in self.members):
            return [1.0 / len(self.members)] * len(self.members)
        return [float(m.weight) for m in self.members]


def check_composition(spec: CompositionSpec) -> None:
    """The checks that span fields; each raises a ConfigError naming the field."""
    names = [m.name for m in spec.members]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"member names must be unique; {name!r} appears twice", param=f"members.{i}.name")
    spec.parsed_params()
    {"mixture": _check_weights, "logit_mix": _check_weights, "delta": _check_roles,
     "interweave": _check_siamese}[spec.method](spec)


def _check_weights(spec: CompositionSpec) -> None:
    given = [m.weight is not None for m in spec.members]
    if any(given) and not all(given):
        i = given.index(False)
        raise ConfigError(f"give every member a weight or none (uniform); {spec.members[i].name!r} has none",
                          param=f"members.{i}.weight")
    for i, m in enumerate(spec.members):
        if m.weight is not None and not math.isfinite(m.weight):
            raise ConfigError(f"weight of {m.name!r} must be finite, got {m.weight}", param=f"members.{i}.weight")
    if spec.method == "mixture" and all(given):
        check_mixture_weights([m.name for m in spec.members], [m.weight for m in spec.members], "members")


def check_mixture_weights(names: list[str], weights: list[float], param: str) -> None:
    """A mixture's weights are >= 0 and sum to 1 (tolerance 1e-4); ``param`` prefixes the field."""
    for i, (name, w) in enumerate(zip(names, weights, strict=True)):
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"mixture weight of {name!r} must be >= 0, got {w}", param=f"{param}.{i}.weight"
                              if param == "members" else f"{param}.{name}")
    total = sum(weights)
    if abs(total - 1.0) > 1e-4:
        where = "members.weight" if param == "members" else param
        raise ConfigError(f"mixture weights must sum to 1, got {total:.6g} ({dict(zip(names, weights, strict=True))})",
                          param=where)


def _check_roles(spec: CompositionSpec) -> None:
    roles = [m.role or m.name for m in spec.members]
    for i, role in enumerate(roles):
        if role not in ROLES:
            raise ConfigError(f"delta member {spec.members[i].name!r} needs a role (base, expert or antiexpert) "
                              "as its name or its role field", param=f"members.{i}.role")
    if len(set(roles)) != len(roles) or not {"expert", "antiexpert"} <= set(roles):
        raise ConfigError(f"delta needs one expert and one antiexpert (and optionally a base), got {roles}",
                          param="members")


def _check_siamese(spec: CompositionSpec) -> None:
    if len(spec.members) != 1 or spec.members[0].adapter is None:
        raise ConfigError("interweave takes exactly one member with both model and adapter (the siamese pair)",
                          param="members")
    if spec.members[0].merge_adapter:
        raise ConfigError("interweave needs the adapter unmerged", param="members.0.merge_adapter")


def _config_error(exc: ValidationError, prefix: str = "") -> ConfigError:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(err["loc"]))
    message = err["msg"].removeprefix("Value error, ")
    return ConfigError(f"{param or 'composition'}: {message}", param=param or prefix)


def parse_composition(data: dict, base_dir: str | Path | None = None) -> CompositionSpec:
    """Validate a composition dict; relative paths are resolved against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError(f"a composition is a mapping, got {type(data).__name__}", param="config")
    try:
        spec = CompositionSpec.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc) from None
    check_composition(spec)
    return _resolve_paths(spec, Path(base_dir)) if base_dir is not None else spec


BUILTIN_DIR = Path(__file__).parent / "configs"


def builtin_configs() -> list[str]:
    """Names of the compositions shipped with the package (``default``, ``smollm2``, ...)."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_composition(path: str | Path) -> CompositionSpec:
    """Read and validate a YAML composition file, or a built-in one by name (``default``)."""
    path = Path(path)
    if not path.is_file() and str(path) in builtin_configs():
        path = BUILTIN_DIR / f"{path}.yaml"
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist (built-in: {builtin_configs()})",
                          param="config")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}", param="config") from None
    return parse_composition(data, base_dir=path.parent)


def _resolve_paths(spec: CompositionSpec, base: Path) -> CompositionSpec:
    def local(value: str | None) -> str | None:
        if value is None or Path(value).is_absolute():
            return value
        candidate = base / value
        return str(candidate.resolve()) if candidate.exists() else value

    members = [m.model_copy(update={"model": local(m.model), "adapter": local(m.adapter)}) for m in spec.members]
    params = dict(spec.params)
    for field_name in ("gate", "router"):
        if isinstance(params.get(field_name), str):
            params[field_name] = local(params[field_name])
    return spec.model_copy(update={"members": members, "params": params})
