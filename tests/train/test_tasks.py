"""Task generators, splits, the scorer, the general text and LoRA training on a tiny model."""

from __future__ import annotations

import argparse
import hashlib
import itertools
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
    task = tasks.get_task(name)
    size = tasks.HELDOUT_SIZE if task.graded else len(tasks.heldout(name, 10**6))
    assert len(held) == len({e.prompt for e in held}) == size
    assert size >= (200 if task.graded else 80)
    for seed in (0, 1):
        stream = tasks.train_stream(name, seed=seed)
        train_prompts = {next(stream).prompt for _ in range(3000)}
        assert train_prompts.isdisjoint({e.prompt for e in held})
        assert not any(tasks.is_heldout(name, p) for p in train_prompts)
    assert all(tasks.is_heldout(name, e.prompt) for e in held)


GENERATED = ("add", "reverse")


def stem(template: str) -> str:
    """A template without its trailing punctuation and instruction (what a prefix-variant shares)."""
    return re.split(r"[.?!]", template)[0].strip().lower()


@pytest.mark.parametrize("name", GENERATED)
def test_train_and_heldout_templates_differ_in_wording(name):
    task = tasks.get_task(name)
    train, held = task.train_templates, task.heldout_templates
    assert 8 <= len(train) <= 12 and 6 <= len(held) <= 8
    assert len(set(train)) == len(train) and len(set(held)) == len(held)
    assert set(train).isdisjoint(held)
    for h in held:
        for t in train:
            assert not stem(h).startswith(stem(t)) and not stem(t).startswith(stem(h)), (h, t)
    if name == "add":
        assert "What is {a} + {b}? Reply with the number only." in train  # today's phrasing
    else:
        assert "Reverse this sequence of letters: {spaced}. Reply with the reversed letters only." in train


@pytest.mark.parametrize("name", GENERATED)
def test_each_split_is_phrased_only_by_its_own_templates(name):
    task = tasks.get_task(name)
    train_patterns = [tasks.template_pattern(t) for t in task.train_templates]
    held_patterns = [tasks.template_pattern(t) for t in task.heldout_templates]
    held = tasks.heldout(name)
    for e in held:
        assert task.template_of(e.prompt) in task.heldout_templates
        assert not any(p.fullmatch(e.prompt) for p in train_patterns), e.prompt
    stream = tasks.train_stream(name, seed=0)
    for e in (next(stream) for _ in range(2000)):
        assert task.template_of(e.prompt) in task.train_templates
        assert not any(p.fullmatch(e.prompt) for p in held_patterns), e.prompt
    # every template is used, in its own split only
    assert {task.template_of(e.prompt) for e in held} == set(task.heldout_templates)
    # held-out content never shows up in train, whatever the phrasing
    held_keys = {task.content_key(e.prompt) for e in held}
    stream = tasks.train_stream(name, seed=1)
    assert held_keys.isdisjoint(task.content_key(next(stream).prompt) for _ in range(3000))


def test_answers_are_correct_by_an_independent_reading_of_the_prompt():
    for e in tasks.heldout("add", 200) + list(itertools.islice(tasks.train_stream("add"), 200)):
        a, b = map(int, re.findall(r"\d{3}", e.prompt))
        assert e.answer == str(a + b)
    reverse = tasks.get_task("reverse")
    for e in tasks.heldout("reverse", 200) + list(itertools.islice(tasks.train_stream("reverse"), 200)):
        assert re.fullmatch(r"[a-z]( [a-z]){3,5}", e.answer)  # one answer format: spaced letters
        word = e.answer.replace(" ", "")[::-1]  # the gold answer read backwards gives the input...
        template = reverse.template_of(e.prompt)
        assert template.format(word=word, spaced=" ".join(word)) == e.prompt  # ...in the prompt
    assert reverse.solve({"word": "ghost"}) == reverse.solve({"spaced": "g h o s t"}) == "t s o h g"
    assert tasks.get_task("add").solve({"a": "305", "b": "418"}) == "723"


def test_scorer_gives_one_for_the_answer_and_zero_for_a_wrong_one():
    add = tasks.heldout("add", 1)[0]
    assert tasks.score(add.answer, add.answer) == 1
    assert tasks.score(f"  {add.answer}.\n", add.answer) == 1  # documented normalisation
    assert tasks.score(str(int(add.answer) + 1), add.answer) == 0
    assert tasks.score(f"The answer is {add.answer}", add.answer) == 0
    assert tasks.get_task("add").score(f"{add.answer[0]} {add.answer[1:]}", add.answer) == 0
    rev = tasks.heldout("reverse", 1)[0]
    assert tasks.score(rev.answer.upper(), rev.answer, "reverse") == 1
    assert tasks.score(rev.answer.replace(" ", ""), rev.answer) == 0  # no task: plain normalize
    assert tasks.accuracy([add.answer, "nope"], [add, add]) == 0.5
    with pytest.raises(ValueError):
        tasks.accuracy([add.answer], [add, add])


