"""The IMSM gate module: formula by hand from the saved weights, save/load, bad files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from compose_serve.errors import ConfigError
from compose_serve.methods.interweave import ImsmGate, interweave


def test_gate_equals_formula_from_saved_weights(tmp_path):
    torch.manual_seed(0)
    d = 16
    gate = ImsmGate(d, rank=8).eval()
    gate.save(tmp_path)
    state = load_file(str(tmp_path / "gate.safetensors"))
    assert state["proj_a.weight"].shape == (8, 4 * d) and state["proj_b.weight"].shape == (d, 8)
    hq_m, h_m, h_a, hq_a = (torch.randn(3, d) for _ in range(4))
    x = torch.cat([hq_m, h_m, h_a, hq_a], dim=-1)
    g = torch.sigmoid(x @ state["proj_a.weight"].T @ state["proj_b.weight"].T)
    loaded = ImsmGate.load(tmp_path, d)
    torch.testing.assert_close(loaded(hq_m, h_m, h_a, hq_a), g)
    fused, mean = interweave(loaded, hq_m, h_m, h_a, hq_a)
    torch.testing.assert_close(fused, g * h_m + (1 - g) * h_a)
    torch.testing.assert_close(mean, g.mean(-1))


def test_gate_parameter_count_matches_the_paper():
    gate = ImsmGate(4096, rank=8)
    assert sum(p.numel() for p in gate.parameters()) == 5 * 4096 * 8  # 0.164M at d = 4096


def test_without_query_variant_is_read_off_the_shapes(tmp_path):
    d = 8
    save_file({"proj_a.weight": torch.randn(4, 2 * d), "proj_b.weight": torch.randn(d, 4)}, str(tmp_path / "g.safetensors"))
    gate = ImsmGate.load(tmp_path / "g.safetensors", d)
    assert not gate.use_query and gate.rank == 4


def test_bad_gate_files_name_the_field(tmp_path):
    with pytest.raises(ConfigError) as err:
        ImsmGate.load(tmp_path / "missing.safetensors", 8)
    assert err.value.param == "params.gate"
    save_file({"proj_a.weight": torch.randn(4, 3 * 8), "proj_b.weight": torch.randn(8, 4)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match="do not fit hidden size"):
        ImsmGate.load(tmp_path / "bad.safetensors", 8)
