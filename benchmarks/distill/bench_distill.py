"""Compose, then compress: a LoRA student distilled from the K=2 composition, against the rest.

    python benchmarks/distill/bench_distill.py [--steps 240] [--lr 1e-3] [--rank 64] [--n 200]
                                               [--n-kl 100] [--threads 1] [--retrain]

Teacher: the built-in ``mixture`` composition (the ``add`` and ``reverse`` LoRA specialists of
SmolLM2-135M-Instruct mixed 0.5/0.5). Two students, SmolLM2-135M-Instruct with a fresh LoRA on
every linear layer, the same data (the generated ``add`` and ``reverse`` train items, round-robin,
gold answers), seed, steps and optimiser:
- ``student:kd``: ``compose-serve distill`` with LLM-NEO's loss at ``lam`` (default 0.5);
- ``student:ce``: the same with ``lam = 0``: plain fine-tuning on the same data, no teacher.
Rows: the composition, each specialist, the best weight merge of the quality benchmark (TIES), the
base, and both students (adapters merged at load, as the quality benchmark serves specialists).
Columns: greedy exact match on each skill's first ``n`` held-out items (Wilson 95% interval);
KL(composition || row) per reply token over the first ``n_kl`` held-out items of each skill
(prompt + gold reply, teacher-forced; the composition's fused distribution against the row's);
decode tokens/s of the engine at batch 8, 32 tokens per sequence (EOS ignored), median of 3.
Students are trained once into ``--work`` and reused unless ``--retrain``. With ``--reuse-quality``
the accuracy of the rows the quality benchmark also has (composition = its ``mixture_fixed``,
specialists, TIES, base) is read from ``results/quality.json`` instead of measured again (the same
held-out items through the same greedy engine path); KL and tokens/s are measured here for all. Results:
``benchmarks/results/distill.{json,csv}``.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "quality"))
from bench_quality import ADAPTERS, SKILLS, member, merged_model, wilson  # noqa: E402
from conditions import conditions  # noqa: E402

from compose_serve.composition import build_composition  # noqa: E402
from compose_serve.config import load_composition, parse_composition  # noqa: E402
from compose_serve.engine import Engine, Request  # noqa: E402
from compose_serve.members.smollm2 import SMOLLM2_NAME, cache_root  # noqa: E402
from compose_serve.sampling import SamplingParams  # noqa: E402
from compose_serve.train import evaluate, tasks  # noqa: E402
from compose_serve.train.distill import DistillSettings, distill  # noqa: E402
from compose_serve.train.teacher import FusedTeacher, teacher_kl  # noqa: E402

ROWS = ("composition", "specialist:add", "specialist:reverse", "merge:ties", "base", "student:kd",
        "student:ce")


def row_spec(row: str, work: Path, merge_dir: Path) -> dict:
    """The composition (a dict) that serves ``row``."""
    if row == "composition":
        return load_composition("mixture").model_dump(mode="json")
    kind, _, which = row.partition(":")
    if kind == "specialist":
        members = [member(which, SMOLLM2_NAME, ADAPTERS[which])]
    elif kind == "merge":
        members = [member(which, str(merged_model(which, merge_dir)))]
    elif kind == "student":
        members = [member(row.replace(":", "-"), SMOLLM2_NAME, work / which)]
    else:
        members = [member("base", SMOLLM2_NAME)]
    return {"name": row, "method": "mixture", "members": members}


def train_student(which: str, args, teacher) -> dict:
    """Distil (``kd``) or fine-tune (``ce``) into ``args.work / which``; returns its report."""
    out = args.work / which
    report_file = out / "distill_report.json"
    settings = DistillSettings(
        task=",".join(SKILLS), model=SMOLLM2_NAME, config="mixture", steps=args.steps,
        batch_size=args.batch_size, rank=args.rank, alpha=2 * args.rank, lr=args.lr,
        lam=args.lam if which == "kd" else 0.0, seed=0,
    )
    if report_file.is_file() and not args.retrain:
        report = json.loads(report_file.read_text())
        if report["settings"] == json.loads(json.dumps(asdict(settings))):
            print(f"  reusing {out}", file=sys.stderr)
            return report
    return distill(settings, out, command=f"bench_distill {which}",
                   composition=teacher if which == "kd" else None)


def tokens_per_second(composition, batch: int = 8, tokens: int = 32, repeats: int = 3) -> dict:
    """Engine decode rate at ``batch`` sequences of ``tokens`` each (EOS ignored), greedy."""
    items = tasks.heldout("add", batch)
    prompts = [evaluate.prompt_ids(composition.tokenizer, e) for e in items]
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    engine = Engine(composition, max_batch=batch)
    engine.generate([Request(prompts[0], SamplingParams(max_tokens=4, temperature=0.0))])  # warm-up
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.generate([Request(p, params) for p in prompts])
        rates.append(batch * tokens / (time.perf_counter() - started))
    return {"median": statistics.median(rates), "all": rates, "batch": batch, "tokens": tokens}


QUALITY_ROWS = {"composition": "composition:mixture_fixed", "specialist:add": "specialist:add",
                "specialist:reverse": "specialist:reverse", "merge:ties": "merge:ties", "base": "base"}


def quality_accuracy(row: str, skill: str, n: int) -> float | None:
    """The row's accuracy from ``results/quality.json`` (same held-out items, same greedy engine
    path), when that run scored the same ``n``; None otherwise."""
    path = ROOT / "benchmarks" / "results" / "quality.json"
    if row not in QUALITY_ROWS or not path.is_file():
        return None
    for r in json.loads(path.read_text())["rows"]:
        if r["row"] == QUALITY_ROWS[row] and r.get(skill, {}).get("n") == n:
            return r[skill]["accuracy"]
    return None


def measure(row: str, spec: dict, teacher: FusedTeacher, args) -> dict:
    started = time.perf_counter()
    composition = build_composition(parse_composition(spec))
    result: dict = {"row": row, "members": [m.get("adapter") or m["model"] for m in spec["members"]]}
    scored = FusedTeacher(composition)
    for skill in SKILLS:
        acc = quality_accuracy(row, skill, args.n) if args.reuse_quality else None
        result[f"{skill}_accuracy_source"] = "results/quality.json" if acc is not None else "measured here"
        if acc is None:
            acc, _ = evaluate.task_accuracy(composition, tasks.heldout(skill, args.n), max_batch=32)
        kl = 0.0 if row == "composition" else teacher_kl(teacher, scored, tasks.heldout(skill, args.n_kl))
        result[skill] = {"accuracy": acc, "n": args.n, "ci95": wilson(round(acc * args.n), args.n),
                         "kl_to_composition": kl, "n_kl": args.n_kl}
        print(f"  {row} {skill}: acc {acc:.3f}, KL {kl:.4f}", file=sys.stderr)
    result["tokens_per_s"] = tokens_per_second(composition)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(f"  {row}: {result['tokens_per_s']['median']:.1f} tokens/s", file=sys.stderr)
    del composition, scored
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--n", type=int, default=tasks.HELDOUT_SIZE, help="held-out items per skill (accuracy)")
    parser.add_argument("--n-kl", type=int, default=100, help="held-out items per skill (KL)")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--reuse-quality", action="store_true",
                        help="take the accuracy of the non-student rows from results/quality.json")
    parser.add_argument("--work", type=Path, default=cache_root() / "bench-distill")
    parser.add_argument("--merge-dir", type=Path, default=cache_root() / "bench-merges")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = args.rows.split(",")
    default = build_composition(load_composition("mixture"))  # the teacher, loaded once
    training = {}
    for which in ("kd", "ce"):
        if f"student:{which}" in rows:
            print(f"training student:{which}", file=sys.stderr)
            report = train_student(which, args, default)
            training[which] = {k: report[k] for k in ("seconds", "final_loss", "trainable_parameters", "settings")}
            training[which]["first_parts"] = report["history_every_10"][0]
            training[which]["last_parts"] = report["history_every_10"][-1]
    teacher = FusedTeacher(default)
    results = []
    for row in rows:
        print(row, file=sys.stderr)
        results.append(measure(row, row_spec(row, args.work, args.merge_dir), teacher, args))
    report = {
        "conditions": conditions(
            benchmark="distill",
            command=" ".join(["python", "benchmarks/distill/bench_distill.py", *(argv or sys.argv[1:])]),
            teacher="built-in default: add + reverse LoRA specialists, mixture 0.5/0.5",
            data="generated add and reverse train items, round-robin, gold answers",
            kl="KL(composition || row) per reply token, prompt + gold reply teacher-forced",
            decoding="greedy; tokens/s: engine, batch 8, 32 tokens, EOS ignored, median of 3",
            load_average_end=list(os.getloadavg()),
        ),
        "training": training,
        "rows": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distill.json").write_text(json.dumps(report, indent=2) + "\n")
    with (args.out / "distill.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", *[f"{s}_{k}" for s in SKILLS for k in ("accuracy", "kl")], "tokens_per_s"])
        for r in results:
            writer.writerow([r["row"], *[r[s][k] for s in SKILLS for k in ("accuracy", "kl_to_composition")],
                             r["tokens_per_s"]["median"]])
    for r in results:
        print(r["row"], {s: (r[s]["accuracy"], round(r[s]["kl_to_composition"], 4)) for s in SKILLS},
              round(r["tokens_per_s"]["median"], 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
