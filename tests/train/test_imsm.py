"""IMSM training on a tiny model: the loss falls, and what is saved serves the same tokens."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from compose_serve.composition import build_composition
from compose_serve.config import load_composition, parse_composition
from compose_serve.engine import Engine, Request
from compose_serve.members.hf import load_causal_lm, load_tokenizer
from compose_serve.members.shared import SharedBase
from compose_serve.members.siamese import SiameseMember
from compose_serve.sampling import SamplingParams
from compose_serve.train.imsm import (
    ImsmSettings,
    fit_imsm,
    imsm_loss,
    make_models,
    prompt_means,
    save_imsm,
)
from compose_serve.train.lora import collate, encode_example
from compose_serve.train.tasks import heldout


def _setup(tiny, gate="vector"):
    settings = ImsmSettings(
        task="add",
        model=str(tiny["a"]),
        steps=12,
        batch_size=4,
        lr=1e-2,
        gate_lr=1e-2,
        gate=gate,
        seed=0,
    )
    torch.manual_seed(0)
    tokenizer = load_tokenizer(settings.model)
    model, g = make_models(
        load_causal_lm(settings.model, torch.float32, torch.device("cpu")), settings
    )
    batch = collate(
        [encode_example(tokenizer, e) for e in heldout("add", 6)], tokenizer.pad_token_id
    )
    return settings, tokenizer, model, g, batch


def test_prompt_means_cover_only_the_prompt():
    hidden = torch.arange(12.0).view(1, 4, 3)
    prompt = torch.tensor([[True, True, False, False]])
    torch.testing.assert_close(prompt_means(hidden, prompt), hidden[:, :2].mean(1, keepdim=True))


@pytest.mark.parametrize("gate", ["vector", "no_query", "none"])
def test_training_lowers_the_loss_on_held_out_items(tiny, gate):
    settings, tokenizer, model, g, batch = _setup(tiny, gate)
    model.eval()
    with torch.no_grad():
        before = imsm_loss(model, g.eval() if g is not None else None, **batch).item()
    result = fit_imsm(model, g, tokenizer, settings, progress=False)
    with torch.no_grad():
        after = imsm_loss(model, g, **batch).item()
    assert len(result.losses) == 12 and after < before


def test_saved_adapter_and_gate_serve_the_same_tokens(tiny, tmp_path):
    settings, tokenizer, model, gate, _ = _setup(tiny)
    result = fit_imsm(model, gate, tokenizer, settings, progress=False)
    path = save_imsm(model, gate, settings, result, tmp_path, "test")
    state = load_file(str(tmp_path / "gate" / "gate.safetensors"))
    d = model.get_base_model().config.hidden_size
    assert state["proj_a.weight"].shape == (8, 4 * d) and state["proj_b.weight"].shape == (d, 8)
    assert (
        json.loads((tmp_path / "train_run.json").read_text())["trainable_parameters"]["gate"]
        == 5 * d * 8
    )

    prompt = list(
        tokenizer.apply_chat_template(
            heldout("add", 1)[0].messages(),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
    )
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=1)
    spec = load_composition(path)
    in_memory = build_composition(
        spec, members=[SiameseMember(spec.members[0].name, SharedBase(model, tokenizer), "default", gate)]
    )
    before = Engine(in_memory, max_batch=1).generate([Request(prompt, params)])[0]
    reloaded = build_composition(parse_composition(spec.model_dump(mode="json")))
    after = Engine(reloaded, max_batch=1).generate([Request(prompt, params)])[0]
    assert after.token_ids == before.token_ids
    torch.testing.assert_close(
        torch.tensor(after.logprobs), torch.tensor(before.logprobs), atol=1e-5, rtol=0
    )
