"""The OpenAI-compatible HTTP layer: wire models, translation, routes, metrics, backends.

``build_app(InProcessBackend.from_compositions([...]))`` is a FastAPI app serving compositions
from this process; ``compose-serve serve`` runs it under uvicorn. Names are imported lazily, so
``compose_serve.http.protocol`` (all the client needs) loads without torch or FastAPI.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "attach": "app",
    "build_app": "app",
    "build_router": "app",
    "Backend": "backend",
    "CompositionInfo": "backend",
    "InProcessBackend": "backend",
    "OpenAIServing": "serving",
    "error_response": "serving",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
