"""lm-evaluation-harness itself against a live server, as against vLLM: ``local-completions`` with
token-id requests (``echo: true, logprobs: 1, max_tokens: 1``), on a multiple-choice task and a
``loglikelihood_rolling`` task written here over local JSONL files (offline).

Every score lm-eval reports is checked against the log-likelihood computed here from each member's
own transformers forward and the mixture ``log sum_k w_k softmax(z_k)`` written out by hand, on
the token ids lm-eval's own encoding gives (its ``_encode_pair``: the context's trailing spaces go
to the continuation, the whole string encoded and split; rolling: the prefix token, then the text).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .live import serve_specs

lm_eval = pytest.importorskip("lm_eval")

WEIGHTS = (0.3, 0.7)
ITEMS = [
    {
        "question": "The quick brown fox jumps over the lazy",
        "choices": ["dog.", "cat.", "fox."],
        "answer": 0,
    },
    {"question": "2 + 2 =", "choices": ["4.", "5.", "22."], "answer": 0},
    {"question": "def add(a, b):\n    return", "choices": ["a + b", "a - b"], "answer": 0},
    {
        "question": "Compose models at decoding",
        "choices": ["time", "weights", "speed"],
        "answer": 0,
    },
]
ROLLING = [{"text": "Every member scores the next token; the composition fuses the scores."}]
ATOL = 1e-4


@pytest.fixture(scope="module")
def server(tiny):
    spec = {
        "name": "tiny-mix",
        "method": "mixture",
        "members": [
            {"name": "a", "model": str(tiny["a"]), "weight": WEIGHTS[0]},
            {"name": "b", "model": str(tiny["b"]), "weight": WEIGHTS[1]},
        ],
        "engine": {"max_batch": 4},
    }
    live, engines = serve_specs([spec])
    yield live
    live.stop()
    for engine in engines.values():
        engine.close(timeout=30)


def _tasks(folder) -> None:
    """Two lm-eval task YAMLs over local JSONL files in ``folder``."""
    (folder / "mc.jsonl").write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (folder / "rolling.jsonl").write_text("".join(json.dumps(item) + "\n" for item in ROLLING))
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n"
    )
    (folder / "tiny_rolling.yaml").write_text(
        "task: tiny_rolling\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'rolling.jsonl'}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\n"
        "doc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n"
    )


class ByHand:
    """The mixture's log-probs of token ids, from the members' own transformers forwards."""

    def __init__(self, tiny) -> None:
        self.models = [AutoModelForCausalLM.from_pretrained(tiny[k]).eval() for k in "ab"]

    def continuation(self, ids: list[int], start: int) -> tuple[float, bool]:
        """Sum of ``log p_mix(ids[t] | ids[:t])`` for t >= start, and whether each is the argmax."""
        with torch.no_grad():
            logprobs = [
                torch.log_softmax(m(torch.tensor([ids])).logits[0].double(), dim=-1)
                for m in self.models
            ]
        mix = torch.log(
            sum(w * lp.exp() for w, lp in zip(WEIGHTS, logprobs, strict=True))
        )  # [L, V]
        picked = [float(mix[t - 1, ids[t]]) for t in range(start, len(ids))]
        greedy = all(int(mix[t - 1].argmax()) == ids[t] for t in range(start, len(ids)))
        return sum(picked), greedy


def _pair_ids(tok, context: str, continuation: str) -> tuple[list[int], int]:
    """lm-eval's ``_encode_pair`` for a causal model: (the whole ids, where the continuation
    starts)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    return whole, len(tok(context, add_special_tokens=False).input_ids)


def test_lm_eval_scores_equal_the_mixture_by_hand(server, tiny, tmp_path, monkeypatch):
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    _tasks(tmp_path)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model="local-completions",
        model_args={
            "model": "tiny-mix",
            "base_url": server.base_url + "/completions",
            "tokenizer": str(tiny["tokenizer"]),
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,
            "max_length": 200,
            "max_retries": 1,
        },
        tasks=["tiny_mc", "tiny_rolling"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        batch_size=3,  # several token-id prompts in one request
        log_samples=True,
        bootstrap_iters=0,
    )
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    by_hand = ByHand(tiny)

    samples = results["samples"]["tiny_mc"]
    assert len(samples) == len(ITEMS)
    correct = 0
    for sample in samples:
        scores = []
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            ids, start = _pair_ids(tok, context, continuation)
            want, greedy = by_hand.continuation(ids, start)
            got, got_greedy = resp[0]
            assert got == pytest.approx(want, abs=ATOL), (context, continuation)
            assert got_greedy == greedy
            scores.append(want)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == sample["target"])
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(correct / len(ITEMS))

    (rolling,) = results["samples"]["tiny_rolling"]
    ids = [tok.eos_token_id] + tok(ROLLING[0]["text"], add_special_tokens=False).input_ids
    assert len(ids) < 200  # one window: the prefix token, then every token of the text
    want, _ = by_hand.continuation(ids, 1)
    assert rolling["resps"][0][0] == pytest.approx(want, abs=ATOL)
