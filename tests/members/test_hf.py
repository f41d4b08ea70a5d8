"""HFMember and its slot cache against transformers run without a cache, row by row."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compose_serve.members.hf import HFMember, load_causal_lm, load_tokenizer


def _member(path, name="m"):
    return HFMember(name, load_causal_lm(str(path), torch.float32, torch.device("cpu")), load_tokenizer(str(path)))


@torch.no_grad()
def test_prefill_decode_join_leave_equal_no_cache_forward(tiny):
    """Sequences join and leave a running batch; every row's logits equal a full recompute."""
    member = _member(tiny["a"])
    ref = AutoModelForCausalLM.from_pretrained(tiny["a"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    seqs = {0: tok.encode("The quick brown fox"), 1: tok.encode("2 +")}
    member.prefill([0, 1], [seqs[0], seqs[1]])
    rng = torch.Generator().manual_seed(0)
    for step in range(12):
        if step == 3:  # a longer prompt joins mid-way
            seqs[5] = tok.encode("Compose models at decoding time instead of merging")
            member.prefill([5], [seqs[5]])
        if step == 7:  # the first one leaves
            member.release([0])
            del seqs[0]
        slots = list(seqs)
        if step == 9:  # the engine may hand rows in another order
            slots = slots[::-1]
        last = torch.randint(0, 300, (len(slots),), generator=rng)
        for slot, t in zip(slots, last.tolist(), strict=True):
            seqs[slot].append(t)
        got = member.decode(slots, last).logits
        for row, slot in enumerate(slots):
            want = ref(torch.tensor([seqs[slot]])).logits[0, -1]
            torch.testing.assert_close(got[row], want, atol=1e-4, rtol=1e-4)
    assert sorted(member.live_slots) == sorted(seqs)


@torch.no_grad()
def test_a_prompt_prefilled_in_chunks_scores_like_one_prefill(tiny):
    """Chunks of 3 tokens (rows of different lengths, finishing at different chunks) give the
    no-cache logits of every prefix, the running prompt NLL, and then decode exactly."""
    member = _member(tiny["a"])
    ref = AutoModelForCausalLM.from_pretrained(tiny["a"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    prompts = {0: tok.encode("The quick brown fox jumps over"), 1: tok.encode("2 + 2 = 4")}
    done = {0: 0, 1: 0}
    while any(done[s] < len(p) for s, p in prompts.items()):
        slots = [s for s in prompts if done[s] < len(prompts[s])]
        chunks = [prompts[s][done[s] : done[s] + 3] for s in slots]
        scores = member.prefill(slots, chunks, want_prompt_nll=True)
        for row, (slot, chunk) in enumerate(zip(slots, chunks, strict=True)):
            done[slot] += len(chunk)
            seen = prompts[slot][: done[slot]]
            logits = ref(torch.tensor([seen])).logits[0]
            torch.testing.assert_close(scores.logits[row], logits[-1], atol=1e-4, rtol=1e-4)
            want_nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(seen[1:])) if len(seen) > 1 else 0
            torch.testing.assert_close(scores.prompt_nll[row], torch.as_tensor(want_nll), atol=1e-5, rtol=1e-5)
    last = torch.tensor([7, 9])
    got = member.decode([1, 0], last).logits
    for row, (slot, token) in enumerate(zip([1, 0], last.tolist(), strict=True)):
        want = ref(torch.tensor([prompts[slot] + [token]])).logits[0, -1]
        torch.testing.assert_close(got[row], want, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_prompt_nll_equals_cross_entropy(tiny):
    member = _member(tiny["a"])
    ref = AutoModelForCausalLM.from_pretrained(tiny["a"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    prompts = [tok.encode("The quick brown fox jumps"), tok.encode("2 + 2 = 4")]
    got = member.prefill([0, 1], prompts, want_prompt_nll=True).prompt_nll
    for row, ids in enumerate(prompts):
        logits = ref(torch.tensor([ids])).logits[0, :-1]
        want = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
        torch.testing.assert_close(got[row], want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_final_hidden_is_after_the_last_norm(tiny):
    member = _member(tiny["a"])
    ref = AutoModelForCausalLM.from_pretrained(tiny["a"]).eval()
    ids = AutoTokenizer.from_pretrained(tiny["tokenizer"]).encode("hello there")
    hidden = member.prefill([0], [ids]).hidden
    torch.testing.assert_close(ref.lm_head(hidden), ref(torch.tensor([ids])).logits[:, -1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_packed_step_equals_no_cache_forwards_and_writes_only_its_cells(tiny):
    """``packed``: decode rows and two prompts' chunks (one new, one continued) in one forward give
    the no-cache logits of every row, the prompt NLL so far, and touch no other cache cell; the
    rows then decode exactly."""
    member = _member(tiny["a"])
    ref = AutoModelForCausalLM.from_pretrained(tiny["a"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    seqs = {0: tok.encode("The quick brown fox"), 1: tok.encode("2 +")}
    member.prefill([0, 1], [seqs[0], seqs[1]])
    late = tok.encode("Compose models at decoding time instead of merging")
    member.prefill([4], [late[:3]], want_prompt_nll=True)  # a first chunk in; its second goes packed
    kv = member.kv
    before = {key: kv.keys_[0][kv.row_of[key], :, : kv.length_of(key)].clone() for key in kv.keys}
    last = torch.tensor([11, 42])
    for slot, t in zip([1, 0], last.tolist(), strict=True):
        seqs[slot].append(t)
    newcomer = tok.encode("Una frase")
    decoded, chunk = member.packed([1, 0], last, [4, 9], [late[3:7], newcomer], want_prompt_nll=True)
    for row, slot in enumerate([1, 0]):
        torch.testing.assert_close(decoded.logits[row], ref(torch.tensor([seqs[slot]])).logits[0, -1],
                                   atol=1e-4, rtol=1e-4)
    for row, seen in enumerate([late[:7], newcomer]):
        logits = ref(torch.tensor([seen])).logits[0]
        torch.testing.assert_close(chunk.logits[row], logits[-1], atol=1e-4, rtol=1e-4)
        want_nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(seen[1:]))
        torch.testing.assert_close(chunk.prompt_nll[row], want_nll, atol=1e-5, rtol=1e-5)
    keys = kv.keys_[0]
    for key, held in before.items():  # what each row held is untouched (rows joining the decode range may move)
        torch.testing.assert_close(keys[kv.row_of[key], :, : held.shape[1]], held, atol=0, rtol=0)
    for key in kv.keys:  # nothing was written past any row's new length, nor in a free row
        assert not keys[kv.row_of[key], :, kv.length_of(key) :].any()
    assert not keys[len(kv.keys) :].any()
    assert {key: kv.length_of(key) for key in kv.keys} == {0: len(seqs[0]), 1: len(seqs[1]), 4: 7, 9: len(newcomer)}
    member.prefill([4], [late[7:]])  # the rest of the late prompt, then everyone decodes
    seqs[4], seqs[9] = list(late), newcomer
    order = [9, 4, 0, 1]
    last = torch.tensor([5, 6, 7, 8])
    for slot, t in zip(order, last.tolist(), strict=True):
        seqs[slot].append(t)
    got = member.decode(order, last).logits
    for row, slot in enumerate(order):
        torch.testing.assert_close(got[row], ref(torch.tensor([seqs[slot]])).logits[0, -1], atol=1e-4, rtol=1e-4)
