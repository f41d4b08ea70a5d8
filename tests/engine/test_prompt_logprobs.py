"""Prompt log-probs (``SamplingParams.prompt_logprobs``) against the formulas written out by hand.

The reference for every prompt token is computed here from each member's own transformers forward
(``model(input_ids).logits``, float64 ``log_softmax``; PEFT for the LoRA members) and the method's
formula by hand: the mixture ``log sum_k w_k softmax(z_k)``, the logit mixture
``log_softmax(sum_k w_k z_k)``, PackLLM's weights ``softmax(-NLL_k(prompt) / tau)``. Nothing here
calls the project's fusion.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compose_serve.composition import build_composition
from compose_serve.config import parse_composition
from compose_serve.engine import Engine, Request
from compose_serve.engine.scheduler import AsyncEngine
from compose_serve.sampling import SamplingParams

from .test_routing import NAMES, _hand_probs, _router, _spec

PROMPTS = ["The quick brown fox jumps over", "2 + 2 = 4. 12 *", "def add(a, b):\n    return a", "x"]
ATOL = 1e-4


@pytest.fixture(scope="module")
def tok(tiny):
    return AutoTokenizer.from_pretrained(tiny["tokenizer"])


@pytest.fixture(scope="module")
def member_logits(tiny):
    """``(model key, adapter key or None, ids) -> logits [L, V]`` float64 from transformers."""
    cache: dict = {}
    models: dict = {}

    def run(key: str, ids: list[int], adapter: str | None = None) -> torch.Tensor:
        if (key, adapter) not in models:
            model = AutoModelForCausalLM.from_pretrained(tiny[key])
            if adapter is not None:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, tiny[adapter])
            models[key, adapter] = model.eval()
        if (key, adapter, tuple(ids)) not in cache:
            with torch.no_grad():
                logits = models[key, adapter](torch.tensor([ids])).logits[0]
            cache[key, adapter, tuple(ids)] = logits.double()
        return cache[key, adapter, tuple(ids)]

    return run


def _engine(members, method="mixture", max_batch=4, **extra) -> Engine:
    spec = parse_composition({"name": "t", "method": method, "members": members, **extra})
    return Engine(build_composition(spec), max_batch=max_batch)


def _mixture_by_hand(logprobs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``log sum_k w_k p_k`` over float64 ``[L, V]`` member log-probs (members at weight 0 out)."""
    total = sum(w * lp.exp() for w, lp in zip(weights, logprobs, strict=True) if w > 0)
    return torch.log(total)


def _check(entries, ids: list[int], want: torch.Tensor, top_n: int) -> None:
    """``entries`` (the engine's) against ``want [L, V]`` (position t scores token t+1)."""
    assert len(entries) == len(ids)
    assert entries[0] is None
    for t in range(1, len(ids)):
        entry, row = entries[t], want[t - 1]
        assert entry.token_id == ids[t]
        target = float(row[ids[t]])
        assert entry.logprob == pytest.approx(target, abs=ATOL)
        # rank: 1 + the tokens more likely (a near-tie within float32 error may go either way)
        assert (
            int((row > target + 1e-5).sum()) + 1
            <= entry.rank
            <= int((row > target - 1e-5).sum()) + 1
        )
        assert len(entry.top) == top_n
        best = row.topk(top_n).values.tolist() if top_n else []
        assert [lp for _, lp in entry.top] == pytest.approx(best, abs=ATOL)
        for token, lp in entry.top:
            assert lp == pytest.approx(float(row[token]), abs=ATOL)


@pytest.mark.parametrize("max_prefill_tokens", [None, 4])
def test_mixture_prompt_logprobs_equal_the_mixture_by_hand_in_one_batch(
    tiny, tok, member_logits, max_prefill_tokens
):
    """Four prompts of different lengths admitted in one ``add`` (two of them with max_tokens 0,
    one a single token); with a prefill budget of 4 tokens the long prompts end in later steps."""
    weights = [0.3, 0.7]
    engine = _engine(
        [
            {"name": "a", "model": str(tiny["a"]), "weight": weights[0]},
            {"name": "b", "model": str(tiny["b"]), "weight": weights[1]},
        ],
        engine={"max_prefill_tokens": max_prefill_tokens or 0},
    )
    prompts = [tok.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts) and len(prompts[-1]) == 1
    tops, max_tokens = [3, 0, 5, 2], [3, 0, 1, 0]
    requests = [
        Request(
            ids, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, prompt_logprobs=n)
        )
        for ids, n, m in zip(prompts, tops, max_tokens, strict=True)
    ]
    outs = engine.generate(requests)
    for ids, n, m, out in zip(prompts, tops, max_tokens, outs, strict=True):
        logprobs = [torch.log_softmax(member_logits(k, ids), dim=-1) for k in "ab"]
        _check(out.prompt_logprobs, ids, _mixture_by_hand(logprobs, weights), n)
        assert len(out.token_ids) == m and out.finish_reason == "length"
    assert engine.free_slots == 4 and not engine.busy


def test_logit_mix_prompt_logprobs_equal_the_product_of_experts_by_hand(tiny, tok, member_logits):
    weights = [0.6, 0.4]
    engine = _engine(
        [
            {"name": "a", "model": str(tiny["a"]), "weight": weights[0]},
            {"name": "b", "model": str(tiny["b"]), "weight": weights[1]},
        ],
        method="logit_mix",
    )
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    outs = engine.generate(
        [Request(ids, SamplingParams(max_tokens=1, prompt_logprobs=4)) for ids in prompts]
    )
    for ids, out in zip(prompts, outs, strict=True):
        raw = weights[0] * member_logits("a", ids) + weights[1] * member_logits("b", ids)
        _check(out.prompt_logprobs, ids, torch.log_softmax(raw, dim=-1), 4)


