"""Which served names exist: compositions, and members of mixtures / logit_mix served alone."""

from __future__ import annotations

import pytest

from compose_serve.errors import ModelNotFoundError
from compose_serve.http.backend import CompositionInfo
from compose_serve.http.catalog import ModelCatalog
from compose_serve.methods import Delta, LogitMix, Mixture


def _info(name, method, *members):
    """The info a backend would give: which members can serve alone is the method's answer."""
    k = len(members)
    impl = {
        "mixture": lambda: Mixture(members, [1 / k] * k, [1.0] * k),
        "logit_mix": lambda: LogitMix(members, [1 / k] * k),
        "delta": lambda: Delta(members, {"expert": 0, "antiexpert": 1}),
    }[method]()
    solo = {m: plan for m in members if (plan := impl.solo_plan(m)) is not None}
    return CompositionInfo(name, method, tuple(members), 128, solo=solo)


def test_members_listed_bare_unless_their_name_is_taken():
    catalog = ModelCatalog(
        [
            _info("mix", "mixture", "math", "code", "shared"),
            _info("poe", "logit_mix", "shared", "mix"),  # "mix" is a composition's name
            _info("dx", "delta", "expert", "antiexpert"),
            _info("solo", "mixture", "solo"),
        ]
    )
    assert set(catalog.listed) == {
        "mix",
        "poe",
        "dx",
        "solo",
        "math",
        "code",
        "mix/shared",
        "poe/shared",
        "poe/mix",
    }
    assert catalog.resolve("math") == (catalog.resolve("mix")[0], "math")
    assert catalog.resolve("mix/math") == catalog.resolve("math")
    assert catalog.resolve("mix")[1] is None  # the composition wins its own name
    assert catalog.resolve("poe/mix")[1] == "mix"
    for hidden in ("expert", "dx/expert", "solo/solo", "shared"):
        with pytest.raises(ModelNotFoundError) as missing:
            catalog.resolve(hidden)
        assert missing.value.param == "model"


def test_cards_say_what_each_model_is():
    cards = {
        c.id: c for c in ModelCatalog([_info("mix", "mixture", "a", "b")]).cards(created=7).data
    }
    assert cards["mix"].composition == {"method": "mixture", "members": ["a", "b"]}
    assert (
        cards["a"].parent == "mix" and cards["a"].root == "mix" and cards["a"].composition is None
    )
    assert all(c.max_model_len == 128 and c.created == 7 for c in cards.values())
