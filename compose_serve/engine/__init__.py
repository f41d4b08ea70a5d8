"""The engine: sequences, the lockstep step loop (``core.Engine``), and its drivers."""

from .core import Engine
from .sequence import Completion, Request, TokenEvent

__all__ = ["Completion", "Engine", "Request", "TokenEvent"]