def test_a_member_served_alone_scores_with_its_own_distribution(tiny, tok, member_logits):
    engine = _engine(
        [{"name": "a", "model": str(tiny["a"])}, {"name": "b", "model": str(tiny["b"])}]
    )
    ids = tok.encode(PROMPTS[0])
    out = engine.generate(
        [Request(ids, SamplingParams(max_tokens=0, prompt_logprobs=2), {"weights": {"b": 1.0}})]
    )[0]
    _check(out.prompt_logprobs, ids, torch.log_softmax(member_logits("b", ids), dim=-1), 2)


def test_routed_top2_scores_with_the_routers_members_and_weights(
    tiny, tok, member_logits, tmp_path
):
    """The router's top-2 members (weights renormalised) by hand; the LoRA members through PEFT."""
    torch.manual_seed(0)
    weight, bias = torch.randn(3, 64) * 2.0, torch.zeros(3)
    engine = Engine(
        build_composition(_spec(tiny, _router(tmp_path, weight, bias), top_k=2)), max_batch=4
    )
    adapters = {"general": None, "one": "lora_a", "two": "lora_a2"}
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    outs = engine.generate(
        [
            Request(ids, SamplingParams(max_tokens=m, prompt_logprobs=1))
            for ids, m in zip(prompts, [0, 2, 1], strict=True)
        ]
    )
    for ids, out in zip(prompts, outs, strict=True):
        probs = torch.tensor(_hand_probs(tiny, ids, weight, bias))
        keep = probs.topk(2).indices.tolist()
        weights = [float(probs[k] / probs[keep].sum()) if k in keep else 0.0 for k in range(3)]
        logprobs = [
            torch.log_softmax(member_logits("a", ids, adapters[name]), dim=-1) for name in NAMES
        ]
        _check(out.prompt_logprobs, ids, _mixture_by_hand(logprobs, weights), 1)


@pytest.mark.parametrize("max_tokens", [0, 2])
def test_packllm_weights_come_from_the_prompts_nll(tiny, tok, member_logits, max_tokens):
    """``weights: prompt_perplexity``: with max_tokens 0 from the scoring forward itself, else from
    the prefill; both are ``softmax(-NLL_k / tau)`` by hand."""
    tau = 0.5
    engine = _engine(
        [{"name": "a", "model": str(tiny["a"])}, {"name": "b", "model": str(tiny["b"])}],
        params={"weights": "prompt_perplexity", "tau": tau},
    )
    ids = tok.encode(PROMPTS[2])
    out = engine.generate([Request(ids, SamplingParams(max_tokens=max_tokens, prompt_logprobs=2))])[
        0
    ]
    logprobs = [torch.log_softmax(member_logits(k, ids), dim=-1) for k in "ab"]
    target = torch.tensor(ids[1:])
    nll = torch.stack([-lp[:-1].gather(1, target[:, None]).mean() for lp in logprobs])
    weights = torch.softmax(-nll / tau, dim=0).tolist()
    _check(out.prompt_logprobs, ids, _mixture_by_hand(logprobs, weights), 2)


def test_prompt_logprobs_leave_the_generated_tokens_alone_and_ride_on_the_first_event(tiny, tok):
    engine = _engine(
        [{"name": "a", "model": str(tiny["a"])}, {"name": "b", "model": str(tiny["b"])}]
    )
    ids = tok.encode(PROMPTS[0])
    plain = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=2)
    events = []
    scored = engine.generate(
        [
            Request(
                ids,
                SamplingParams(
                    max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=0
                ),
            )
        ],
        on_event=events.append,
    )[0]
    alone = engine.generate([Request(ids, plain)])[0]
    assert scored.token_ids == alone.token_ids
    assert scored.logprobs == pytest.approx(alone.logprobs, abs=1e-6)
    assert alone.prompt_logprobs is None
    assert [e.prompt_logprobs is not None for e in events] == [True, False, False, False, False]
    assert all(e.top == [] for e in scored.prompt_logprobs[1:])


def test_max_tokens_zero_finishes_at_admission_with_no_token(tiny, tok):
    engine = _engine(
        [{"name": "a", "model": str(tiny["a"])}, {"name": "b", "model": str(tiny["b"])}],
        max_batch=2,
    )
    ids = tok.encode(PROMPTS[1])
    running = Request(tok.encode(PROMPTS[0]), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add([running])
    events = engine.add([Request(ids, SamplingParams(max_tokens=0, prompt_logprobs=1))])
    assert len(events) == 1
    event = events[0]
    assert (event.token_id, event.logprob, event.text, event.finish_reason) == (
        None,
        None,
        "",
        "length",
    )
    assert not event.generated and len(event.prompt_logprobs) == len(ids)
    assert set(event.diagnostics["weights"]) == {"a", "b"}
    assert engine.free_slots == 1 and [s.request_id for s in engine.running] == [running.request_id]
    assert not any(len(m.live_slots) > 1 for m in engine.members)  # nothing was prefilled for it


def test_max_tokens_zero_through_the_scheduler_counts_no_output_token(tiny, tok):
    composition = build_composition(
        parse_composition(
            {"name": "t", "method": "mixture", "members": [{"name": "a", "model": str(tiny["a"])}]}
        )
    )
    engine = AsyncEngine(Engine(composition, max_batch=2))

    async def run():
        stream = engine.submit(
            Request(tok.encode(PROMPTS[0]), SamplingParams(max_tokens=0, prompt_logprobs=0))
        )
        return [e async for e in stream], stream.record

    try:
        events, record = asyncio.run(run())
    finally:
        engine.close(timeout=30)
    assert len(events) == 1 and events[0].token_id is None and events[0].finish_reason == "length"
    assert record.output_tokens == 0 and record.finish_reason == "length"
