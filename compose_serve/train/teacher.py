"""A composition as a teacher: its fused next-token distribution under teacher forcing.

``FusedTeacher(composition)(ids, mask, prompt, select) -> logprobs [N, V]`` float32:
- ``ids / mask / prompt [B, T]``: right-padded rows, ``prompt`` true on each row's prompt tokens;
- ``select [B, T]`` (bool): the ``N`` positions to score (position t scores token t+1);
- every member scores the whole batch once (``member.sequence_logits``: an HF member, or a
  siamese pair whose gate takes its prompt means over ``prompt``, as at prefill), and the
  composition's own ``method.fuse`` fuses the ``N`` rows exactly as the engine fuses one decoding
  step. Per-step dynamic weights (``entropy``) therefore act per position, logit arithmetic keeps its
  plausibility cut, PackLLM weights (``prompt_perplexity``) come from each member's mean NLL over
  the row's prompt, as the engine computes it at prefill, and a routed composition's weights from
  its router over the row's prompt (members no row was routed to are not run).
  The scoring is ``engine.scoring.fused_positions``: the one teacher-forcing path, shared with the
  engine's prompt log-probs (``SamplingParams.prompt_logprobs``).

Any method is a teacher this way, including those that cannot be distilled member by member
(logit arithmetic, IMSM). ``teacher_kl`` measures a second composition (a student, a specialist, a
merge) against the teacher: mean forward KL(teacher || other) per scored token.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..engine.scoring import fused_positions
from ..errors import ConfigError
from .lora import IGNORE, collate, encode_example
from .tasks import Example


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """``select [B, T]``: position t is scored when the token t+1 it predicts carries a label.

    The one shift both the cross-entropy and the KD term use (LLM-NEO's code shifts its KD mask by
    one position less than its labels; here both read this mask)."""
    select = torch.zeros_like(labels, dtype=torch.bool)
    select[:, :-1] = labels[:, 1:] != IGNORE
    return select


def prompt_positions(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` true on the real tokens before each row's first label (the prompt)."""
    return (labels == IGNORE) & mask.bool() & (torch.cumsum(labels != IGNORE, dim=1) == 0)


class FusedTeacher:
    """The fused distribution of ``composition`` at chosen positions (see the module docstring).

    ``override`` is a request's ``composition`` extension (``{"weights": {...}}``), checked by the
    method like a request's; None uses the composition's own weights.
    """

    def __init__(self, composition, override: dict | None = None) -> None:
        for member in composition.members:
            if not hasattr(member, "sequence_logits"):
                raise ConfigError(
                    f"member {member.name!r} cannot score whole sequences (a remote member?); "
                    "teach with a composition whose members are loaded in this process",
                    param="config",
                )
        self.composition = composition
        self.method = composition.method
        self.weights = torch.tensor(self.method.row_weights(override), dtype=torch.float32)  # [K]
        self.routed = self.method.router is not None and not override

    @property
    def vocab_size(self) -> int:
        return self.composition.vocab_size

    @torch.inference_mode()
    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor, select: torch.Tensor
    ) -> torch.Tensor:
        rows = ids.shape[0]
        weights = self.route(ids, prompt) if self.routed else self.weights.expand(rows, -1)  # [B, K]
        from_nll = torch.ones(rows, dtype=torch.bool) if self.method.uses_prompt_nll else None
        return fused_positions(self.composition, ids, mask, prompt, select, weights, from_nll).logprobs

    def route(self, ids: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """A routed composition's weights ``[B, K]`` from its router over each row's prompt."""
        router = self.method.router
        prompts = [row[keep].tolist() for row, keep in zip(ids, prompt.bool(), strict=True)]
        features = self.composition.prompt_features(prompts, router.layer, router.pooling)
        return self.method.route(router.probs(features.float().cpu()))


def forward_kl(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per row, ``[N, V]`` log-probs -> ``[N]``; teacher zeros add 0."""
    p = teacher_logprobs.exp()
    terms = torch.where(p > 0, p * (teacher_logprobs - student_logprobs), torch.zeros_like(p))
    return terms.sum(-1)


def example_batches(tokenizer, examples: list[Example], batch_size: int) -> Iterable[dict]:
    """Right-padded ``input_ids / attention_mask / labels [B, L]`` batches of ``examples`` (prompt
    and reply; labels on the reply), in order."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        yield collate([encode_example(tokenizer, e) for e in chunk], pad_id)


@torch.inference_mode()
def teacher_kl(teacher: FusedTeacher, other: FusedTeacher, examples: list[Example], batch_size: int = 16) -> float:
    """Mean KL(teacher || other) over the reply tokens of ``examples`` (prompt + the given reply,
    teacher-forced), token-weighted."""
    total, count = 0.0, 0
    for batch in example_batches(teacher.composition.tokenizer, examples, batch_size):
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        select, prompt = scored_positions(labels), prompt_positions(labels, mask)
        kl = forward_kl(teacher(ids, mask, prompt, select), other(ids, mask, prompt, select).to(ids.device))
        total += kl.sum().item()
        count += kl.numel()
    return total / max(count, 1)
