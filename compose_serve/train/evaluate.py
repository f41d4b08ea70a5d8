"""Scoring a composition (one model is a one-member composition) on tasks and on general text.

- ``complete(composition, examples)``: greedy completions through the engine's library API (chat
  template, ``SamplingParams(temperature=0)``), one per example, in order.
- ``task_accuracy``: exact match of their texts (``tasks.score``); ``mean_member_weights``: which
  member carried how much of the fused distribution, averaged over the generated tokens.
- ``composition_scorer``: the next-token log-probs of the *fused* distribution under teacher
  forcing, for ``general_text.mean_nll``. Every member runs once over the whole batch
  (``[B, T]`` -> logits ``[B, T, V]``), and the composition's own ``method.fuse`` fuses each
  position as the engine would fuse that decoding step: rows ``B * (T - 1)``, weights ``[rows, K]``.
  Per-step dynamic weights (``entropy``) therefore act per position; PackLLM weights
  (``prompt_perplexity``) come from each member's NLL over the first ``prompt_tokens`` tokens of the
  row, standing in for the prompt a request would have.
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


def member_logits(member, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One member's logits ``[B, T, V]`` over right-padded ``ids [B, T]`` (no cache kept)."""
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    hidden = member.decoder(
        input_ids=ids.to(member.device),
        attention_mask=mask.to(member.device),
        position_ids=positions.to(member.device),
        use_cache=False,
    ).last_hidden_state
    return member.logits(hidden)


def composition_scorer(
    composition, weights: list[float] | None = None, prompt_tokens: int = PROMPT_TOKENS
):
    """A ``general_text`` scorer for the fused distribution of ``composition`` (HF members only)."""
    method = composition.method
    row_weights = torch.tensor(weights or method.default_weights(), dtype=torch.float32)  # [K]
    vocab = composition.vocab_size

    @torch.inference_mode()
    def score(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, width = ids.shape
        logits = [
            member_logits(m, ids, mask)[:, :-1, :vocab] for m in composition.members
        ]  # K x [B, T-1, V]
        w = row_weights.expand(batch, -1).clone()  # [B, K]
        if method.uses_prompt_nll:
            w = method.weights_from_prompt_nll(
                prompt_nll(logits, ids, mask, prompt_tokens), method.tau
            )
        flat_w = w.repeat_interleave(width - 1, dim=0).to(logits[0].device)  # [B * (T-1), K]
        fused = method.fuse([z.reshape(-1, vocab) for z in logits], flat_w)
        return fused.logprobs.view(batch, width - 1, vocab)

    return score


def prompt_nll(
    logits: list[torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, prompt_tokens: int
) -> torch.Tensor:
    """Each member's mean NLL over the first ``prompt_tokens`` tokens of each row: ``[B, K]``."""
    targets = ids[:, 1:prompt_tokens].to(logits[0].device)
    valid = mask[:, 1:prompt_tokens].to(logits[0].device).float()
    out = []
    for z in logits:
        logprobs = torch.log_softmax(z[:, : prompt_tokens - 1].float(), dim=-1)
        picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        out.append(-(picked * valid).sum(1) / valid.sum(1).clamp(min=1))
    return torch.stack(out, dim=1)
