"""Members on one shared base: per-row LoRA in one forward equals separate PEFT forwards."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from compose_serve.engine.core import resolve
from compose_serve.errors import ConfigError
from compose_serve.members.hf import load_causal_lm, load_tokenizer
from compose_serve.members.shared import SharedBase, SharedMember


def _host(tiny) -> SharedBase:
    lm = load_causal_lm(str(tiny["a"]), torch.float32, torch.device("cpu"))
    return SharedBase(lm, load_tokenizer(str(tiny["a"])), {"one": str(tiny["lora_a"]), "two": str(tiny["lora_a2"])})


def _references(tiny) -> dict[str, torch.nn.Module]:
    """Each member as PEFT runs it on its own copy of the base (adapter not merged)."""
    refs = {"base": AutoModelForCausalLM.from_pretrained(tiny["a"]).eval()}
    for name in ("one", "two"):
        adapter = tiny["lora_a" if name == "one" else "lora_a2"]
        refs[name] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["a"]), adapter).eval()
    return refs


def _counted(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@torch.no_grad()
def test_rows_of_different_adapters_in_one_forward_equal_separate_peft_runs(tiny):
    host = _host(tiny)
    members = {"base": SharedMember("base", host, None), "one": SharedMember("one", host, "one"),
               "two": SharedMember("two", host, "two")}
    refs = _references(tiny)
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    forwards = _counted(host.decoder)
    # (member, slot) -> token ids; the same slot number is used by two members on purpose
    seqs = {("base", 0): tok.encode("The quick brown fox"), ("one", 0): tok.encode("2 + 2 ="),
            ("two", 1): tok.encode("def add(a, b):"), ("one", 2): tok.encode("Una")}

    def check(name, slots, scores):
        for row, slot in enumerate(slots):
            want = refs[name](torch.tensor([seqs[(name, slot)]])).logits[0, -1]
            torch.testing.assert_close(scores.logits[row], want, atol=1e-4, rtol=1e-4)

    calls = {}
    for name, member in members.items():
        slots = [s for (m, s) in seqs if m == name]
        calls[name] = (slots, member.prefill(slots, [seqs[(name, s)] for s in slots]))
    resolved = resolve([(slots, call) for slots, call in calls.values()])
    assert forwards[0] == 1, "one prefill forward for every member's rows"
    for name, (slots, scores) in zip(calls, resolved, strict=True):
        check(name, slots, scores)

    rng = torch.Generator().manual_seed(0)
    for step in range(6):
        if step == 2:  # a member joins mid-way, then one leaves
            seqs[("two", 5)] = tok.encode("Every member scores")
            resolve([([], members["two"].prefill([5], [seqs[("two", 5)]]))])
        if step == 4:
            members["one"].release([0])
            del seqs[("one", 0)]
        before = forwards[0]
        pending = []
        for name, member in members.items():
            slots = [s for (m, s) in seqs if m == name]
            last = torch.randint(0, 300, (len(slots),), generator=rng)
            for slot, t in zip(slots, last.tolist(), strict=True):
                seqs[(name, slot)].append(t)
            pending.append((name, slots, member.decode(slots, last)))
        for name, slots, call in pending:
            check(name, slots, call.result())
        assert forwards[0] == before + 1, "one decode forward per step for all members"
    assert members["one"].live_slots == [2] and sorted(members["two"].live_slots) == [1, 5]


@torch.no_grad()
def test_base_weights_are_stored_once_and_each_path_of_the_plan_is_exact(tiny):
    host = _host(tiny)
    a, b = SharedMember("a", host, "one"), SharedMember("b", host, "two")
    assert a.lm is b.lm
    layer = host.decoder.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.data_ptr() == host.lm.get_decoder().layers[0].self_attn.q_proj.weight.data_ptr()
    n_weights = sum(p.numel() for p in host.lm.parameters())
    assert n_weights == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny["a"]).parameters())
    refs = _references(tiny)
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    ids = tok.encode("Compose models at decoding time")
    # only one adapter in the batch: the plan takes its "single" path
    got = a.prefill([0], [ids]).result().logits[0]
    assert host.plan.single is not None
    torch.testing.assert_close(got, refs["one"](torch.tensor([ids])).logits[0, -1], atol=1e-4, rtol=1e-4)


def test_unknown_adapter_and_missing_folder_are_config_errors(tiny, tmp_path):
    host = _host(tiny)
    with pytest.raises(ConfigError, match="not loaded"):
        SharedMember("x", host, "three")
    lm = load_causal_lm(str(tiny["a"]), torch.float32, torch.device("cpu"))
    with pytest.raises(ConfigError, match="does not exist") as err:
        SharedBase(lm, load_tokenizer(str(tiny["a"])), {"x": str(tmp_path / "nope")})
    assert err.value.param == "adapter"