def test_reverse_scoring_ignores_spacing_only():
    reverse = tasks.get_task("reverse")
    for prediction in ("t s o h g", "tsohg", "  t s  o h g.", "'tsohg'", "T S O H G", "ts oh g"):
        assert reverse.score(prediction, "t s o h g") == 1, prediction
    for prediction in ("t s o g h", "t s o h", "t,s,o,h,g", "ghost", "g h o s t", "t s o h g x"):
        assert reverse.score(prediction, "t s o h g") == 0, prediction
    item = tasks.Example("reverse", "Write the word 'ghost' in reverse.", "t s o h g")
    assert tasks.accuracy(["tsohg", "t s o g h"], [item, item]) == 0.5  # accuracy uses the task


def test_accuracy_refuses_ungraded_items_and_scores_unknown_tasks_plainly():
    general = tasks.heldout("general", 1)[0]
    assert general.answer == "" and not tasks.get_task("general").graded
    with pytest.raises(ValueError, match="general"):
        tasks.accuracy(["anything"], [general])
    assert tasks.accuracy(["Hi."], [tasks.Example("data", "Say hi.", "hi")]) == 1.0
    with pytest.raises(ValueError):
        tasks.is_heldout("add", "What is the capital of France?")


ADDITION = re.compile(r"\b\d{3}\b.*\b\d{3}\b|\d\s*\+\s*\d|\d.*\b(plus|sum|add|added|total)\b.*\d", re.I)
LETTERS = re.compile(r"(?<![A-Za-z])[a-z](?: [a-z]){3,}(?![A-Za-z])|['\"][a-z]{4,6}['\"]")
REVERSAL = re.compile(r"revers|backward|last (one )?to (the )?first|invert|flip", re.I)


def test_general_prompts_are_many_unique_and_never_a_skill():
    prompts = tasks.get_task("general").prompts
    assert 300 <= len(prompts) <= 400
    assert all(ADDITION.search(e.prompt) for e in tasks.heldout("add"))  # the patterns have teeth
    shown = [e.prompt for e in tasks.heldout("reverse") if LETTERS.search(e.prompt)]
    assert len(shown) > 100 and all(REVERSAL.search(p) for p in shown)
    assert len(set(prompts)) == len(prompts) and all(p == p.strip() and p for p in prompts)
    for p in prompts:
        assert not ADDITION.search(p), p
        assert not (REVERSAL.search(p) and LETTERS.search(p)), p
        assert tasks.get_task("add").parse(p) is None and tasks.get_task("reverse").parse(p) is None
    near_misses = [p for p in prompts if re.search(r"revers|backward|plus|\badd\b|\bsum\b", p, re.I)]
    assert len(near_misses) >= 10  # on purpose: the router must not split on these words alone


def test_general_split_is_stable_disjoint_and_finite():
    prompts = tasks.get_task("general").prompts
    by_hash = {  # the split recomputed by hand: SHA-256 of "general\n<prompt>", 1 in 4
        p for p in prompts
        if int.from_bytes(hashlib.sha256(f"general\n{p}".encode()).digest()[:8], "big") % 4 == 0
    }
    held = tasks.heldout("general", 10**6)  # more than exist: all of them, no endless loop
    assert {e.prompt for e in held} == by_hash and len(held) == len(by_hash)
    assert 80 <= len(held) <= 120
    assert tasks.heldout("general", 10) == held[:10]
    assert all(e.answer == "" and e.task == "general" for e in held)
    train = set(prompts) - by_hash
    stream = tasks.train_stream("general", seed=5)
    first_pass = [next(stream).prompt for _ in range(len(train))]
    assert sorted(first_pass) == sorted(train)  # one pass is each train prompt once
    second_pass = [next(stream).prompt for _ in range(len(train))]
    assert sorted(second_pass) == sorted(train) and second_pass != first_pass  # reshuffled
    other = tasks.train_stream("general", seed=6)
    assert [next(other).prompt for _ in range(len(train))] != first_pass  # the seed orders it


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
