"""The method owns each request's plan: its weights, which members run, and the checks on both
(issue 13, item 10: ``alpha: 1e999`` and all-zero weights used to pass and produce noise)."""

from __future__ import annotations

import math

import pytest

from compose_serve.errors import ConfigError, InvalidRequestError
from compose_serve.methods import Delta, Interweave, LogitMix, Mixture


def _delta():
    return Delta(["base", "expert", "antiexpert"], {"base": 0, "expert": 1, "antiexpert": 2}, alpha=0.5)


@pytest.mark.parametrize("alpha", [math.inf, -math.inf, math.nan, 1e999, 1e30, "2", True])
def test_delta_refuses_an_alpha_that_is_not_a_bounded_number(alpha):
    with pytest.raises(InvalidRequestError) as refused:
        _delta().row_weights({"alpha": alpha})
    assert refused.value.param == "composition.alpha"


def test_delta_config_alpha_is_checked_too():
    with pytest.raises(ConfigError) as refused:
        Delta(["expert", "antiexpert"], {"expert": 0, "antiexpert": 1}, alpha=math.inf)
    assert refused.value.param == "params.alpha"
    assert _delta().row_weights({"alpha": -2.0}) == [1.0, -2.0, 2.0]


@pytest.mark.parametrize("method", [LogitMix(["a", "b"], [0.5, 0.5]), Mixture(["a", "b"], [0.5, 0.5], [1.0, 1.0])])
def test_a_plan_where_no_member_runs_is_refused(method):
    with pytest.raises(InvalidRequestError) as refused:
        method.row_weights({"weights": {"a": 0, "b": 0.0}})
    assert refused.value.param == "composition.weights"


def test_logit_mix_weights_are_bounded():
    method = LogitMix(["a", "b"], [0.5, 0.5])
    with pytest.raises(InvalidRequestError) as refused:
        method.row_weights({"weights": {"a": 1e38}})
    assert refused.value.param == "composition.weights.a"
    assert method.row_weights({"weights": {"a": -1.5}}) == [-1.5, 0.0]


def test_the_method_says_which_members_can_serve_alone():
    assert Mixture(["a", "b"], [0.5, 0.5], [1.0, 1.0]).solo_plan("b") == {"weights": {"b": 1.0}}
    assert LogitMix(["a", "b"], [0.5, 0.5]).solo_plan("a") == {"weights": {"a": 1.0}}
    assert Mixture(["a"], [1.0], [1.0]).solo_plan("a") is None  # the composition is the member
    assert _delta().solo_plan("expert") is None
    assert Interweave(["pair"]).solo_plan("pair") is None
    assert LogitMix(["a", "b"], [0.5, 0.5]).solo_plan("zz") is None
