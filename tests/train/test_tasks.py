"""Task generators, splits, the scorer, the general text and LoRA training on a tiny model."""

from __future__ import annotations

import argparse
import json
import math
import re

import pytest
import torch

from compose_serve.train import general_text, tasks
from compose_serve.train.lora import IGNORE, TrainSettings, encode_example, lr_factor, train_lora


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_generators_are_deterministic(name):
    assert tasks.heldout(name, 50) == tasks.heldout(name, 50)
    first, second = tasks.train_stream(name, seed=3), tasks.train_stream(name, seed=3)
    assert [next(first) for _ in range(100)] == [next(second) for _ in range(100)]
    other = tasks.train_stream(name, seed=4)
    assert [next(other) for _ in range(20)] != tasks.heldout(name, 20)


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_splits_are_disjoint_and_large_enough(name):
    held = tasks.heldout(name)
    assert len(held) == len({e.prompt for e in held}) == tasks.HELDOUT_SIZE >= 200
    for seed in (0, 1):
        stream = tasks.train_stream(name, seed=seed)
        train_prompts = {next(stream).prompt for _ in range(3000)}
        assert train_prompts.isdisjoint({e.prompt for e in held})
    assert all(tasks.is_heldout(name, e.prompt) for e in held)


def test_answers_are_correct_by_an_independent_reading_of_the_prompt():
    for e in tasks.heldout("add", 200):
        a, b = map(
            int,
            re.fullmatch(
                r"What is (\d{3}) \+ (\d{3})\? Reply with the number only\.", e.prompt
            ).groups(),
        )
        assert int(e.answer) == a + b
    for e in tasks.heldout("reverse", 200):
        letters = re.search(r": ([a-z](?: [a-z])+)\. Reply", e.prompt).group(1).split(" ")
        assert 4 <= len(letters) <= 6
        assert e.answer.split(" ") == letters[::-1]


def test_scorer_gives_one_for_the_answer_and_zero_for_a_wrong_one():
    add = tasks.heldout("add", 1)[0]
    assert tasks.score(add.answer, add.answer) == 1
    assert tasks.score(f"  {add.answer}.\n", add.answer) == 1  # documented normalisation
    assert tasks.score(str(int(add.answer) + 1), add.answer) == 0
    assert tasks.score(f"The answer is {add.answer}", add.answer) == 0
    rev = tasks.heldout("reverse", 1)[0]
    assert tasks.score(rev.answer.upper(), rev.answer) == 1
    assert tasks.score(rev.answer.replace(" ", ""), rev.answer) == 0
    assert tasks.accuracy([add.answer, "nope"], [add, add]) == 0.5
    with pytest.raises(ValueError):
        tasks.accuracy([add.answer], [add, add])


def test_general_text_is_deterministic_and_mean_nll_of_uniform_is_log_v(tiny):
    from transformers import AutoTokenizer

    texts = general_text.passages(8, 300)
    assert texts == general_text.passages(8, 300) and len(set(texts)) == 8
    assert all(len(t) >= 300 for t in texts)
    tok = AutoTokenizer.from_pretrained(tiny["a"])
    vocab = len(tok)

    def uniform(ids, mask):
        return torch.full((*ids.shape[:1], ids.shape[1] - 1, vocab), -math.log(vocab))

    result = general_text.mean_nll(
        uniform, general_text.token_batches(tok, texts, 3, max_tokens=40)
    )
    lengths = [min(40, len(tok.encode(t, add_special_tokens=False))) for t in texts]
    assert result.tokens == sum(n - 1 for n in lengths)
    assert result.mean == pytest.approx(math.log(vocab), rel=1e-6)
    assert result.per_text == pytest.approx([math.log(vocab)] * 8, rel=1e-6)


def test_model_nll_equals_the_models_own_loss(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["a"])
    lm = AutoModelForCausalLM.from_pretrained(tiny["a"]).eval()
    texts = general_text.passages(3, 200)
    result = general_text.mean_nll(
        general_text.model_scorer(lm), general_text.token_batches(tok, texts, 2, 30)
    )
    for text, nll in zip(texts, result.per_text, strict=True):
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)[:30]])
        with torch.no_grad():
            assert nll == pytest.approx(float(lm(input_ids=ids, labels=ids).loss), rel=1e-4)


def test_encode_example_labels_only_the_reply(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["a"])
    example = tasks.heldout("add", 1)[0]
    ids, labels = encode_example(tok, example)
    reply = [t for t in labels if t != IGNORE]
    assert labels[: len(ids) - len(reply)] == [IGNORE] * (len(ids) - len(reply))
    assert tok.decode(reply).startswith(example.answer)


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 20, 0.1) for s in range(20)]
    assert factors[0] == 0.5 and factors[1] == 1.0
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))
    assert factors[-1] < 0.01


def test_a_few_steps_lower_the_loss_and_save_a_loadable_adapter(tiny, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    settings = TrainSettings(
        task="add", model=str(tiny["a"]), steps=12, batch_size=4, lr=1e-2, seed=0
    )
    result = train_lora(settings, tmp_path / "adapter", command="test", progress=False)
    assert len(result.losses) == 12
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3
    run = json.loads((tmp_path / "adapter" / "train_run.json").read_text())
    assert run["settings"]["steps"] == 12 and run["final_loss"] == pytest.approx(result.final_loss)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(
        "lora_B" in k and v.abs().sum() > 0 for k, v in saved.items()
    )  # B starts at 0: it learned
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny["a"]), tmp_path / "adapter"
    )
    params = dict(loaded.named_parameters())
    for key, value in saved.items():
        match = [
            n for n in params if n.startswith(key.removesuffix(".weight")) and n.endswith(".weight")
        ]
        assert len(match) == 1 and torch.equal(params[match[0]].detach(), value)


def test_train_command_runs_end_to_end(tiny, tmp_path, capsys):
    from compose_serve.train.commands import add_train

    parser = argparse.ArgumentParser()
    add_train(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "train",
            "--task",
            "reverse",
            "--out",
            str(tmp_path / "rev"),
            "--model",
            str(tiny["a"]),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--rank",
            "2",
        ]
    )
    assert args.func(args) == 0
    assert "trained reverse" in capsys.readouterr().out
    config = json.loads((tmp_path / "rev" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4
