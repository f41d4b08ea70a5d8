"""The per-step prompt budget from measured step costs (``engine/pacing.py``).

The pacer is fed step times of a known linear cost (t = t_decode + c * prompt tokens) and its budget
is checked against ``slowdown * t_decode / c`` worked out by hand; in the engine, the chunk a step
carries next to a running sequence is the pacer's budget, and greedy tokens equal transformers'
own greedy decoding of each prompt (chunking never changes what is generated).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compose_serve.composition import build_composition
from compose_serve.config import parse_composition
from compose_serve.engine import Engine, Request
from compose_serve.engine.pacing import StepPacer
from compose_serve.errors import ConfigError
from compose_serve.sampling import SamplingParams


def _feed(pacer: StepPacer, t_decode: float, c: float, chunks: list[int]) -> None:
    for _ in range(3):
        pacer.record(t_decode, 0)
    for n in chunks:
        pacer.record(t_decode + c * n, n)


def test_budget_is_slowdown_times_decode_step_over_token_cost():
    pacer = StepPacer(slowdown=0.5, cap=256, probe=32)
    assert pacer.budget(running=True) == 32  # nothing measured yet: the probe
    _feed(pacer, t_decode=0.100, c=0.002, chunks=[32])
    assert pacer.t_decode == pytest.approx(0.100)
    assert pacer.c_token == pytest.approx(0.002)
    assert pacer.budget(running=True) == 25  # 0.5 * 0.100 / 0.002
    assert pacer.budget(running=False) == 256  # nobody waits: the cap
    _feed(pacer, t_decode=0.100, c=0.002, chunks=[25, 25, 25])
    assert pacer.budget(running=True) == 25  # the same cost, the same budget


def test_budget_is_capped_floored_and_grows_at_most_twofold():
    cheap = StepPacer(slowdown=0.5, cap=256, probe=32)  # a GPU-like cost: a token costs ~nothing
    _feed(cheap, t_decode=0.010, c=1e-6, chunks=[32])
    assert cheap.budget(running=True) == 64  # 5,000 by the estimate, but twice the last chunk
    _feed(cheap, t_decode=0.010, c=1e-6, chunks=[64, 128])
    assert cheap.budget(running=True) == 256  # the cap
    dear = StepPacer(slowdown=0.5, cap=256, probe=32, floor=8)
    _feed(dear, t_decode=0.100, c=0.1, chunks=[32])
    assert dear.budget(running=True) == 8  # 0.5 by the estimate: the floor keeps prompts moving
    small_cap = StepPacer(slowdown=0.5, cap=16)
    _feed(small_cap, t_decode=0.100, c=0.002, chunks=[16])
    assert small_cap.budget(running=True) == 16


def test_no_slowdown_means_the_fixed_cap_and_zero_cap_means_no_limit():
    fixed = StepPacer(slowdown=None, cap=64)
    _feed(fixed, t_decode=0.100, c=0.01, chunks=[64])
    assert fixed.budget(running=True) == 64
    assert StepPacer(slowdown=0.5, cap=0).budget(running=False) == math.inf
    with pytest.raises(ValueError, match="slowdown"):
        StepPacer(slowdown=0.0, cap=64)


def test_the_config_field_defaults_to_a_fixed_budget_and_is_checked():
    body = {"name": "c", "method": "mixture", "members": [{"name": "a", "model": "m"}]}
    assert parse_composition(body).engine.prefill_slowdown is None
    assert parse_composition({**body, "engine": {"prefill_slowdown": 0.5}}).engine.prefill_slowdown == 0.5
    with pytest.raises(ConfigError, match="prefill_slowdown"):
        parse_composition({**body, "engine": {"prefill_slowdown": 0}})


@torch.no_grad()
@pytest.mark.parametrize("pack", [True, False], ids=["packed", "two_forwards"])
def test_a_step_next_to_a_running_sequence_carries_the_paced_chunk(tiny, pack):
    spec = parse_composition({"name": "c", "method": "mixture", "members": [{"name": "a", "model": str(tiny["a"])}],
                              "engine": {"prefill_slowdown": 0.5}})
    engine = Engine(build_composition(spec), max_batch=2, max_prefill_tokens=64, pack_steps=pack)
    assert engine.pacer.slowdown == 0.5
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    short = tok.encode("2 + 2 = 4.")
    long = tok.encode("The quick brown fox jumps over the lazy dog. " * 3)
    assert len(long) > 20
    events = engine.add([Request(short, params, request_id="short")])  # nothing runs: no pacing
    assert [e.request_id for e in events] == ["short"]
    engine.pacer.t_decode, engine.pacer._extra, engine.pacer._tokens = 0.1, 0.02, 4.0  # c = 5 ms/token
    assert engine.pacer.budget(running=True) == 10  # 0.5 * 0.1 / 0.005
    out = {"short": [events[0].token_id], "long": []}
    engine.add([Request(long, params, request_id="long")])
    seq = next(s for s in engine.prefilling + engine.running if s.request_id == "long")
    engine.pacer.record = lambda *a: None  # keep the hand-set estimates
    before = seq.prefilled  # two forwards: add prefilled a first chunk already, paced too
    assert before == (0 if pack else 10)
    for event in engine.step():
        out[event.request_id].append(event.token_id)
    assert seq.prefilled - before == 10  # the paced chunk, not the cap of 64
    while engine.busy:
        for event in engine.step():
            out[event.request_id].append(event.token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny["a"]).eval()
    for name, ids in (("short", short), ("long", long)):
        want = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, min_new_tokens=6)
        assert out[name] == want[0, len(ids):].tolist(), name
