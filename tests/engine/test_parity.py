"""Every method against ALGORITHMS.md evaluated by hand from each member's own no-cache forward.

At every step of a 20-token greedy generation, for several prompts of different lengths admitted
into fewer slots than prompts (so sequences join and leave the batch), the engine's fused log-probs
(the chosen token and the top 20) must equal the formula computed independently (atol 1e-4).
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from compose_serve.composition import build_composition
from compose_serve.config import parse_composition
from compose_serve.engine import Engine, Request
from compose_serve.sampling import SamplingParams

PROMPTS = ["The quick brown", "Compose models at decoding time", "2 +", "def add(a, b):\n", "Una"]
STEPS = 20


def _load(path, adapter=None):
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval() if adapter else model


@torch.no_grad()
def _final_hidden(model, ids):
    """Final hidden state after the last norm, last position: ``[d]``, full recompute, no cache."""
    return model.get_decoder()(torch.tensor([ids])).last_hidden_state[0, -1]


@torch.no_grad()
def _logits(model, ids):
    return model(torch.tensor([ids])).logits[0, -1].float()


def _run(tiny, config, reference, max_batch=2, extra=None, max_prefill_tokens=None):
    """Generate greedily with the engine; at each step compare with ``reference(ids, n_prompt) -> [V]``.
    A small ``max_prefill_tokens`` chunks the prompts, so the later ones are prefilled in the same
    (packed) forwards as the earlier ones' decode steps."""
    spec = parse_composition(config)
    engine = Engine(build_composition(spec), max_batch=max_batch, max_prefill_tokens=max_prefill_tokens)
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, logprobs=20)
    requests = [Request(tok.encode(p), params, composition=extra) for p in PROMPTS]
    outs = engine.generate(requests)
    worst = 0.0
    for request, out in zip(requests, outs, strict=True):
        assert len(out.token_ids) == STEPS
        ids = list(request.prompt_ids)
        for step, token in enumerate(out.token_ids):
            ref = reference(ids, len(request.prompt_ids))  # [V] normalised log-probs
            assert int(ref.argmax()) == token, f"step {step}: engine chose {token}, formula {int(ref.argmax())}"
            worst = max(worst, abs(float(ref[token].detach()) - out.logprobs[step]))
            top_ids = [t for t, _ in out.top_logprobs[step]]
            top_lps = torch.tensor([lp for _, lp in out.top_logprobs[step]])
            torch.testing.assert_close(top_lps, ref[top_ids], atol=1e-4, rtol=0)
            torch.testing.assert_close(top_lps, ref.topk(20).values, atol=1e-4, rtol=0)
            ids.append(token)
    assert worst < 1e-4
    return engine, outs


def _member(name, path, **kw):
    return {"name": name, "model": str(path), **kw}


def test_mixture_fixed_weights_and_temperatures(tiny):
    a, b = _load(tiny["a"]), _load(tiny["b"])
    w, t = (0.3, 0.7), (1.0, 0.5)

    def reference(ids, n_prompt):
        za, zb = _logits(a, ids), _logits(b, ids)
        pa, pb = torch.softmax(za / t[0], -1), torch.softmax(zb / t[1], -1)
        return torch.log(w[0] * pa + w[1] * pb)  # the plain form, evaluated in float32

    config = {"name": "mix", "method": "mixture",
              "members": [_member("a", tiny["a"], weight=w[0], temperature=t[0]),
                          _member("b", tiny["b"], weight=w[1], temperature=t[1])]}
    _, outs = _run(tiny, config, reference)
    assert outs[0].diagnostics[0]["weights"] == pytest.approx({"a": 0.3, "b": 0.7})


