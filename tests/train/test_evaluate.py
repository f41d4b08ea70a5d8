"""Scoring compositions: the fused teacher-forced NLL and greedy task answers on tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from compose_serve.composition import build_composition
from compose_serve.config import parse_composition
from compose_serve.train import evaluate, general_text, tasks


def composition(tiny, method: str, weights=None, params=None):
    members = [{"name": "a", "model": str(tiny["a"])}, {"name": "b", "model": str(tiny["b"])}]
    for member, w in zip(members, weights or [], strict=False):
        member["weight"] = w
    spec = {"name": "t", "method": method, "members": members, "params": params or {}}
    return build_composition(parse_composition(spec))


def separate_logprobs(tiny, ids, mask):
    """Each tiny model's own next-token log-probs ``[B, T-1, V]`` (plain transformers forward)."""
    from transformers import AutoModelForCausalLM

    out = []
    for key in ("a", "b"):
        lm = AutoModelForCausalLM.from_pretrained(tiny[key]).eval()
        with torch.no_grad():
            logits = lm(input_ids=ids, attention_mask=mask).logits[:, :-1]
        out.append(torch.log_softmax(logits.float(), dim=-1))
    return out


def batch(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["a"])
    texts = general_text.passages(3, 200)
    return next(general_text.token_batches(tok, texts, batch_size=3, max_tokens=24))


def test_fused_nll_of_a_mixture_is_the_log_of_the_mixed_probabilities(tiny):
    ids, mask = batch(tiny)
    comp = composition(tiny, "mixture", [0.3, 0.7])
    fused = evaluate.composition_scorer(comp)(ids, mask)  # [B, T-1, V]
    la, lb = separate_logprobs(tiny, ids, mask)
    expected = torch.log(0.3 * la.exp() + 0.7 * lb.exp())
    valid = mask[:, 1:].bool()
    torch.testing.assert_close(fused[valid], expected[valid], rtol=1e-4, atol=1e-5)


def test_fused_nll_of_logit_mix_and_prompt_weights(tiny):
    ids, mask = batch(tiny)
    la, lb = separate_logprobs(tiny, ids, mask)
    valid = mask[:, 1:].bool()
    mixed = evaluate.composition_scorer(composition(tiny, "logit_mix", [0.5, 0.5]))(ids, mask)
    # log-probs differ from logits by a per-row constant, which softmax removes
    expected = torch.log_softmax(0.5 * la + 0.5 * lb, dim=-1)
    torch.testing.assert_close(mixed[valid], expected[valid], rtol=1e-4, atol=1e-5)
    comp = composition(tiny, "mixture", params={"weights": "prompt_perplexity"})
    packllm = evaluate.composition_scorer(comp, prompt_tokens=6)(ids, mask)
    nll = torch.stack(
        [-(lp[:, :5].gather(-1, ids[:, 1:6, None]).squeeze(-1)).mean(1) for lp in (la, lb)], 1
    )
    w = torch.softmax(-nll, dim=1)  # [B, 2]: PackLLM weights from the first 6 tokens
    expected = torch.log(w[:, 0, None, None] * la.exp() + w[:, 1, None, None] * lb.exp())
    torch.testing.assert_close(packllm[valid], expected[valid], rtol=1e-4, atol=1e-5)


def test_greedy_answers_and_member_weights(tiny):
    comp = composition(tiny, "mixture", params={"weights": "entropy"})
    examples = tasks.heldout("add", 3)
    acc, completions = evaluate.task_accuracy(comp, examples, max_batch=2)
    assert len(completions) == 3 and 0.0 <= acc <= 1.0
    assert all(0 < len(c.token_ids) <= tasks.get_task("add").max_answer_tokens for c in completions)
    weights = evaluate.mean_member_weights(completions)
    assert set(weights) == {"a", "b"} and math.isclose(sum(weights.values()), 1.0, rel_tol=1e-5)
    assert weights["a"] != pytest.approx(0.5)  # entropy weights moved away from uniform
