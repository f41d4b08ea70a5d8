"""``compose-serve serve`` in this process: load compositions, run the app under uvicorn.

``run_server(configs, host, port, ...)`` loads every composition (a YAML path or a built-in
name), wraps each in an AsyncEngine, and serves them all from one uvicorn server. The line
``compose-serve: serving [...] at http://HOST:PORT/v1`` goes to stdout once the socket accepts
connections (``--port 0`` picks a free port; scripts read the URL from that line). Ctrl-C
stops the server after the requests in flight, then the engines' step threads.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import uvicorn

from ..composition import build_composition
from ..config import load_composition
from .app import MAX_BODY_BYTES, build_app
from .backend import InProcessBackend
from .catalog import ModelCatalog


class _Server(uvicorn.Server):
    """uvicorn that says where it serves, once it does."""

    def __init__(self, config: uvicorn.Config, ready_line: str) -> None:
        super().__init__(config)
        self.ready_line = ready_line

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.ready_line, flush=True)


def set_torch_threads(threads: int | None) -> int:
    """Intra-op threads for the engine: ``threads``, or on a CPU-only machine one per core but one.

    The event loop (HTTP, SSE) runs beside the step thread; on CPU, an OpenMP team as large as the
    machine stalls at every barrier whenever that thread (or anything else) takes a core: on the
    2-core machine, 2 threads decoded SmolLM2 at ~370 ms per token under load and 1 thread at ~70.
    """
    import torch

    if threads is None:
        cores = os.cpu_count() or 1
        threads = (
            torch.get_num_threads()
            if torch.cuda.is_available()
            else max(1, min(torch.get_num_threads(), cores - 1))
        )
    torch.set_num_threads(threads)
    return threads


def build_backend(
    configs: list[str],
    max_batch: int | None = None,
    max_queue: int | None = None,
    request_timeout: float | None = None,
) -> InProcessBackend:
    """Load every composition named in ``configs`` (paths or built-in names) and its engine."""
    compositions = []
    for config in configs:
        spec = load_composition(config)
        started = time.perf_counter()
        compositions.append(build_composition(spec))
        print(
            f"compose-serve: composition {spec.name} ({spec.method}, {len(spec.members)} members) loaded "
            f"in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return InProcessBackend.from_compositions(compositions, max_batch, max_queue, request_timeout)


def run_server(
    configs: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int | None = None,
    max_queue: int | None = None,
    request_timeout: float | None = None,
    torch_threads: int | None = None,
    log_level: str = "warning",
    max_body_bytes: int | None = MAX_BODY_BYTES,
) -> int:
    """Serve until interrupted; returns the exit status (0 after Ctrl-C)."""
    threads = set_torch_threads(torch_threads)
    print(f"compose-serve: {threads} torch intra-op thread(s)", file=sys.stderr, flush=True)
    backend = build_backend(configs, max_batch, max_queue, request_timeout)
    app = build_app(backend, api_key=api_key, max_body_bytes=max_body_bytes)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    models = ModelCatalog(backend.compositions()).listed
    ready = (
        f"compose-serve: serving {models} at http://{shown_host}:{bound}/v1 (in-process, no Ray)"
    )
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5)
    try:
        _Server(config, ready).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, after shutting down
        pass
    finally:
        sock.close()
    print("compose-serve: stopped", file=sys.stderr, flush=True)
    return 0
