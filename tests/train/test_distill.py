"""Distillation (ALGORITHMS.md section 6): losses against the formulas by hand, the fused teacher
against plain transformers forwards, DynSDPB's bookkeeping, and short runs on tiny models."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml

from compose_serve.cli import main
from compose_serve.composition import build_composition
from compose_serve.config import load_composition, parse_composition
from compose_serve.errors import ConfigError
from compose_serve.members.hf import load_causal_lm, load_tokenizer
from compose_serve.members.shared import SharedBase
from compose_serve.members.siamese import SiameseMember
from compose_serve.methods.interweave import ImsmGate
from compose_serve.train import distill as D
from compose_serve.train.lora import IGNORE, collate, encode_example
from compose_serve.train.tasks import Example, heldout
from compose_serve.train.teacher import FusedTeacher, prompt_positions, scored_positions


def mixture(tiny, weights=(0.5, 0.5), method="mixture", params=None):
    members = [{"name": k, "model": str(tiny[k]), "weight": w} for k, w in zip("ab", weights, strict=True)]
    return build_composition(parse_composition({"name": "t", "method": method, "members": members,
                                                "params": params or {}}))


def task_batch(tiny, n=3):
    tok = load_tokenizer(str(tiny["a"]))
    items = heldout("add", n)[:2] + heldout("reverse", n)[: n - 2]
    return collate([encode_example(tok, e) for e in items], tok.pad_token_id)


# -- the losses, by hand -----------------------------------------------------------------------
def test_kd_loss_equals_the_formula_by_hand_shift_included():
    torch.manual_seed(0)
    B, L, V, lam = 2, 6, 7, 0.3
    student = torch.randn(B, L, V)
    teacher = torch.log_softmax(torch.randn(B, L, V), dim=-1)
    teacher[0, 2] = torch.log_softmax(torch.tensor([0.0, 1, 2, -math.inf, 0, 0, 1]), dim=0)  # a cut token
    labels = torch.tensor([[IGNORE, IGNORE, 3, 5, 1, IGNORE], [IGNORE, 4, 4, 0, 2, 6]])
    ce = kl = 0.0
    n = 0
    for b in range(B):
        for t in range(L - 1):  # the output at t predicts the token at t + 1
            target = labels[b, t + 1].item()
            if target == IGNORE:
                continue
            q = [math.exp(x) for x in student[b, t].tolist()]
            logq = [math.log(x / sum(q)) for x in q]
            ce += -logq[target]
            for v in range(V):
                p = math.exp(teacher[b, t, v].item())
                if p > 0:
                    kl += p * (teacher[b, t, v].item() - logq[v])
            n += 1
    got = D.kd_loss(student, teacher, labels, lam)
    assert got["ce"].item() == pytest.approx(ce / n, rel=1e-5)
    assert got["kd"].item() == pytest.approx(kl / n, rel=1e-5)
    assert got["loss"].item() == pytest.approx((1 - lam) * ce / n + lam * kl / n, rel=1e-5)


def test_weighted_per_teacher_kls_have_the_gradient_of_the_kl_to_the_mixture():
    torch.manual_seed(1)
    N, V = 5, 11
    probs = [torch.softmax(torch.randn(N, V) * 2, dim=-1) for _ in range(2)]
    w = torch.rand(N, 1)
    weights = torch.cat([w, 1 - w], dim=1)  # a different mixture per token
    logits = torch.randn(N, V, requires_grad=True)

    logq = torch.log_softmax(logits, dim=-1)
    per_teacher = sum(weights[:, k] * (probs[k] * (probs[k].log() - logq)).sum(-1) for k in range(2)).mean()
    (grad_sum,) = torch.autograd.grad(per_teacher, logits)

    mixed = torch.log(weights[:, :1] * probs[0] + weights[:, 1:] * probs[1])
    kd = D.kd_rows(logits, mixed, torch.zeros(N, dtype=torch.long), lam=1.0)["loss"]
    (grad_mix,) = torch.autograd.grad(kd, logits)
    torch.testing.assert_close(grad_mix, grad_sum, rtol=1e-5, atol=1e-7)
    assert grad_mix.abs().max() > 1e-3  # not vacuous


def test_rationale_loss_weighs_each_group_mean():
    torch.manual_seed(2)
    logits, targets = torch.randn(7, 5), torch.tensor([0, 1, 2, 3, 4, 0, 1])
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    expected = 2.0 * ce[:2].mean() + 0.25 * ce[2:5].mean() + 0.75 * ce[5:].mean()
    got = D.rationale_rows(logits, targets, groups, [2.0, 0.25, 0.75])
    assert got["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(got) == {"loss", "ce", "ce_rationale_0", "ce_rationale_1"}


def test_positions_shift_by_one_and_the_prompt_ends_at_the_first_label():
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8, IGNORE]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert scored_positions(labels).tolist() == [[False, True, True, False, False]]
    assert prompt_positions(labels, mask).tolist() == [[True, True, False, False, False]]


# -- the teacher against plain forwards --------------------------------------------------------
def plain_logprobs(path, batch, adapter=None):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return torch.log_softmax(lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)


def test_the_teacher_of_a_mixture_is_the_mixed_distribution(tiny):
    batch = task_batch(tiny)
    select = scored_positions(batch["labels"])
    prompt = prompt_positions(batch["labels"], batch["attention_mask"])
    got = FusedTeacher(mixture(tiny, (0.3, 0.7)))(batch["input_ids"], batch["attention_mask"], prompt, select)
    la, lb = plain_logprobs(tiny["a"], batch), plain_logprobs(tiny["b"], batch)
    expected = torch.log(0.3 * la.exp() + 0.7 * lb.exp())[select]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_the_teacher_of_an_imsm_pair_gates_at_every_position(tiny):
    from peft import PeftModel

    batch = task_batch(tiny)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    select, prompt = scored_positions(labels), prompt_positions(labels, mask)
    torch.manual_seed(3)
    gate = ImsmGate(64, 8).eval()
    tok = load_tokenizer(str(tiny["a"]))
    peft_model = PeftModel.from_pretrained(load_causal_lm(str(tiny["a"]), torch.float32, torch.device("cpu")),
                                           str(tiny["lora_a"]))
    spec = parse_composition({"name": "i", "method": "interweave", "params": {"scalar": 0.5},
                              "members": [{"name": "a", "model": str(tiny["a"]), "adapter": str(tiny["lora_a"])}]})
    comp = build_composition(spec, members=[SiameseMember("a", SharedBase(peft_model, tok), "default", gate)])
    got = FusedTeacher(comp)(ids, mask, prompt, select)

    peft_model = PeftModel.from_pretrained(  # a fresh copy: the member's row hooks stay on its own
        load_causal_lm(str(tiny["a"]), torch.float32, torch.device("cpu")), str(tiny["lora_a"]))
    with torch.no_grad():  # the reference: two separate runs, the gate by hand
        decoder = peft_model.get_base_model().get_decoder()
        with peft_model.disable_adapter():
            h_base = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        h_adapted = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        w = prompt.unsqueeze(-1).float()
        hq_b = (h_base * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
        hq_a = (h_adapted * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
        g = torch.sigmoid(gate.proj_b(gate.proj_a(torch.cat(
            [hq_b.expand_as(h_base), h_base, h_adapted, hq_a.expand_as(h_base)], -1))))
        head = peft_model.get_base_model().get_output_embeddings()
        expected = torch.log_softmax(head(g * h_base + (1 - g) * h_adapted), -1)[select]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# -- DynSDPB -----------------------------------------------------------------------------------
def test_self_distillation_targets_are_the_previous_steps_outputs_for_the_same_samples(tiny):
    settings = D.DistillSettings(model=str(tiny["c"]), steps=4, batch_size=2, rank=4, alpha=8, dropout=0.1,
                                 lr=1e-2, lam=0.0, self_distill=True, sd_dynamic=0.5)
    tok = load_tokenizer(settings.model)
    from compose_serve.train.lora import make_peft_model, train_loop

    torch.manual_seed(0)
    model = make_peft_model(load_causal_lm(settings.model, torch.float32, torch.device("cpu")), settings)
    head_outputs: list[torch.Tensor] = []
    model.get_base_model().get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_outputs.append(out.detach().clone()))
    sd = D.SelfDistill(1.0, 2.0, dynamic_steps=2)
    seen = []
    original = sd.term

    def spy(m):
        seen.append(None if sd.previous is None else (sd.previous[0]["input_ids"], sd.previous[1], len(head_outputs)))
        return original(m)

    sd.term = spy
    batches = list(zip(range(4), D.distill_batches(settings, tok), strict=False))
    distiller = D.Distiller(model, settings, None, sd)
    train_loop(distiller, [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-2}], [model],
               tok, settings, "sd", progress=False, batches=iter(b for _, b in batches))

    assert seen[0] is None and "sd" not in distiller.history[0]
    # head calls: step 0 -> [main]; step t >= 1 -> [main, re-run of batch t-1]
    main_call = [0, 1, 3, 5]
    for step in range(1, 4):
        ids, targets, calls_so_far = seen[step]
        assert torch.equal(ids, batches[step - 1][1]["input_ids"])  # the same samples
        assert torch.equal(targets, head_outputs[main_call[step - 1]])  # exactly last step's outputs
        assert calls_so_far == main_call[step] + 1  # taken before this step's re-run
        record = distiller.history[step]
        u = record["sd_uncertainty"]
        alpha, temperature = (1 - u, 2.0 * (1 + u)) if step < 2 else (1.0, 2.0)
        assert record["sd_alpha"] == pytest.approx(alpha) and record["sd_temperature"] == pytest.approx(temperature)
        now = head_outputs[main_call[step] + 1]
        p = torch.softmax(targets / temperature, -1)
        kl = (p * (p.log() - torch.log_softmax(now / temperature, -1))).sum(-1).mean()
        assert record["sd"] == pytest.approx((alpha * temperature**2 * kl).item(), rel=1e-4)


# -- short runs --------------------------------------------------------------------------------
def test_a_few_steps_lower_the_kl_to_the_teacher_and_the_student_serves(tiny, tmp_path):
    from compose_serve.engine import Engine, Request
    from compose_serve.sampling import SamplingParams

    settings = D.DistillSettings(task="add,reverse", model=str(tiny["c"]), steps=12, batch_size=4, rank=8,
                                 alpha=16, lr=1e-2, lam=0.9)  # LLM-NEO released lam
    report = D.distill(settings, tmp_path / "student", progress=False, composition=mixture(tiny), eval_n=6)
    for task in ("add", "reverse"):
        assert report["after"][task]["kl_to_teacher"] < 0.9 * report["before"][task]["kl_to_teacher"]
        assert 0.0 <= report["after"][task]["accuracy"] <= 1.0
    assert {"ce", "kd"} <= set(report["history_every_10"][0])
    saved = json.loads((tmp_path / "student" / "distill_report.json").read_text())
    assert saved["settings"]["lam"] == 0.9

    # served like any member: the saved composition gives HF generate's greedy tokens
    from peft import PeftModel

    served = build_composition(load_composition(tmp_path / "student" / "composition.yaml"))
    tok = served.tokenizer
    prompt = list(tok.apply_chat_template(heldout("add", 1)[0].messages(), add_generation_prompt=True,
                                          tokenize=True, return_dict=False))
    [out] = Engine(served, max_batch=1).generate(
        [Request(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))])
    lm = PeftModel.from_pretrained(load_causal_lm(str(tiny["c"]), torch.float32, torch.device("cpu")),
                                   str(tmp_path / "student")).merge_and_unload()
    ref = lm.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                      pad_token_id=tok.pad_token_id)[0, len(prompt):]
    assert out.token_ids == ref.tolist()


def test_rationale_mode_teaches_answers_and_each_members_rationale(tiny, tmp_path):
    settings = D.DistillSettings(task="add", model=str(tiny["c"]), steps=2, batch_size=2, rank=4, alpha=8,
                                 mode="rationale", rationale_tokens=5, gamma=0.5, rationale_weights=(0.3, 0.2))
    comp = mixture(tiny)
    tok = comp.tokenizer
    members = [D._single(comp, k) for k in range(2)]
    batch = next(D.distill_batches(settings, tok, comp, members))
    assert sorted(batch["groups"].tolist()) == [0, 0, 1, 1, 2, 2]
    report = D.distill(settings, tmp_path / "r", progress=False, composition=comp)
    assert {"ce", "ce_rationale_0", "ce_rationale_1"} <= set(report["history_every_10"][0])
    first = report["first_batch"]  # the report keeps the first batch: answers, then each member's rationale
    assert [row["group"] for row in first] == [0, 0, 1, 1, 2, 2]
    for row in first[:2]:  # gold answers, by hand: the two 3-digit operands of the prompt -> a + b
        a, b = re.findall(r"\d{3}", row["prompt"])[:2]
        assert row["target"] == str(int(a) + int(b))
    assert all(row["prompt"].endswith("Explain the answer as a would.") for row in first if row["group"] == 1)
    shot = heldout("add", 1)[0]
    text = D.rationale_prompt(shot, D.demonstrations())
    assert f"Answer: {shot.answer}\nExplanation:" in text  # the gold answer is in the teacher's prompt
    assert D.explain(shot).endswith(f"gives {shot.answer}.")


def test_missing_answers_are_written_by_the_composition(tiny, tmp_path):
    from compose_serve.train.evaluate import complete

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1 + 2?", "answer": "3"}) + "\n"
                    + json.dumps({"prompt": "Say hi."}) + "\n")
    settings = D.DistillSettings(model=str(tiny["c"]), data=str(data), batch_size=2, max_answer_tokens=6,
                                 config="unused")
    comp = mixture(tiny)
    batch = next(D.distill_batches(settings, comp.tokenizer, comp))
    written = complete(comp, [Example("data", "Say hi.", "")], max_tokens=6)[0].text.strip()
    replies = [comp.tokenizer.decode([t for t in row.tolist() if t != IGNORE]) for row in batch["labels"]]
    gold = [r for r in replies if r.startswith("3")]
    others = [r for r in replies if not r.startswith("3")]
    assert len(gold) == 1 and len(others) == 1 and others[0].startswith(written)


def test_bad_settings_and_data_name_the_field(tiny, tmp_path, other_tokenizer_model):
    with pytest.raises(ConfigError) as err:
        D.check_settings(D.DistillSettings(lam=0.5))
    assert err.value.param == "lam"
    with pytest.raises(ConfigError) as err:
        D.check_settings(D.DistillSettings(mode="rationale", lam=0.0))
    assert err.value.param == "config"
    with pytest.raises(ConfigError) as err:
        D.check_settings(D.DistillSettings(task="add,nope", lam=0.0))
    assert err.value.param == "task" and "nope" in str(err.value)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"answer": "no prompt"}\n')
    with pytest.raises(ConfigError, match="line 2") as err:
        D.read_jsonl(bad)
    assert err.value.param == "data"
    with pytest.raises(ConfigError, match="vocabulary") as err:
        D.distill(D.DistillSettings(model=str(other_tokenizer_model), steps=1), tmp_path / "x",
                  composition=mixture(tiny), progress=False)
    assert err.value.param == "student"


def test_the_command_distils_and_says_what_it_set(tiny, tmp_path, capsys):
    config = tmp_path / "teacher.yaml"
    config.write_text(yaml.safe_dump({"name": "t", "method": "mixture", "members": [
        {"name": "a", "model": str(tiny["a"])}, {"name": "b", "model": str(tiny["b"])}]}))
    out = tmp_path / "s"
    code = main(["distill", "--config", str(config), "--student", str(tiny["c"]), "--task", "reverse",
                 "--steps", "2", "--batch-size", "2", "--rank", "4", "--self-distill", "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "using 0.1" in captured.err and "distilled into" in captured.out
    report = json.loads((out / "distill_report.json").read_text())
    assert report["settings"]["dropout"] == 0.1 and report["settings"]["alpha"] == 8
    assert report["settings"]["lam"] == 0.5 and (out / "adapter_model.safetensors").is_file()
