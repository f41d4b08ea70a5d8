"""``build_app``: compositions in, a bound Ray Serve application out.

Validates every composition once, picks its placement, binds the graph

    OpenAIIngress ──handle──> CompositionServer(name)              (colocated, the default)
                  ──handle──> CompositionServer(name) ──> MemberServer(member) x K   (distributed)

and logs the resolved options. ``app_builder(args)`` is the same for ``serve run`` with a YAML
config (``import_path: compose_serve.deployments:app_builder``, ``args: {configs: [...]}``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ray import serve
from ray.serve import Application

from compose_serve.config import CompositionSpec, load_composition, parse_composition
from compose_serve.http.app import MAX_BODY_BYTES

from .composition import CompositionServer
from .ingress import OpenAIIngress
from .member import MemberServer

logger = logging.getLogger(__name__)


def _deployment_options(spec: CompositionSpec) -> dict:
    d = spec.deployment
    options = {"ray_actor_options": dict(d.ray_actor_options), "max_ongoing_requests": d.max_ongoing_requests,
               "health_check_period_s": 5, "graceful_shutdown_timeout_s": 1}
    if d.autoscaling_config is not None:
        options["autoscaling_config"] = d.autoscaling_config
    else:
        options["num_replicas"] = d.num_replicas
    return options


def _bind_composition(spec: CompositionSpec, engine_options: dict):
    name = spec.name
    body = spec.model_dump(mode="json")
    server = serve.deployment(CompositionServer, name=f"composition-{name}", **_deployment_options(spec))
    if spec.deployment.placement == "colocated":
        return server.bind(body, None, engine_options)
    interweave = spec.params if spec.method == "interweave" else None
    members = {}
    for m in spec.members:
        member = serve.deployment(MemberServer, name=f"member-{name}-{m.name}", num_replicas=1,
                                  ray_actor_options=dict(spec.deployment.member_ray_actor_options),
                                  max_ongoing_requests=1024, graceful_shutdown_timeout_s=1)
        members[m.name] = member.bind(m.model_dump(mode="json"), interweave, spec.deployment.transfer_dtype)
    return server.bind(body, members, engine_options)


def composition_spec(config: str | Path | dict | CompositionSpec) -> CompositionSpec:
    if isinstance(config, CompositionSpec):
        return config
    if isinstance(config, dict):  # inline, e.g. in a ``serve run`` YAML; paths relative to the cwd
        return parse_composition(config, base_dir=Path.cwd())
    return load_composition(config)


def build_app(configs: Sequence[str | Path | dict | CompositionSpec], api_key: str | None = None,
              ingress_options: dict | None = None, engine_options: dict | None = None,
              max_body_bytes: int | None = MAX_BODY_BYTES) -> Application:
    """The whole application for ``configs`` (YAML paths, built-in names, dicts, or parsed specs).

    ``engine_options`` go to every composition's AsyncEngine (max_batch, max_queue,
    request_timeout) and ``torch_threads`` to its replica; ``max_body_bytes`` bounds a request
    body at the ingress (413 beyond).
    """
    specs = [composition_spec(c) for c in configs]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"two compositions share a name: {names}")
    handles, bodies = {}, {}
    for spec in specs:
        handles[spec.name] = _bind_composition(spec, dict(engine_options or {}))
        bodies[spec.name] = spec.model_dump(mode="json")
        logger.info("composition %s: %s, placement %s, options %s", spec.name, spec.method,
                    spec.deployment.placement, _deployment_options(spec))
    ingress = serve.deployment(serve.ingress()(OpenAIIngress), name="openai-ingress",
                               **(ingress_options or {"ray_actor_options": {"num_cpus": 0},
                                                      "max_ongoing_requests": 4096}))
    return ingress.bind(handles, bodies, api_key, max_body_bytes)


def app_builder(args: dict) -> Application:
    """For ``serve run``/``serve deploy``: ``args: {configs: [PATH | NAME | {composition}], api_key,
    max_body_mb}``; without ``api_key`` the key is ``$COMPOSE_SERVE_API_KEY``, as for ``serve``."""
    configs = args.get("configs") or ["default"]
    api_key = args.get("api_key") or os.environ.get("COMPOSE_SERVE_API_KEY") or None
    max_body = args.get("max_body_mb")
    return build_app(configs, api_key=api_key,
                     max_body_bytes=MAX_BODY_BYTES if max_body is None else int(float(max_body) * 2**20))
