"""Scoring a composition (one model is a one-member composition) on tasks and on general text.

- ``complete(composition, examples)``: greedy completions through the engine's library API (chat
  template, ``SamplingParams(temperature=0)``), one per example, in order.
- ``task_accuracy``: exact match of their texts (``tasks.score``); ``mean_member_weights``: which
  member carried how much of the fused distribution, averaged over the generated tokens.
- ``composition_scorer``: the next-token log-probs of the *fused* distribution under teacher
  forcing, for ``general_text.mean_nll``, through ``teacher.FusedTeacher`` (every member runs
  once over the batch; the method fuses each position as the engine fuses a decoding step).
  The first ``prompt_tokens`` tokens of each row stand in for the prompt a request would have
  (PackLLM weights, IMSM prompt means).
"""

from __future__ import annotations

import torch

from ..engine import Completion, Engine, Request
from ..sampling import SamplingParams
from .tasks import Example, accuracy, get_task

PROMPT_TOKENS = 32


def prompt_ids(tokenizer, example: Example) -> list[int]:
    """The chat-template prompt of ``example`` with the assistant's turn opened."""
    rendered = tokenizer.apply_chat_template(
        example.messages(), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return list(rendered["input_ids"] if isinstance(rendered, dict) else rendered)


def complete(
    composition, examples: list[Example], max_tokens: int | None = None, max_batch: int = 32
) -> list[Completion]:
    """Greedy completions of ``composition`` for ``examples``, in order (``max_tokens`` from the
    task when None)."""
    if not examples:
        return []
    limit = max_tokens or max(get_task(e.task).max_answer_tokens for e in examples)
    engine = Engine(composition, max_batch=max_batch)
    requests = [
        Request(
            prompt_ids(composition.tokenizer, e), SamplingParams(max_tokens=limit, temperature=0.0)
        )
        for e in examples
    ]
    return engine.generate(requests)


def task_accuracy(
    composition, examples: list[Example], max_batch: int = 32
) -> tuple[float, list[Completion]]:
    """Exact-match accuracy of the greedy replies, and the completions themselves."""
    completions = complete(composition, examples, max_batch=max_batch)
    return accuracy([c.text for c in completions], examples), completions


def mean_member_weights(completions: list[Completion]) -> dict[str, float]:
    """Each member's effective weight averaged over every generated token of ``completions``."""
    totals: dict[str, float] = {}
    steps = 0
    for completion in completions:
        for diagnostics in completion.diagnostics:
            for name, weight in diagnostics["weights"].items():
                totals[name] = totals.get(name, 0.0) + weight
            steps += 1
    return {name: total / max(steps, 1) for name, total in totals.items()}


def composition_scorer(composition, override: dict | None = None, prompt_tokens: int = PROMPT_TOKENS):
    """A ``general_text`` scorer for the fused distribution of ``composition``: ``(ids [B, T],
    mask [B, T]) -> logprobs [B, T-1, V]`` (rows at padding positions are 0); ``override`` is a
    request's ``composition`` extension. The first
    ``prompt_tokens`` real tokens of each row play the prompt (PackLLM weights, IMSM means)."""
    from .teacher import FusedTeacher

    teacher = FusedTeacher(composition, override)

    @torch.inference_mode()
    def score(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, width = ids.shape
        select = torch.zeros_like(mask, dtype=torch.bool)
        select[:, :-1] = (mask[:, :-1] * mask[:, 1:]).bool()  # position t scores real token t + 1
        prompt = mask.bool() & (mask.cumsum(dim=1) <= prompt_tokens)
        rows = teacher(ids, mask, prompt, select)  # [N, V]
        out = rows.new_zeros(batch, width, rows.shape[-1])
        out[select.to(rows.device)] = rows
        return out[:, :-1]

    return score