def test_mixture_per_request_weights_override(tiny):
    a, b = _load(tiny["a"]), _load(tiny["b"])

    def reference(ids, n_prompt):  # member c has weight 0 in the request: it must not change anything
        return torch.log(0.25 * torch.softmax(_logits(a, ids), -1) + 0.75 * torch.softmax(_logits(b, ids), -1))

    config = {"name": "mix3", "method": "mixture",
              "members": [_member("a", tiny["a"]), _member("b", tiny["b"]), _member("c", tiny["c"])]}
    engine, _ = _run(tiny, config, reference, extra={"weights": {"a": 0.25, "b": 0.75}})
    assert engine.members[2].live_slots == []  # the zero-weight member never ran


def test_mixture_entropy_weights(tiny):
    a, b = _load(tiny["a"]), _load(tiny["b"])
    tau = 0.5

    def reference(ids, n_prompt):
        ps = [torch.softmax(_logits(m, ids), -1) for m in (a, b)]
        h = torch.stack([-(p * torch.log(p)).sum() for p in ps])
        w = torch.exp(-h / tau) / torch.exp(-h / tau).sum()
        return torch.log(w[0] * ps[0] + w[1] * ps[1])

    config = {"name": "ent", "method": "mixture", "params": {"weights": "entropy", "tau": tau},
              "members": [_member("a", tiny["a"]), _member("b", tiny["b"])]}
    _, outs = _run(tiny, config, reference)
    w = outs[0].diagnostics[3]["weights"]
    assert w["a"] + w["b"] == pytest.approx(1.0) and w["a"] != pytest.approx(0.5)


def _prompt_nll(model, ids):
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    return float(-logprobs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).mean()) if len(ids) > 1 else 0.0


@pytest.mark.parametrize("method, budget", [("mixture", None), ("logit_mix", None), ("mixture", 3)])
def test_prompt_perplexity_weights(tiny, method, budget):
    a, b = _load(tiny["a"]), _load(tiny["b"])
    tau = 2.0

    def reference(ids, n_prompt):
        prompt = ids[:n_prompt]
        w = torch.softmax(-torch.tensor([_prompt_nll(a, prompt), _prompt_nll(b, prompt)]) / tau, -1)
        za, zb = _logits(a, ids), _logits(b, ids)
        if method == "mixture":
            return torch.log(w[0] * torch.softmax(za, -1) + w[1] * torch.softmax(zb, -1))
        return torch.log_softmax(w[0] * za + w[1] * zb, -1)

    config = {"name": "pp", "method": method, "params": {"weights": "prompt_perplexity", "tau": tau},
              "members": [_member("a", tiny["a"]), _member("b", tiny["b"])]}
    _run(tiny, config, reference, max_prefill_tokens=budget)


def test_logit_mix_fixed(tiny):
    a, b = _load(tiny["a"]), _load(tiny["b"])

    def reference(ids, n_prompt):
        return torch.log_softmax(0.6 * _logits(a, ids) + 0.4 * _logits(b, ids), -1)

    config = {"name": "poe", "method": "logit_mix",
              "members": [_member("a", tiny["a"], weight=0.6), _member("b", tiny["b"], weight=0.4)]}
    _run(tiny, config, reference)


def test_delta_proxy_tuning(tiny):
    base, expert, anti = _load(tiny["c"]), _load(tiny["a"], tiny["lora_a"]), _load(tiny["a"])
    alpha = 0.8

    def reference(ids, n_prompt):
        z = _logits(base, ids) + alpha * (_logits(expert, ids) - _logits(anti, ids))
        return torch.log_softmax(z, -1)

    config = {"name": "proxy", "method": "delta", "params": {"alpha": alpha},
              "members": [_member("base", tiny["c"]), _member("expert", tiny["a"], adapter=str(tiny["lora_a"])),
                          _member("antiexpert", tiny["a"])]}
    _run(tiny, config, reference)


