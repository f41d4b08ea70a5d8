"""The siamese member: both streams in one forward equal separate base and adapter runs."""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from compose_serve.engine.core import resolve
from compose_serve.members.hf import load_causal_lm, load_tokenizer
from compose_serve.members.shared import SharedBase
from compose_serve.members.siamese import SiameseMember


@torch.no_grad()
def test_siamese_rows_equal_separate_base_and_adapter_runs(tiny):
    lm = load_causal_lm(str(tiny["a"]), torch.float32, torch.device("cpu"))
    host = SharedBase(lm, load_tokenizer(str(tiny["a"])), {"pair": str(tiny["lora_a"])})
    pair = SiameseMember("pair", host, "pair", gate=0.5)
    base = AutoModelForCausalLM.from_pretrained(tiny["a"]).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["a"]), tiny["lora_a"])
    adapted = adapted.merge_and_unload().eval()
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    seqs = {3: tok.encode("The quick brown fox"), 7: tok.encode("def")}
    pair.prefill(list(seqs), list(seqs.values())).result()
    assert not torch.allclose(base(torch.tensor([seqs[3]])).logits, adapted(torch.tensor([seqs[3]])).logits)
    for step in range(6):
        if step == 2:
            seqs[1] = tok.encode("Una frase")
            pair.prefill([1], [seqs[1]]).result()
        slots = list(seqs)
        last = torch.tensor([(11 * step + s) % 300 for s in slots])
        for slot, t in zip(slots, last.tolist(), strict=True):
            seqs[slot].append(t)
        resolve([([], pair.decode(slots, last))])
        streams = pair.stream_logits()  # [B, 2, V]
        for row, slot in enumerate(slots):
            ids = torch.tensor([seqs[slot]])
            torch.testing.assert_close(streams[row, 0], base(ids).logits[0, -1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(streams[row, 1], adapted(ids).logits[0, -1], atol=1e-4, rtol=1e-4)
    pair.release([3])
    assert sorted(pair.live_slots) == [1, 7] and 3 not in pair.prompt_means
