"""How many prompt tokens a step may carry next to running sequences, from what steps cost here.

A fixed token budget protects running streams on one device and starves long prompts on another:
a chunk of 256 prompt tokens triples a CPU decode step of SmolLM2-135M and costs a GPU next to
nothing. ``StepPacer`` turns a latency bound into the budget instead (Sarathi-Serve's token budget
from a time-between-tokens bound, estimated online rather than profiled beforehand):

    t_decode   exponential average of the steps that ran sequences and carried no prompt token
    c_token    avg(t - t_decode) / avg(P), exponential averages over the steps that ran sequences
               and carried P > 0 prompt tokens (routed and prefilled): a prompt token's marginal
               cost, the longer chunks weighing more than the short ones, whose time is mostly noise
    budget     min(cap, 2 * last chunk, max(floor, slowdown * t_decode / c_token))

so that a step carrying a chunk takes about ``(1 + slowdown)`` times a decode step alone. Until
both estimates exist the budget is ``min(cap, probe)``; it at most doubles from one carried chunk
to the next (at least ``probe``), so one noisy estimate cannot let a whole cap into one step. With no sequence running the budget is the
cap (``engine.max_prefill_tokens``; 0 means none): nobody waits on the chunk. A step that raised is
not recorded. The budget changes how a prompt is cut into chunks, never the tokens or log-probs
(chunked prefill is exact). Off by default (``engine.prefill_slowdown: null``): on a CPU, where a
prompt token is dear, it keeps streams smooth under a burst but admits too slowly to keep a
batch full under steady load (README, the length benchmark).
"""

from __future__ import annotations

import math


class StepPacer:
    """The per-step prompt-token budget; see the module docstring.

    ``slowdown`` None: the budget is always the cap (a fixed ``max_prefill_tokens``).
    ``cap`` 0: no cap. Times are seconds."""

    def __init__(self, slowdown: float | None, cap: int, probe: int = 32, floor: int = 8,
                 alpha: float = 0.25) -> None:
        if slowdown is not None and slowdown <= 0:
            raise ValueError(f"slowdown must be > 0 or None, got {slowdown}")
        self.slowdown, self.cap, self.probe, self.floor, self.alpha = slowdown, cap, probe, floor, alpha
        self.t_decode: float | None = None  # seconds per step with no prompt token
        self._extra: float | None = None  # seconds a step with prompt tokens took past t_decode
        self._tokens: float | None = None  # prompt tokens such a step carried
        self._grow_to = probe  # the budget's ceiling from the last chunk carried: 2x it

    @property
    def _cap(self) -> float:
        return self.cap or math.inf

    def budget(self, running: bool) -> float:
        """Prompt tokens the next chunk may hold (``inf``: no limit)."""
        if not running or self.slowdown is None:
            return self._cap
        if self.t_decode is None or self.c_token is None:
            return min(self._cap, self.probe)
        estimate = max(self.floor, int(self.slowdown * self.t_decode / self.c_token + 1e-6))
        return min(self._cap, self._grow_to, estimate)

    def record(self, seconds: float, prompt_tokens: int) -> None:
        """One step that ran sequences took ``seconds`` and carried ``prompt_tokens``."""
        if prompt_tokens <= 0:
            self.t_decode = self._average(self.t_decode, seconds)
            return
        self._grow_to = max(self.probe, 2 * prompt_tokens)
        if self.t_decode is not None:
            self._extra = self._average(self._extra, seconds - self.t_decode)
            self._tokens = self._average(self._tokens, prompt_tokens)

    @property
    def c_token(self) -> float | None:
        """Seconds per prompt token on top of a decode step (None: not estimated yet)."""
        if self._extra is None or self._tokens is None or self.t_decode is None:
            return None
        # noise can put chunks' steps below the decode average: a floor keeps the estimate > 0
        return max(self._extra, 1e-3 * self.t_decode) / self._tokens

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def state(self) -> dict:
        """The estimates, for logs and metrics."""
        return {"t_decode_s": self.t_decode, "c_token_s": self.c_token,
                "budget": self.budget(True), "slowdown": self.slowdown, "cap": self.cap}
