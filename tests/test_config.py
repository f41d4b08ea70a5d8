"""Composition configs: every error names its field; YAML paths are relative to the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from compose_serve.config import builtin_configs, load_composition, parse_composition
from compose_serve.errors import ConfigError


def _mix(*weights, method="mixture", **extra):
    return {"name": "x", "method": method,
            "members": [{"name": f"m{i}", "model": "org/model", "weight": w} for i, w in enumerate(weights)], **extra}


@pytest.mark.parametrize("data, param", [
    (_mix(-0.5, 1.5), "members.0.weight"),
    (_mix(0.3, 0.3), "members.weight"),
    ({**_mix(0.5, 0.5), "method": "average"}, "method"),
    ({"name": "x", "method": "delta", "members": [{"name": "expert", "model": "m"}, {"name": "critic", "model": "m"}]},
     "members.1.role"),
    ({"name": "x", "method": "delta", "members": [{"name": "expert", "model": "m"}]}, "members"),
    ({"name": "x", "method": "mixture", "members": []}, "members"),
    ({"name": "x", "method": "mixture", "members": [{"name": "a", "model": "m", "temperature": 0}]},
     "members.0.temperature"),
    ({"name": "x", "method": "mixture", "members": [{"name": "a", "model": "m", "colour": "red"}]},
     "members.0.colour"),
    ({"name": "x", "method": "interweave", "members": [{"name": "a", "model": "m"}], "params": {"scalar": 0.5}},
     "members"),
    ({"name": "x", "method": "interweave", "members": [{"name": "a", "model": "m", "adapter": "p"}],
      "params": {"scalar": 1.5}}, "params.scalar"),
    ({**_mix(0.5, 0.5), "params": {"weights": "vibes"}}, "params.weights"),
    ({**_mix(0.5, 0.5), "params": {"tau": -1}}, "params.tau"),
    (_mix(0.5, None), "members.1.weight"),
    ({"name": "x", "method": "mixture", "members": [{"name": "a", "model": "m"}, {"name": "a", "model": "m"}]},
     "members.1.name"),
])
def test_bad_configs_name_the_field(data, param):
    with pytest.raises(ConfigError) as err:
        parse_composition(data)
    assert err.value.param == param, str(err.value)


def test_good_configs_parse_with_defaults():
    spec = parse_composition(_mix(None, None))
    assert spec.fixed_weights() == [0.5, 0.5] and spec.parsed_params().weights == "fixed"
    spec = parse_composition({"name": "d", "method": "delta", "params": {"alpha": 2},
                              "members": [{"name": "e", "model": "m", "role": "expert"},
                                          {"name": "antiexpert", "model": "m"}]})
    assert spec.roles() == {"expert": 0, "antiexpert": 1}
    assert parse_composition(_mix(2.0, -1.0, method="logit_mix")).fixed_weights() == [2.0, -1.0]


def test_yaml_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "models" / "a").mkdir(parents=True)
    (tmp_path / "gate.safetensors").write_bytes(b"")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "method": "interweave", "params": {"gate": "gate.safetensors"},
                                    "members": [{"name": "a", "model": "models/a", "adapter": "models/a"}]}))
    spec = load_composition(path)
    assert spec.members[0].model == str(tmp_path / "models" / "a")
    assert spec.params["gate"] == str(tmp_path / "gate.safetensors")


def test_router_fields_go_together_and_need_a_router_file(tmp_path):
    base = {"name": "r", "method": "mixture", "members": [{"name": "a", "model": "m"}, {"name": "b", "model": "m"}]}
    with pytest.raises(ConfigError, match="needs router") as err:
        parse_composition({**base, "params": {"weights": "router"}})
    assert err.value.param.startswith("params")
    with pytest.raises(ConfigError, match="go with weights: router"):
        parse_composition({**base, "params": {"weights": "fixed", "top_k": 1}})
    with pytest.raises(ConfigError) as err:
        parse_composition({**base, "params": {"weights": "router", "router": "x", "top_k": 0}})
    assert err.value.param == "params.top_k"
    spec = parse_composition({**base, "params": {"weights": "router", "router": "x", "top_k": 1,
                                                  "min_confidence": 0.6}, "share_base": False})
    assert not spec.share_base and spec.parsed_params().min_confidence == 0.6


def test_builtin_configs_load_by_name_and_bad_files_are_named(tmp_path):
    assert {"default", "mixture", "imsm", "smollm2"} <= set(builtin_configs())
    spec = load_composition("default")
    assert spec.name == "routed" and [m.name for m in spec.members] == ["general", "add", "reverse"]
    assert spec.members[0].adapter is None and spec.share_base
    assert all(Path(m.adapter).is_dir() for m in spec.members[1:])  # the committed adapters, resolved
    assert (Path(spec.params["router"]) / "router.safetensors").is_file()  # the committed router
    assert spec.parsed_params().weights == "router" and spec.parsed_params().top_k == 1
    for name in ("mixture", "imsm"):
        for m in load_composition(name).members:
            assert Path(m.adapter).is_dir(), (name, m.adapter)
    with pytest.raises(ConfigError, match="does not exist") as err:
        load_composition(tmp_path / "none.yaml")
    assert err.value.param == "config"
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_composition(tmp_path / "bad.yaml")
