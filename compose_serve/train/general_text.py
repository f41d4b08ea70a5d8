"""Held-out general text for the forgetting score: mean negative log-likelihood per token.

The text is Python's own documentation as the interpreter ships it (``pydoc_data.topics``: the
language reference topics behind ``help("if")``), so every machine with this Python has it and
nothing is downloaded; no task data is drawn from it, so no adapter is trained on it. It depends on
the Python version, which benchmark results record.

``passages(n, chars)`` cuts the topics (sorted by name) at paragraph breaks into ``n`` passages of
about ``chars`` characters. ``token_batches`` tokenises them (no special tokens, at most
``max_tokens`` each) into right-padded ``ids [B, T]`` / ``mask [B, T]`` batches. ``mean_nll`` takes a
scorer that maps such a batch to next-token log-probs ``[B, T-1, V]`` (float32, position t
predicts token t+1) and returns the token-weighted mean NLL over every real target token (and
each passage's own mean, for the spread).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

PASSAGES = 64
PASSAGE_CHARS = 600
MAX_TOKENS = 128


def passages(n: int = PASSAGES, chars: int = PASSAGE_CHARS) -> list[str]:
    """The first ``n`` passages of about ``chars`` characters from ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    out: list[str] = []
    for name in sorted(topics):
        current = ""
        for paragraph in topics[name].split("\n\n"):
            paragraph = paragraph.strip()
            if not paragraph:
                continue
            current = f"{current}\n\n{paragraph}" if current else paragraph
            if len(current) >= chars:
                out.append(current)
                current = ""
                if len(out) == n:
                    return out
    if len(out) < n:
        raise ValueError(f"pydoc_data.topics holds only {len(out)} passages of {chars} characters")
    return out


def token_batches(
    tokenizer, texts: list[str], batch_size: int = 4, max_tokens: int = MAX_TOKENS
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded ``(ids [B, T], mask [B, T])`` batches of the tokenised ``texts``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [tokenizer.encode(t, add_special_tokens=False)[:max_tokens] for t in texts]
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(e) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, tokens in enumerate(chunk):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        yield ids, mask


Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class NllResult:
    """Token-weighted mean NLL (nats per token), target tokens scored, and each text's own mean."""

    mean: float
    tokens: int
    per_text: list[float]


@torch.inference_mode()
def mean_nll(scorer: Scorer, batches) -> NllResult:
    """The NLL of every real target token under ``scorer``, averaged over tokens and per text.

    ``scorer(ids [B, T], mask [B, T]) -> logprobs [B, T-1, V]``: row ``t`` is the distribution of
    token ``t + 1``. Targets are the real tokens after the first of each row.
    """
    total, count, per_text = 0.0, 0, []
    for ids, mask in batches:
        logprobs = scorer(ids, mask)  # [B, T-1, V]
        valid = mask[:, 1:].bool().to(logprobs.device)  # [B, T-1]
        picked = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1).to(logprobs.device)).squeeze(-1)
        nll = torch.where(valid, -picked, torch.zeros_like(picked)).double()  # [B, T-1]
        total += float(nll.sum())
        count += int(valid.sum())
        per_text.extend((nll.sum(1) / valid.sum(1).clamp(min=1)).tolist())
    return NllResult(total / max(count, 1), count, per_text)


def model_scorer(lm: torch.nn.Module, vocab_size: int | None = None) -> Scorer:
    """A scorer for one causal LM (a transformers or PEFT model): its own next-token log-probs."""

    def score(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        device = next(lm.parameters()).device
        logits = lm(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        return torch.log_softmax(logits.float(), dim=-1)

    return score
