"""Teacher forcing through a composition: its fused distribution at every position of given text.

One path for both users of it: the distillation teacher (``train/teacher.py``) and the prompt
log-probs of a request (``SamplingParams.prompt_logprobs``, the engine's admission).

``fused_positions(composition, ids, mask, prompt, select, weights, from_nll) -> TeacherForced``:
- ``ids / mask / prompt [B, T]``: right-padded rows, ``prompt`` true on each row's prompt tokens;
- ``select [B, T]`` (bool): the ``N`` positions to score, row-major (position t scores token t+1);
- ``weights [B, K]`` float32: each row's member weights; member k runs only on the rows where its
  weight is not 0 (``member.sequence_logits``: an HF member, a LoRA view of a shared base, or a
  siamese pair whose gate takes its prompt means over ``prompt``, as at prefill);
- ``from_nll [B]`` (bool, PackLLM methods only): rows whose weights are instead
  ``softmax(-NLL_k(prompt) / tau)`` over the members that run for them, each member's mean NLL
  over the row's prompt computed from the same forward, as the engine computes it at prefill;
- the composition's own ``method.fuse`` fuses the ``N`` rows exactly as the engine fuses one
  decoding step (dynamic ``entropy`` weights act per position, logit arithmetic keeps its cut).

``score_prompts(composition, prompts, weights, top_n, from_nll)`` turns that into per-token prompt
log-probs (``PromptLogprob``; the first token has none). Cost: one extra forward per member over
the prompts (no KV cache is kept or touched) and ``[N, V]`` float logits per member that runs, in
groups of at most ``MAX_SCORED_POSITIONS`` positions (a longer prompt goes alone). It must run on
the thread that steps the engine, never during a step: members on a shared base keep per-forward
state (the rows' adapters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

#: positions scored in one teacher-forced forward at most (bounds the ``[N, V]`` tensors)
MAX_SCORED_POSITIONS = 4096


class PromptLogprob(NamedTuple):
    """One prompt token (not the first) under the composition's fused distribution.

    ``logprob`` may be ``-inf`` (a token a method's cut rules out); ``rank`` is 1 + the number of
    tokens more likely; ``top`` the ``n`` most likely ``(token id, log-prob)``, best first."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass
class TeacherForced:
    """``logprobs [N, V]`` float32 at the selected positions, and the ``weights [B, K]`` each row
    was fused with (its PackLLM weights where ``from_nll`` asked for them)."""

    logprobs: torch.Tensor
    weights: torch.Tensor


def can_teacher_force(composition) -> bool:
    """Whether every member scores whole sequences in this process (a remote member does not)."""
    return all(hasattr(member, "sequence_logits") for member in composition.members)


@torch.inference_mode()
def fused_positions(
    composition,
    ids: torch.Tensor,
    mask: torch.Tensor,
    prompt: torch.Tensor,
    select: torch.Tensor,
    weights: torch.Tensor,
    from_nll: torch.Tensor | None = None,
) -> TeacherForced:
    """The composition's fused log-probs at the ``select`` positions (see the module docstring)."""
    method, vocab = composition.method, composition.vocab_size
    select = select.bool()
    rows_of = select.nonzero()[:, 0]  # [N]: the batch row of each scored position
    weights = weights.float().cpu().clone()  # [B, K]
    packed = from_nll is not None and method.uses_prompt_nll and bool(from_nll.any())
    nll = torch.full(weights.shape, float("inf"))  # [B, K]; a member that does not run: weight 0
    logits = []
    for k, member in enumerate(composition.members):
        runs = weights[:, k] != 0  # [B]
        if not bool(runs.any()):
            logits.append(torch.zeros((len(rows_of), vocab)))
            continue
        sub = runs.nonzero()[:, 0]
        every = len(sub) == ids.shape[0]
        r_ids, r_mask, r_prompt, r_select = (
            t if every else t[sub] for t in (ids, mask, prompt, select)
        )
        if packed:
            full = member.sequence_logits(r_ids, r_mask, r_prompt)[..., :vocab]  # [b, T, V]
            nll[sub, k] = prompt_nll(full, r_ids, r_prompt).float().cpu()
            part = full[r_select.to(full.device)]
        else:
            part = member.sequence_logits(r_ids, r_mask, r_prompt, r_select)[:, :vocab]  # [n, V]
        if every:
            logits.append(part)
        else:  # zeros at the positions of the rows it did not run for (their weight is 0)
            full_rows = torch.zeros((len(rows_of), vocab), dtype=part.dtype, device=part.device)
            full_rows[runs[rows_of].to(part.device)] = part
            logits.append(full_rows)
    if packed:
        by_nll = method.weights_from_prompt_nll(nll, method.tau)  # [B, K]
        weights = torch.where(from_nll.cpu().bool().unsqueeze(1), by_nll, weights)
    if len(rows_of) == 0:
        return TeacherForced(torch.zeros((0, vocab)), weights)
    per_position = weights[rows_of]  # [N, K]
    device = next(t.device for t, w in zip(logits, per_position.T, strict=True) if bool(w.any()))
    fused = method.fuse([t.to(device) for t in logits], per_position.to(device))
    return TeacherForced(fused.logprobs.float(), weights)


def prompt_nll(logits: torch.Tensor, ids: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over each row's prompt ``[B]``, from ``logits [B, T, V]``: the pairs
    (t, t+1) that both lie in the prompt, as ``HFMember.prompt_nll`` counts them at prefill."""
    ids, prompt = ids.to(logits.device), prompt.to(logits.device)
    pairs = (prompt[:, :-1] & prompt[:, 1:]).float()  # [B, T-1]
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    return -(picked * pairs).sum(1) / pairs.sum(1).clamp_min(1)


def score_prompts(
    composition,
    prompts: list[list[int]],
    weights: torch.Tensor,
    top_n: list[int],
    from_nll: torch.Tensor | None = None,
) -> tuple[list[list[PromptLogprob | None]], torch.Tensor]:
    """Every token of each prompt under the fused distribution of the composition at its position.

    ``prompts``: B token-id lists; ``weights [B, K]`` each prompt's member weights (the engine's
    plan after routing); ``top_n[b]`` how many top tokens to list; ``from_nll [B]`` as in
    ``fused_positions``. Returns per prompt ``[None, PromptLogprob(token 1), ...]`` (one entry per
    token), and the ``weights [B, K]`` used. Prompts are scored in groups of at most
    ``MAX_SCORED_POSITIONS`` positions, in order.
    """
    out: list[list[PromptLogprob | None]] = []
    used = weights.float().cpu().clone()
    start = 0
    while start < len(prompts):
        end, positions = start, 0
        while end < len(prompts) and (
            end == start or positions + len(prompts[end]) - 1 <= MAX_SCORED_POSITIONS
        ):
            positions += len(prompts[end]) - 1
            end += 1
        group = slice(start, end)
        nll_rows = None if from_nll is None else from_nll[group]
        rows, used[group] = _score_group(
            composition, prompts[group], weights[group], top_n[group], nll_rows
        )
        out.extend(rows)
        start = end
    return out, used


def _score_group(composition, prompts, weights, top_n, from_nll):
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(prompts):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    select = torch.zeros_like(ids, dtype=torch.bool)
    select[:, :-1] = (mask[:, :-1] * mask[:, 1:]).bool()  # every position but each row's last
    if not bool(select.any()):  # one-token prompts only: nothing to score
        return [[None] for _ in prompts], weights.float().cpu()
    forced = fused_positions(composition, ids, mask, mask.bool(), select, weights, from_nll)
    logprobs = forced.logprobs  # [N, V]
    targets = ids[:, 1:][select[:, :-1]].to(
        logprobs.device
    )  # [N]: the token each position predicts
    chosen = logprobs.gather(1, targets.unsqueeze(1))  # [N, 1]
    ranks = (logprobs > chosen).sum(1) + 1  # [N]
    n_max = max(top_n)
    top_lps, top_ids = (
        logprobs.topk(min(n_max, logprobs.shape[1]), dim=1) if n_max else (None, None)
    )
    chosen_l, ranks_l, targets_l = chosen.squeeze(1).tolist(), ranks.tolist(), targets.tolist()
    top_ids_l = top_ids.tolist() if top_ids is not None else None
    top_lps_l = top_lps.tolist() if top_lps is not None else None
    out, i = [], 0
    for row, tokens in enumerate(prompts):
        entries: list[PromptLogprob | None] = [None]
        n = top_n[row]
        for _ in range(len(tokens) - 1):
            top = list(zip(top_ids_l[i][:n], top_lps_l[i][:n], strict=True)) if n else []
            entries.append(PromptLogprob(targets_l[i], chosen_l[i], ranks_l[i], top))
            i += 1
        out.append(entries)
    return out, forced.weights
