"""Fitting a router on the tiny model, and ``compose-serve fit-router`` end to end."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from compose_serve.cli import main
from compose_serve.errors import ConfigError
from compose_serve.members.hf import load_causal_lm, load_tokenizer
from compose_serve.router import Router
from compose_serve.train.router import fit_router

WORDS = ["fox", "dog", "lazy", "brown", "quick", "model", "token", "weights", "member", "scores", "merge", "time"]


def number_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.randint(10, 999)} + {rng.randint(10, 999)} * {rng.randint(1, 99)} = ?" for _ in range(n)]


def word_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_lm(tiny):
    return load_causal_lm(str(tiny["a"]), torch.float32, torch.device("cpu")), load_tokenizer(str(tiny["a"]))


def test_fit_separates_numbers_from_words(tiny_lm):
    lm, tok = tiny_lm
    examples = {"numbers": number_prompts(60, 0), "words": word_prompts(60, 1)}
    router, report = fit_router(lm, tok, examples, layer=1, progress=False)
    held = sum(report["heldout_size"].values())
    assert held >= 10 and min(report["heldout_size"].values()) >= 3  # the 1-in-5 hash split held some out
    assert sum(report["train_size"].values()) + held == 120
    assert report["heldout_accuracy"] >= 0.9  # chance is 0.5
    assert sum(map(sum, report["confusion"])) == held
    assert [sum(row) for row in report["confusion"]] == [report["heldout_size"][n] for n in ("numbers", "words")]
    assert router.member_names == ["numbers", "words"] and router.layer == 1 and router.hidden_size == 64
    # the router routes unseen prompts through the same path
    features = torch.stack([router.probs(router_features(lm, tok, router, p))[0] for p in ("12 + 34 = ?",
                                                                                           "lazy brown dog")])
    assert features.argmax(-1).tolist() == [0, 1]


def router_features(lm, tok, router, prompt):
    from compose_serve.router import layer_features
    from compose_serve.train.router import render

    ids = torch.tensor([render(tok, prompt)])
    return layer_features(lm.get_decoder(), ids, torch.ones_like(ids), router.layer, router.pooling)


def test_sweep_chooses_on_validation_and_given_heldout_is_used(tiny_lm):
    lm, tok = tiny_lm
    examples = {"numbers": number_prompts(50, 2), "words": word_prompts(50, 3)}
    given = {"numbers": number_prompts(7, 100), "words": word_prompts(9, 101)}
    router, report = fit_router(lm, tok, examples, layers=[1, 2], heldout_examples=given, progress=False)
    assert report["heldout_size"] == {"numbers": 7, "words": 9}
    assert report["train_size"] == {"numbers": 50, "words": 50}  # given held-out: every example trains
    assert set(report["layer_sweep"]) == {"1", "2"} and router.layer == report["layer"] in (1, 2)
    assert report["layer_sweep"][str(router.layer)] == max(report["layer_sweep"].values())


def test_fit_rejects_a_layer_outside_the_model(tiny_lm):
    lm, tok = tiny_lm
    with pytest.raises(ConfigError) as info:
        fit_router(lm, tok, {"numbers": number_prompts(10, 0), "words": word_prompts(10, 1)}, layer=3,
                   progress=False)
    assert info.value.param == "layer" and "1..2" in info.value.message


def test_features_of_a_peft_model_are_the_bare_base(tiny, tiny_lm):
    from compose_serve.members.hf import attach_adapter
    from compose_serve.train.router import prompt_features

    lm, tok = tiny_lm
    prompts = ["12 + 34 = ?", "lazy brown dog jumps"]
    base = prompt_features(lm, tok, prompts, [2], "mean", progress=False)[2]
    peft = attach_adapter(load_causal_lm(str(tiny["a"]), torch.float32, torch.device("cpu")), str(tiny["lora_a"]),
                          merge=False)
    torch.testing.assert_close(prompt_features(peft, tok, prompts, [2], "mean", progress=False)[2], base)
    with_adapter = prompt_features(peft.get_base_model(), tok, prompts, [2], "mean", progress=False)[2]
    assert not torch.allclose(with_adapter, base, atol=1e-3)  # the adapter does change them when active


def _composition(tmp_path, tiny) -> str:
    path = tmp_path / "routed.yaml"
    path.write_text(yaml.safe_dump({"name": "routed", "method": "mixture", "members": [
        {"name": "numbers", "model": str(tiny["a"])}, {"name": "words", "model": str(tiny["a"])}]}))
    return str(path)


def _jsonl(path, prompts, chat=False):
    rows = [{"messages": [{"role": "user", "content": p}]} if chat else {"prompt": p} for p in prompts]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_cli_fits_and_writes_a_loadable_router(tiny, tmp_path, capsys):
    config = _composition(tmp_path, tiny)
    numbers = _jsonl(tmp_path / "numbers.jsonl", number_prompts(50, 4))
    words = _jsonl(tmp_path / "words.jsonl", word_prompts(50, 5), chat=True)
    out = tmp_path / "router"
    status = main(["fit-router", "--config", config, "--examples", f"words={words}", "--examples",
                   f"numbers={numbers}", "--out", str(out), "--layer", "2"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "held-out routing accuracy:" in printed and "true \\ routed" in printed
    router = Router.load(out, member_names=["numbers", "words"], hidden_size=64, num_layers=2)
    report = router.settings["report"]
    assert f"{report['heldout_accuracy']:.3f}" in printed and report["heldout_accuracy"] >= 0.9
    assert router.layer == 2 and router.member_names == ["numbers", "words"]  # the composition's order
    assert router.settings["model"] == str(tiny["a"]) and "command" in router.settings
    assert json.loads((out / "router.json").read_text())["settings"]["report"]["confusion"] == report["confusion"]


def test_cli_unknown_examples_member_is_a_config_error(tiny, tmp_path, capsys):
    config = _composition(tmp_path, tiny)
    numbers = _jsonl(tmp_path / "numbers.jsonl", number_prompts(5, 4))
    argv = ["fit-router", "--config", config, "--examples", f"letters={numbers}", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "(examples)" in err and "'letters'" in err and "['numbers', 'words']" in err
    from compose_serve.cli import build_parser
    from compose_serve.train.router import run_fit_router

    with pytest.raises(ConfigError) as info:
        run_fit_router(build_parser().parse_args(argv))
    assert info.value.param == "examples"
    missing = ["fit-router", "--config", config, "--examples", f"numbers={tmp_path / 'none.jsonl'}", "--out", "x"]
    assert main(missing) == 2 and "none.jsonl" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_cli_members_on_different_models_is_a_config_error(tiny, tmp_path, capsys):
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump({"name": "mixed", "method": "mixture", "members": [
        {"name": "numbers", "model": str(tiny["a"])}, {"name": "words", "model": str(tiny["b"])}]}))
    assert main(["fit-router", "--config", str(path), "--task", "numbers", "--out", str(tmp_path / "r")]) == 2
    assert "(members)" in capsys.readouterr().err


def test_first_distinct_stops_on_a_pool_smaller_than_asked():
    from itertools import cycle
    from types import SimpleNamespace

    from compose_serve.train.router import _first_distinct

    pool = cycle([SimpleNamespace(prompt=p) for p in ("a", "b", "c")])  # endless, like a task's pool
    assert _first_distinct(pool, 300) == ["a", "b", "c"]
    assert _first_distinct(cycle([SimpleNamespace(prompt=p) for p in "abcd"]), 2) == ["a", "b"]
