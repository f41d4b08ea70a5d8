"""lm-evaluation-harness against the server: multiple-choice accuracy of the routed composition,
its base alone, the dense mixture and a TIES merge, on the held-out add and reverse skills.

    OMP_NUM_THREADS=1 python benchmarks/quality/bench_lm_eval.py [--items 50] [--torch-threads 1]

What a practitioner does with a model server: lm-eval's ``local-completions`` model (token-id
requests with ``echo``, ``logprobs`` and ``max_tokens`` 1, scored from the prompt log-probs the
server returns) on two tasks written here over local JSONL files: each held-out prompt of
``compose_serve.train.tasks`` (phrasings no training run saw) as the chat-templated context, and
four answers to rank by log-likelihood: the gold one and three near misses (add: the sum +1, -1
and +10; reverse: the letters in the original order, the reversal with its first two letters
swapped, and the reversal rotated by one). One in-process server (``compose-serve serve
--in-process``) serves every model, so every request goes through HTTP as a user's would. The
accuracies, the items and the wall time per model go to ``benchmarks/results/lm_eval_<device>.json``
with the conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "serving"))
sys.path.insert(0, str(ROOT / "benchmarks" / "quality"))
from bench_load import start_server, stop_server  # noqa: E402
from bench_quality import merged_model  # noqa: E402
from conditions import conditions  # noqa: E402

from compose_serve.members.smollm2 import cache_root, smollm2_dir  # noqa: E402

#: served name -> what it is
MODELS = {
    "routed": "built-in default: general + add + reverse on one shared base, router top_k 1",
    "general": "SmolLM2-135M-Instruct alone (the routed composition's base member, served alone)",
    "specialists": "built-in mixture: add + reverse LoRA specialists, mixture 0.5/0.5",
    "merged": "TIES merge (1/1, density 0.5) of adapters/add and adapters/reverse into SmolLM2",
}


def add_choices(answer: str) -> list[str]:
    """The gold sum first, then three near misses."""
    s = int(answer)
    return [str(s), str(s + 1), str(s - 1), str(s + 10)]


def reverse_choices(answer: str) -> list[str]:
    """The gold reversal first, then the original order, the first two swapped, and a rotation
    (all distinct: letters of a word that reads the same backwards get a fourth variant)."""
    letters = answer.split()
    variants = [letters[::-1], [letters[1], letters[0], *letters[2:]], letters[1:] + letters[:1],
                letters[-1:] + letters[:-1], letters[2:] + letters[:2]]
    out = [answer]
    for variant in variants:
        text = " ".join(variant)
        if text not in out:
            out.append(text)
    return out[:4]


def write_tasks(folder: Path, items: int) -> dict[str, int]:
    """The two task YAMLs and their JSONL files in ``folder``; returns the items per task."""
    from transformers import AutoTokenizer

    from compose_serve.train import tasks

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    counts = {}
    for task, choices in (("add", add_choices), ("reverse", reverse_choices)):
        rows = []
        for example in tasks.heldout(task, items):
            context = tok.apply_chat_template(example.messages(), tokenize=False, add_generation_prompt=True)
            options = choices(example.answer)
            if len(options) == 4:
                rows.append({"context": context, "choices": options, "answer": 0})
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"heldout_{task}.yaml").write_text(yaml.safe_dump({
            "task": f"heldout_{task}",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(folder / f"{task}.jsonl")}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "answer",
            "target_delimiter": "",  # the answer follows the assistant's turn directly
            "metric_list": [{"metric": "acc"}],
        }, sort_keys=False))
        counts[task] = len(rows)
    return counts


def evaluate(url: str, model: str, folder: Path) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    results = simple_evaluate(
        model="local-completions",
        model_args={"model": model, "base_url": url + "/completions", "tokenizer": str(smollm2_dir()),
                    "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_length": 2048,
                    "max_retries": 1},
        tasks=["heldout_add", "heldout_reverse"],
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        batch_size=8,
        bootstrap_iters=0,
    )
    accuracy = {task.removeprefix("heldout_"): r["acc,none"] for task, r in results["results"].items()}
    return {"accuracy": accuracy, "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=50, help="held-out prompts per task")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--merge-dir", type=Path, default=cache_root() / "bench-merges")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lm_eval_cpu.json")
    args = parser.parse_args(argv)
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    folder = Path(tempfile.mkdtemp(prefix="bench-lm-eval-"))
    counts = write_tasks(folder, args.items)
    merged = folder / "merged.yaml"
    merged.write_text(yaml.safe_dump({"name": "merged", "method": "mixture", "members": [
        {"name": "merged", "model": str(merged_model("ties", args.merge_dir))}]}))
    load_before = os.getloadavg()
    proc, url = start_server(["default", "mixture", str(merged)], 8, args.torch_threads)
    rows = {}
    try:
        for model in args.models:
            rows[model] = evaluate(url, model, folder)
            acc = rows[model]["accuracy"]
            print(f"{model}: add {acc['add']:.3f}, reverse {acc['reverse']:.3f} "
                  f"({rows[model]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    finally:
        stop_server(proc)
    from importlib import metadata

    result = {
        "what": "lm-eval local-completions multiple-choice accuracy (acc: the gold answer has the highest "
                "log-likelihood of 4) on held-out phrasings, through the server's prompt log-probs",
        "items": counts, "models": {m: {"description": MODELS[m], **rows[m]} for m in rows},
        "ratios_vs_merged": {m: {t: rows[m]["accuracy"][t] / max(rows["merged"]["accuracy"][t], 1e-9)
                                 for t in counts} for m in rows} if "merged" in rows else {},
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "conditions": conditions(model="SmolLM2-135M-Instruct and the committed adapters", dtype="float32",
                                 device="cpu", command=" ".join(["python", *sys.argv]),
                                 lm_eval=metadata.version("lm-eval")),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
