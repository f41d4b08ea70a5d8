"""Run the application on Ray: a local Ray instance started here (the embedded default), or an
existing cluster joined with ``address``. Blocks until Ctrl-C / SIGTERM, then shuts down cleanly."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence

logger = logging.getLogger(__name__)

# Quiet, fast local instances (ENVIRONMENT.md); a user's own settings win.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address``, or start a local instance sized for this machine."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False, object_store_memory=200 * 2**20)


def serve_on_ray(configs: Sequence[str], host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                 api_key: str | None = None, block: bool = True, app_name: str = "compose-serve",
                 engine_options: dict | None = None, max_body_bytes: int | None = 16 * 2**20) -> str:
    """Deploy ``configs`` behind the OpenAI routes on Ray Serve's HTTP proxy; returns the base URL.

    ``engine_options`` (max_batch, max_queue, request_timeout, torch_threads) reach every replica.
    """
    from ray import serve

    from .builder import build_app, composition_spec

    app = build_app(configs, api_key=api_key, engine_options=engine_options,  # validates before Ray starts
                    max_body_bytes=max_body_bytes)
    start_ray(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=app_name, route_prefix="/")
    url = f"http://{host}:{port}/v1"
    served = [composition_spec(c).name for c in configs]  # the served names, not the config files
    print(f"compose-serve on Ray Serve: {url} (models: {', '.join(map(str, served))}); Ctrl-C stops", flush=True)
    if block:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        shutdown()
    return url


def shutdown() -> None:
    import ray
    from ray import serve

    logger.info("shutting down Ray Serve")
    serve.shutdown()
    ray.shutdown()