def test_delta_eft_in_logprob_space_with_request_alpha(tiny):
    base, expert, anti = _load(tiny["c"]), _load(tiny["a"]), _load(tiny["b"])

    def reference(ids, n_prompt):
        lp = [torch.log_softmax(_logits(m, ids), -1) for m in (base, expert, anti)]
        return torch.log_softmax(lp[0] + 1.5 * (lp[1] - lp[2]), -1)

    config = {"name": "eft", "method": "delta", "params": {"alpha": 0.2, "space": "logprobs"},
              "members": [_member("small", tiny["c"], role="base"), _member("e", tiny["a"], role="expert"),
                          _member("x", tiny["b"], role="antiexpert")]}
    _run(tiny, config, reference, extra={"alpha": 1.5})


def test_delta_contrastive_with_plausibility(tiny):
    expert, amateur = _load(tiny["a"]), _load(tiny["b"])
    beta, plaus = 0.5, 0.1

    def reference(ids, n_prompt):
        ze, za = _logits(expert, ids), _logits(amateur, ids)
        pe = torch.softmax(ze, -1)
        score = (1 + beta) * ze - beta * za
        score[pe < plaus * pe.max()] = -math.inf
        return torch.log_softmax(score, -1)

    config = {"name": "cd", "method": "delta", "params": {"alpha": beta, "plausibility": plaus},
              "members": [_member("expert", tiny["a"]), _member("antiexpert", tiny["b"])]}
    _, outs = _run(tiny, config, reference)
    assert all(lp == -math.inf or lp > -50 for step in outs[0].top_logprobs for _, lp in step)


def _write_gate(path, d, rank=8, use_query=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = (4 if use_query else 2) * d
    state = {"proj_a.weight": torch.randn(rank, width, generator=g) * 0.2,
             "proj_b.weight": torch.randn(d, rank, generator=g) * 0.5}
    save_file(state, str(path))
    return state


@pytest.mark.parametrize("use_query, budget", [(True, None), (False, None), (True, 3)])
def test_interweave_trained_gate(tiny, tmp_path, use_query, budget):
    base, adapted = _load(tiny["a"]), _load(tiny["a"], tiny["lora_a"])
    d = base.config.hidden_size
    state = _write_gate(tmp_path / "gate.safetensors", d, use_query=use_query)

    def reference(ids, n_prompt):
        prompt = torch.tensor([ids[:n_prompt]])
        with torch.no_grad():  # the query summaries: means over every prompt token
            hq_base = base.get_decoder()(prompt).last_hidden_state[0].mean(0)
            hq_adapted = adapted.get_decoder()(prompt).last_hidden_state[0].mean(0)
        hb, ha = _final_hidden(base, ids), _final_hidden(adapted, ids)
        parts = [hq_base, hb, ha, hq_adapted] if use_query else [hb, ha]
        g = torch.sigmoid(torch.cat(parts) @ state["proj_a.weight"].T @ state["proj_b.weight"].T)
        h = g * hb + (1 - g) * ha
        with torch.no_grad():
            return torch.log_softmax(base.lm_head(h).float(), -1)

    config = {"name": "imsm", "method": "interweave", "params": {"gate": str(tmp_path / "gate.safetensors")},
              "members": [_member("pair", tiny["a"], adapter=str(tiny["lora_a"]))]}
    _, outs = _run(tiny, config, reference, max_prefill_tokens=budget)
    gate_mean = outs[0].diagnostics[0]["gate_mean"]["pair"]
    assert 0.0 < gate_mean < 1.0


@pytest.mark.parametrize("g, which", [(1.0, "base"), (0.0, "adapted"), (0.3, "mix")])
def test_interweave_scalar_gate(tiny, g, which):
    base, adapted = _load(tiny["a"]), _load(tiny["a"], tiny["lora_a"])

    def reference(ids, n_prompt):
        z = g * _logits(base, ids) + (1 - g) * _logits(adapted, ids)  # scalar gate = logit interpolation
        return torch.log_softmax(z, -1)

    config = {"name": "pair", "method": "interweave", "params": {"scalar": g},
              "members": [_member("pair", tiny["a"], adapter=str(tiny["lora_a"]))]}
    _run(tiny, config, reference)
