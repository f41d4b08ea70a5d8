"""SlotCache bookkeeping: checkpoint and rollback (the engine's prompts on trial).

The expected lengths and keys are counted by hand from the calls made; the numerical side (a
rolled-back forward leaves every later token equal to a run alone) is in tests/engine/test_trial.py.
"""

from __future__ import annotations

import pytest
import torch

from compose_serve.members.kv import SlotCache


def _cache() -> SlotCache:
    return SlotCache(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32, device="cpu", max_length=64)


def _lengths(cache: SlotCache) -> dict:
    return {key: cache.length_of(key) for key in cache.keys}


def test_rollback_forgets_new_rows_and_restores_lengths():
    cache = _cache()
    cache.plan_prefill(["a", "b"], [3, 5], width=5)
    cache.plan_decode(["a", "b"])  # a: 4, b: 6
    saved = cache.checkpoint()
    cache.plan_packed(["a", "b"], ["c"], [4])  # the forward that will "fail": a 5, b 7, c 4
    assert _lengths(cache) == {"a": 5, "b": 7, "c": 4}
    cache.rollback(saved)
    assert _lengths(cache) == {"a": 4, "b": 6} and cache.plan is None
    perm, positions, _ = cache.plan_decode(["b", "a"])  # the step again: same positions as before
    assert positions.view(-1).tolist() == [4, 6] and perm.tolist() == [1, 0]


def test_rollback_keeps_a_row_that_joined_the_decoding_range():
    cache = _cache()
    cache.plan_prefill(["a"], [2], width=2)
    cache.plan_decode(["a"])  # a: 3, decoding
    cache.plan_prefill(["b"], [3], width=3)  # b: prompt done, not decoding yet
    saved = cache.checkpoint()
    cache.plan_decode(["a", "b"])  # b joins the decoding rows
    cache.rollback(saved)
    assert _lengths(cache) == {"a": 3, "b": 3}
    _, positions, _ = cache.plan_decode(["a", "b"])
    assert positions.view(-1).tolist() == [3, 3]


def test_a_row_released_since_the_checkpoint_cannot_come_back():
    cache = _cache()
    cache.plan_prefill(["a", "b"], [2, 2], width=2)
    saved = cache.checkpoint()
    cache.release(["a"])
    with pytest.raises(KeyError, match="released since the checkpoint"):
        cache.rollback(saved)
