"""Weight-merged baselines: each method against an independent reference on tiny models."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compose_serve import merge as merging
from tests.conftest import build_lora


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, read straight from its safetensors files."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def lora_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """``scaling * B @ A`` per adapted weight, keyed by the base model's tensor name."""
    import json

    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    saved = load_file(adapter / "adapter_model.safetensors")
    deltas = {}
    for key, a in saved.items():
        if ".lora_A." in key:
            b = saved[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            deltas[name] = scaling * (b @ a)
    return deltas


@pytest.fixture(scope="module")
def lora_b(tiny, tmp_path_factory) -> Path:
    """A second LoRA adapter of tiny ``a``."""
    return build_lora(tmp_path_factory.mktemp("lora_b") / "lora_b", tiny["a"], seed=6)


def test_linear_equals_the_weighted_average_of_the_tensors(tiny, tmp_path):
    out = merging.merge(
        "linear", str(tiny["a"]), [str(tiny["a"]), str(tiny["b"])], [0.3, 0.7], tmp_path / "linear"
    )
    a, b, merged = weights_of(tiny["a"]), weights_of(tiny["b"]), weights_of(out)
    assert set(merged) == set(a)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, 0.3 * a[name] + 0.7 * b[name], rtol=1e-6, atol=1e-7)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_mod_rule_tensor_matches_the_formula_by_hand():
    w0 = torch.tensor([[-1.0, 0.0, 1.0], [2.0, 3.0, 0.5]])  # min -1, max 3: minmax = (w0 + 1) / 4
    w1 = torch.tensor([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]])
    # minmax(w0) = [[0, .25, .5], [.75, 1, .375]]; keep w0 where < 0.6, else w1
    expected = torch.tensor([[-1.0, 0.0, 1.0], [40.0, 50.0, 0.5]])
    assert torch.equal(merging.mod_rule_tensor(w0, w1, 0.6), expected)
    # at 0.5 the entry whose minmax is exactly 0.5 is not below it: it comes from w1
    at_half = torch.tensor([[-1.0, 0.0, 30.0], [40.0, 50.0, 0.5]])
    assert torch.equal(merging.mod_rule_tensor(w0, w1, 0.5), at_half)
    constant = torch.full((2, 2), 7.0)  # max == min: minmax is all zeros, so w0 is kept
    assert torch.equal(merging.mod_rule_tensor(constant, w1[:, :2], 0.1), constant)
    assert torch.equal(merging.mod_rule_tensor(w0, w1, 0.0), w1)  # nothing is below 0


def test_mod_rule_merge_mixes_mlp_tensors_only(tiny, tmp_path):
    out = merging.merge(
        "mod_rule", str(tiny["a"]), [str(tiny["a"]), str(tiny["b"])], [0.9, 0.1], tmp_path / "mod"
    )
    a, b, merged = weights_of(tiny["a"]), weights_of(tiny["b"]), weights_of(out)
    mixed = 0
    for name, tensor in merged.items():
        if "mlp" not in name:
            assert torch.equal(tensor, a[name]), name
            continue
        w0, w1 = a[name].double(), b[name].double()
        normalized = (w0 - w0.min()) / (w0.max() - w0.min())
        expected = [
            x1 if n >= 0.9 else x0
            for x0, x1, n in zip(w0.flatten(), w1.flatten(), normalized.flatten(), strict=True)
        ]
        assert torch.equal(tensor.double().flatten(), torch.stack(expected)), name
        mixed += int((normalized >= 0.9).sum())
    assert mixed > 0  # the rule did take some entries from model 1


def test_peft_weighted_cat_equals_base_plus_weighted_deltas(tiny, lora_b, tmp_path):
    out = merging.merge(
        "peft_weighted",
        str(tiny["a"]),
        [str(tiny["lora_a"]), str(lora_b)],
        [0.5, 0.25],
        tmp_path / "peft",
        combination="cat",
    )
    base, merged = weights_of(tiny["a"]), weights_of(out)
    da, db = lora_deltas(tiny["lora_a"]), lora_deltas(lora_b)
    assert set(da) == set(db) and len(da) > 0
    for name, tensor in merged.items():
        expected = base[name] + 0.5 * da.get(name, 0) + 0.25 * db.get(name, 0)
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6)


def test_task_arithmetic_of_adapters_adds_their_deltas(tiny, lora_b, tmp_path):
    out = merging.merge(
        "task_arithmetic",
        str(tiny["a"]),
        [str(tiny["lora_a"]), str(lora_b)],
        [1.0, 1.0],
        tmp_path / "ta",
        cache=tmp_path / "cache",
    )
    assert (
        len(list((tmp_path / "cache").iterdir())) == 2
    )  # each adapter merged into a full model once
    base, merged = weights_of(tiny["a"]), weights_of(out)
    da, db = lora_deltas(tiny["lora_a"]), lora_deltas(lora_b)
    for name, tensor in merged.items():
        torch.testing.assert_close(
            tensor, base[name] + da.get(name, 0) + db.get(name, 0), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_sparse_mergekit_methods_write_a_loadable_model(tiny, method, tmp_path):
    from transformers import AutoModelForCausalLM

    out = merging.merge(
        method, str(tiny["a"]), [str(tiny["b"]), str(tiny["c"])], [1.0, 1.0], tmp_path / method
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    base, merged = weights_of(tiny["a"]), weights_of(out)
    changed = [n for n in merged if not torch.equal(merged[n], base[n])]
    assert changed and model.config.num_hidden_layers == 2


def test_merge_command_and_its_errors(tiny, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    merging.add_merge(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "merge",
            "--method",
            "mod_rule",
            "--base",
            str(tiny["a"]),
            "--adapters",
            str(tiny["a"]),
            str(tiny["b"]),
            "--out",
            str(tmp_path / "m"),
        ]
    )
    assert args.func(args) == 0 and args.weights is None
    assert str(tmp_path / "m") in capsys.readouterr().out
    with pytest.raises(ValueError, match="exactly two"):
        merging.merge(
            "mod_rule", str(tiny["a"]), [str(tiny["a"])] * 3, [0.8, 0.1, 0.1], tmp_path / "x"
        )
    with pytest.raises(ValueError, match="unknown merge method"):
        merging.merge(
            "slerp", str(tiny["a"]), [str(tiny["a"]), str(tiny["b"])], [0.5, 0.5], tmp_path / "y"
        )
