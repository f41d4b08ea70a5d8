"""The router: its probabilities by hand, its features against transformers, its files and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from compose_serve.errors import ConfigError
from compose_serve.router import Router, layer_features


def _router(k=3, d=8, seed=0, names=None) -> Router:
    g = torch.Generator().manual_seed(seed)
    return Router(names or [f"m{i}" for i in range(k)], layer=1, pooling="mean",
                  mean=torch.randn(d, generator=g), std=torch.rand(d, generator=g) + 0.5,
                  weight=torch.randn(k, d, generator=g), bias=torch.randn(k, generator=g),
                  settings={"model": "tiny"})


def test_probs_equal_the_formula_by_hand():
    router = _router()
    features = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    got = router.probs(features)
    f, mean, std = features.double().numpy(), router.mean.double().numpy(), router.std.double().numpy()
    w, b = router.weight.double().numpy(), router.bias.double().numpy()
    want = np.zeros((5, 3))
    for i in range(5):
        logits = [sum((f[i, j] - mean[j]) / std[j] * w[k, j] for j in range(8)) + b[k] for k in range(3)]
        e = np.exp(np.array(logits) - max(logits))
        want[i] = e / e.sum()
    assert got.dtype == torch.float32 and got.shape == (5, 3)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def _left_padded(tok, texts):
    rows = [tok.encode(t) for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    assert len({len(r) for r in rows}) == len(rows)  # rows of different lengths: padding matters
    return ids, mask, rows


@pytest.mark.parametrize("layer", [1, 2])  # the tiny model has 2 blocks: the first and the last
@torch.no_grad()
def test_layer_features_equal_transformers_hidden_states(tiny, layer):
    model = AutoModelForCausalLM.from_pretrained(tiny["a"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    ids, mask, rows = _left_padded(tok, ["The quick brown fox jumps", "2 + 2", "Compose models at decoding time"])
    got_mean = layer_features(model.get_decoder(), ids, mask, layer, "mean")
    got_last = layer_features(model.get_decoder(), ids, mask, layer, "last")
    # transformers' hidden_states[L] is after the final norm; the router's last layer is before it
    model.get_decoder().norm = torch.nn.Identity()
    for i, r in enumerate(rows):  # each row alone, unpadded: the reference
        hidden = model(torch.tensor([r]), output_hidden_states=True).hidden_states[layer][0]  # [len, d]
        torch.testing.assert_close(got_mean[i], hidden.mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_last[i], hidden[-1], atol=1e-5, rtol=1e-5)
    assert got_mean.dtype == torch.float32 and got_mean.shape == (3, model.config.hidden_size)


def test_layer_features_stop_after_the_layer(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny["a"]).eval()
    decoder = model.get_decoder()
    calls = {"layer1": 0, "layer2": 0, "norm": 0}

    def counter(key):
        def hook(*_):
            calls[key] += 1
        return hook

    handles = [decoder.layers[0].register_forward_hook(counter("layer1")),
               decoder.layers[1].register_forward_pre_hook(counter("layer2")),
               decoder.norm.register_forward_pre_hook(counter("norm"))]
    ids = torch.tensor([[5, 6, 7, 8]])
    layer_features(decoder, ids, torch.ones_like(ids), 1)
    assert calls == {"layer1": 1, "layer2": 0, "norm": 0}
    layer_features(decoder, ids, torch.ones_like(ids), 2)
    assert calls == {"layer1": 2, "layer2": 1, "norm": 0}
    for h in handles:
        h.remove()
    assert all(not layer._forward_hooks for layer in decoder.layers)  # the router's own hook is gone
    model(ids)  # and the model runs whole again


def test_save_load_round_trip(tmp_path):
    router = _router()
    router.save(tmp_path / "r")
    features = torch.randn(4, 8)
    for path in (tmp_path / "r", tmp_path / "r" / "router.safetensors"):
        loaded = Router.load(path, member_names=["m0", "m1", "m2"], hidden_size=8)
        torch.testing.assert_close(loaded.probs(features), router.probs(features), atol=1e-6, rtol=0)
        assert (loaded.member_names, loaded.layer, loaded.pooling, loaded.settings) == (
            router.member_names, 1, "mean", {"model": "tiny"})
    meta = json.loads((tmp_path / "r" / "router.json").read_text())
    assert meta["hidden_size"] == 8 and meta["member_names"] == ["m0", "m1", "m2"]
    # the same members in another order: columns follow the order asked for
    shuffled = Router.load(tmp_path / "r", member_names=["m2", "m0", "m1"])
    torch.testing.assert_close(shuffled.probs(features), router.probs(features)[:, [2, 0, 1]], atol=1e-6, rtol=0)


def _load_error(path, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Router.load(path, **kwargs)
    assert info.value.param == "params.router"
    return info.value


def test_load_errors_name_the_problem(tmp_path):
    assert "does not exist" in _load_error(tmp_path / "nowhere").message
    good = _router().save(tmp_path / "good")

    (tmp_path / "nojson").mkdir()
    save_file(load_file(str(good / "router.safetensors")), str(tmp_path / "nojson" / "router.safetensors"))
    assert "router.json" in _load_error(tmp_path / "nojson").message

    bad = _router().save(tmp_path / "shape")
    tensors = load_file(str(bad / "router.safetensors"))
    tensors["weight"] = torch.zeros(2, 8)
    save_file(tensors, str(bad / "router.safetensors"))
    message = _load_error(bad).message
    assert "'weight'" in message and "[2, 8]" in message and "[3, 8]" in message

    del tensors["bias"]
    save_file(tensors, str(bad / "router.safetensors"))
    assert "bias" in _load_error(bad).message

    message = _load_error(good, member_names=["add", "reverse", "general"]).message
    assert "['m0', 'm1', 'm2']" in message and "['add', 'reverse', 'general']" in message
    message = _load_error(good, member_names=["m0", "m1"]).message
    assert "['m0', 'm1']" in message

    message = _load_error(good, hidden_size=576).message
    assert "hidden_size 8" in message and "576" in message
    deep = _router()
    deep.layer = 20
    message = _load_error(deep.save(tmp_path / "deep"), num_layers=2).message
    assert "layer 20" in message and "2 decoder layers" in message
