"""Helpers for tests that hold the engine's steps (an ``Engine`` whose ``step`` waits on ``go``)."""

from __future__ import annotations

from compose_serve.engine.scheduler import AsyncEngine


def close_releasing(engine: AsyncEngine) -> None:
    """Release held steps, then stop: a step still waiting on ``go`` would keep ``close`` (which
    joins the step thread) from ever returning when a test fails while steps are held."""
    held = getattr(engine.engine, "go", None)
    if held is not None:
        held.set()
    engine.close()
