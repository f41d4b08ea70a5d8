"""The slot cache under churn: sequences admitted, aborted and finished at random steps, prompts
prefilled in small chunks; every sequence's greedy tokens and log-probs equal a no-cache recompute.

The reference is transformers (and PEFT) run on the whole sequence so far at every step, with the
mixture formula of ALGORITHMS.md evaluated here; nothing of the engine's cache is reused.
"""

from __future__ import annotations

import random

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from compose_serve.composition import build_composition
from compose_serve.config import parse_composition
from compose_serve.engine import Engine, Request
from compose_serve.members.hf import HFMember
from compose_serve.sampling import SamplingParams

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Compose models at decoding time",
         "2 + 2 = 4. 12 * 3 = 36.", "def add(a, b):\n    return a + b\n", "Una", "Every member scores the next"]


def _members(tiny, kind):
    if kind == "plain":
        return [{"name": "a", "model": str(tiny["a"])}], {"a": None}
    return ([{"name": "one", "model": str(tiny["a"]), "adapter": str(tiny["lora_a"]), "weight": 0.5},
             {"name": "two", "model": str(tiny["a"]), "adapter": str(tiny["lora_a2"]), "weight": 0.5}],
            {"one": tiny["lora_a"], "two": tiny["lora_a2"]})


@torch.no_grad()
@pytest.mark.parametrize("pack", [True, False], ids=["packed", "two_forwards"])
@pytest.mark.parametrize("kind", ["plain", "shared_mixture"])
def test_random_admissions_aborts_and_chunks_match_a_no_cache_recompute(tiny, kind, pack, monkeypatch):
    members, adapters = _members(tiny, kind)
    spec = parse_composition({"name": "churn", "method": "mixture", "members": members})
    engine = Engine(build_composition(spec), max_batch=3, max_prefill_tokens=5, pack_steps=pack)
    packed = []  # packed forwards (a step's decode and prefill chunk in one)
    inner = HFMember.packed_rows
    monkeypatch.setattr(HFMember, "packed_rows", lambda self, *a: packed.append(1) or inner(self, *a))
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    rng = random.Random(0)
    waiting = []
    for i in range(20):
        ids = tok.encode(" ".join(rng.sample(TEXTS, rng.randint(1, 3))))[: rng.randint(2, 24)]
        params = SamplingParams(max_tokens=rng.randint(1, 8), temperature=0.0, ignore_eos=True)
        waiting.append(Request(ids, params, request_id=f"r{i}"))
    by_id = {r.request_id: r for r in waiting}
    tokens: dict[str, list[int]] = {r.request_id: [] for r in waiting}
    logprobs: dict[str, list[float]] = {r.request_id: [] for r in waiting}
    aborted = set()
    while waiting or engine.busy:
        if waiting and engine.free_slots and rng.random() < 0.5:
            events = engine.add([waiting.pop()])
        else:
            events = engine.step()
        for e in events:
            tokens[e.request_id].append(e.token_id)
            logprobs[e.request_id].append(e.logprob)
        live = engine.running + engine.prefilling
        if live and rng.random() < 0.1:
            victim = rng.choice(live).request_id
            aborted.add(victim)
            engine.abort(victim)
    assert engine.free_slots == 3 and not engine.busy
    for member in engine.members:
        assert member.live_slots == []
    refs = {}
    for name, adapter in adapters.items():
        model = AutoModelForCausalLM.from_pretrained(tiny["a"]).eval()
        refs[name] = PeftModel.from_pretrained(model, adapter).eval() if adapter else model
    checked = 0
    for rid, produced in tokens.items():
        if rid in aborted:
            continue
        ids = list(by_id[rid].prompt_ids)
        assert len(produced) == by_id[rid].params.max_tokens
        for token, logprob in zip(produced, logprobs[rid], strict=True):
            parts = [torch.log_softmax(ref(torch.tensor([ids])).logits[0, -1].float(), -1) for ref in refs.values()]
            mixed = torch.logsumexp(torch.stack(parts) + torch.log(torch.tensor(1.0 / len(parts))), dim=0)
            assert int(mixed.argmax()) == token
            assert abs(float(mixed[token]) - logprob) < 1e-4
            ids.append(token)
            checked += 1
    assert checked > 20 and len(aborted) >= 1
    assert (len(packed) >= 5) if pack else not packed


@torch.no_grad()
def test_the_cache_copies_no_other_row_on_admission_and_release(tiny):
    """Admission writes only the new rows; release moves at most one row; storage stays put."""
    spec = parse_composition({"name": "c", "method": "mixture", "members": [{"name": "a", "model": str(tiny["a"])}]})
    engine = Engine(build_composition(spec), max_batch=4)
    kv = engine.members[0].kv
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    engine.add([Request(tok.encode(t), params, request_id=f"r{i}") for i, t in enumerate(TEXTS[:3])])
    engine.step()
    pointer = kv.keys_[0].data_ptr()
    row_of = dict(kv.row_of)
    snapshot = {key: kv.keys_[0][row, :, : kv.length_of(key)].clone() for key, row in row_of.items()}
    engine.add([Request(tok.encode(TEXTS[3]), params, request_id="new")])  # admission
    for key, row in row_of.items():  # the old rows did not move and were not rewritten
        assert kv.row_of[key] == row
        assert torch.equal(kv.keys_[0][row, :, : snapshot[key].shape[1]], snapshot[key])
    first = engine.running[0]
    engine.abort(first.request_id)  # release: the hole is filled by the last row, the rest stay
    moved = [key for key, row in row_of.items() if key != first.slot and kv.row_of[key] != row]
    assert len(moved) <= 1
    assert kv.keys_[0].data_ptr() == pointer, "no reallocation"


@torch.no_grad()
def test_the_prefill_budget_chunks_prompts_and_zero_means_no_limit(tiny):
    spec = parse_composition({"name": "c", "method": "mixture", "members": [{"name": "a", "model": str(tiny["a"])}]})
    composition = build_composition(spec)
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    prompts = [tok.encode(TEXTS[0]), tok.encode(TEXTS[3])]  # 11+ tokens each
    unlimited = Engine(composition, max_batch=2, max_prefill_tokens=0)
    assert len(unlimited.add([Request(p, params) for p in prompts])) == 2 and not unlimited.prefilling
    chunked = Engine(composition, max_batch=2, max_prefill_tokens=4)
    assert chunked.add([Request(p, params) for p in prompts]) == [] and len(chunked.prefilling) == 2
    assert chunked.prefilling[0].prefilled == 4 and chunked.prefilling[1].prefilled == 0  # front first
    assert Engine(composition, max_batch=2).max_prefill_tokens == spec.engine.max_prefill_tokens == 256


def test_pack_steps_comes_from_the_config_and_the_argument_wins(tiny):
    body = {"name": "c", "method": "mixture", "members": [{"name": "a", "model": str(tiny["a"])}]}
    assert Engine(build_composition(parse_composition(body))).pack_steps is True
    off = build_composition(parse_composition({**body, "engine": {"pack_steps": False}}))
    assert Engine(off).pack_steps is False
    assert Engine(off, pack_steps=True).pack_steps is True
