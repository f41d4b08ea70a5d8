"""Quality: does a composition keep each specialist's skill where a weight merge loses it?

    python benchmarks/quality/bench_quality.py [--n 200] [--passages 64] [--general-tokens 48]
                                               [--rows base,merge:linear,...] [--threads T]

Rows (SmolLM2-135M-Instruct and the two LoRA specialists in ``adapters/``, each row greedy):
- ``base``; ``specialist:add``, ``specialist:reverse`` (one adapter each, merged at load);
- ``merge:*``: the weight-merged baselines of ``compose_serve.merge`` over the two specialists:
  linear 0.5/0.5, ties and dare_ties 1/1 at density 0.5 (by default; ``--rows`` also takes
  task_arithmetic 1/1, peft_weighted (PEFT's ``svd``) 1/1 and the MoD weight rule 0.9/0.1);
- ``composition:*``: the two specialists served together: mixture 0.5/0.5 and mixture with
  per-step entropy weights (``--rows`` also takes PackLLM prompt-perplexity weights and logit_mix);
- ``composition:routed``: the built-in ``default``: ``general`` (the base), ``add`` and ``reverse``
  on one shared base, a fitted router picking one member per request (top_k 1);
- ``composition:imsm``: the built-in ``imsm`` (the trained IMSM pair for reverse), on request.
Every skill is scored on HELD-OUT PHRASINGS only (templates neither the specialists nor the
router saw). Columns: exact match on each skill's held-out set (``n`` items, with a Wilson 95%
interval); the share of held-out general prompts (``tasks.heldout("general")``) whose greedy reply
(``--general-tokens`` tokens at most) equals the base model's; the mean NLL per token on general
text (Python's ``pydoc_data`` topics, never trained on; for compositions the fused distribution
under teacher forcing); for compositions the members' mean effective weights on each skill; for the
routed row the routing accuracy over the three held-out sets and its confusion matrix. Merged
models are written once under ``--merge-dir`` and reused.
Results: ``benchmarks/results/quality.{json,csv,png}``.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from conditions import conditions, summary  # noqa: E402

from compose_serve import merge as merging  # noqa: E402
from compose_serve.composition import build_composition  # noqa: E402
from compose_serve.config import parse_composition  # noqa: E402
from compose_serve.members.smollm2 import SMOLLM2_NAME, cache_root  # noqa: E402
from compose_serve.train import evaluate, general_text, tasks  # noqa: E402

SKILLS = ("add", "reverse")
ADAPTERS = {skill: ROOT / "adapters" / skill for skill in SKILLS}
MERGES = {  # name -> (method, weights, extra keyword arguments of merge())
    "linear": ("linear", [0.5, 0.5], {}),
    "task_arithmetic": ("task_arithmetic", [1.0, 1.0], {}),
    "ties": ("ties", [1.0, 1.0], {"density": 0.5}),
    "dare_ties": ("dare_ties", [1.0, 1.0], {"density": 0.5}),
    "peft_weighted": ("peft_weighted", [1.0, 1.0], {"combination": "svd"}),
    "mod_rule": ("mod_rule", [0.9, 0.1], {}),
}
COMPOSITIONS = {  # name -> (method, member weights or None, params)
    "mixture_fixed": ("mixture", [0.5, 0.5], {"weights": "fixed"}),
    "mixture_entropy": ("mixture", None, {"weights": "entropy"}),
    "mixture_prompt_perplexity": ("mixture", None, {"weights": "prompt_perplexity"}),
    "logit_mix": ("logit_mix", [0.5, 0.5], {"weights": "fixed"}),
}
BUILTIN = {"routed": "default", "imsm": "imsm"}  # rows served by a built-in composition
DEFAULT_ROWS = ["base", "specialist:add", "specialist:reverse", "merge:linear", "merge:ties", "merge:dare_ties",
                "composition:mixture_fixed", "composition:mixture_entropy", "composition:routed"]
MEMBERS = ("general", *SKILLS)  # the routed composition's members, in order


def member(name: str, model: str, adapter: Path | None = None, weight: float | None = None) -> dict:
    spec = {"name": name, "model": model, "device": "cpu", "dtype": "float32"}
    if adapter is not None:
        spec.update(adapter=str(adapter), merge_adapter=True)
    if weight is not None:
        spec["weight"] = weight
    return spec


def row_spec(row: str, merge_dir: Path) -> dict:
    """The composition (as a dict) that serves ``row``."""
    kind, _, which = row.partition(":")
    if which in BUILTIN:
        from compose_serve.config import load_composition

        return load_composition(BUILTIN[which]).model_dump(mode="json")
    if kind == "base":
        members = [member("base", SMOLLM2_NAME)]
    elif kind == "specialist":
        members = [member(which, SMOLLM2_NAME, ADAPTERS[which])]
    elif kind == "merge":
        members = [member(which, str(merged_model(which, merge_dir)))]
    else:
        method, weights, params = COMPOSITIONS[which]
        members = [
            member(s, SMOLLM2_NAME, ADAPTERS[s], weights[i] if weights else None)
            for i, s in enumerate(SKILLS)
        ]
        return {"name": row, "method": method, "members": members, "params": params}
    return {"name": row, "method": "mixture", "members": members}


def merged_model(name: str, merge_dir: Path) -> Path:
    """The merged model folder of ``name``, merged now unless an identical merge is there."""
    method, weights, extra = MERGES[name]
    out = merge_dir / name
    record = out / "compose_serve_merge.json"
    inputs = [str(ADAPTERS[s]) for s in SKILLS]
    digests = [merging.adapter_digest(i) for i in inputs]
    if record.is_file():  # the same merge of the same adapter CONTENT (retrained adapters keep their paths)
        done = json.loads(record.read_text())
        if (done["method"], done["weights"], done["inputs"], done.get("input_digests")) == (
                method, weights, inputs, digests) and done.get("density") == extra.get("density", done.get("density")):
            return out
    started = time.perf_counter()
    merging.merge(
        method, SMOLLM2_NAME, inputs, weights, out, cache=merge_dir / "adapters-merged", **extra
    )
    print(f"  merged {name} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return out


def shown(path: str) -> str:
    """A member as the results show it: repo-relative for adapters, ``merges/NAME`` for merges."""
    if Path(path).is_relative_to(ROOT):
        return str(Path(path).relative_to(ROOT))
    return f"merges/{Path(path).name}" if Path(path).is_absolute() else path


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson 95% interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def general_replies(composition, prompts: list[tasks.Example], max_tokens: int, max_batch: int) -> list[str]:
    return [c.text for c in evaluate.complete(composition, prompts, max_tokens=max_tokens, max_batch=max_batch)]


def routing(completions: dict[str, list]) -> dict:
    """Routing accuracy and confusion matrix (rows: true member, columns: chosen) from the first
    token's router diagnostics of each held-out set's completions."""
    confusion = [[0] * len(MEMBERS) for _ in MEMBERS]
    for true, items in completions.items():
        for c in items:
            probs = c.diagnostics[0]["router"]
            confusion[MEMBERS.index(true)][MEMBERS.index(max(probs, key=probs.get))] += 1
    total = sum(map(sum, confusion))
    return {"members": list(MEMBERS), "confusion": confusion,
            "accuracy": sum(confusion[i][i] for i in range(len(MEMBERS))) / max(total, 1), "n": total}


def measure(row: str, spec: dict, n: int, texts: list[str], max_batch: int, general: list, base_replies,
            general_tokens: int) -> dict:
    """Accuracy on each skill, general replies against the base's, general-text NLL of one row."""
    started = time.perf_counter()
    composition = build_composition(parse_composition(spec))
    result = {
        "row": row,
        "method": spec["method"],
        "members": [shown(m.get("adapter") or m["model"]) for m in spec["members"]],
        "weights": [m.get("weight") for m in spec["members"]],
        "params": spec.get("params", {}),
    }
    routed = composition.method.router is not None
    by_set = {}
    for skill in SKILLS:
        examples = tasks.heldout(skill, n)
        acc, completions = evaluate.task_accuracy(composition, examples, max_batch=max_batch)
        by_set[skill] = completions
        correct = round(acc * n)
        result[skill] = {
            "accuracy": acc,
            "n": n,
            "ci95": wilson(correct, n),
            "examples": [
                [e.answer, c.text] for e, c in zip(examples[:5], completions, strict=False)
            ],
        }
        if len(spec["members"]) > 1:
            result[skill]["mean_weights"] = evaluate.mean_member_weights(completions)
        print(f"  {row} {skill}: {acc:.3f} (n={n})", file=sys.stderr)
    completions = evaluate.complete(composition, general, max_tokens=general_tokens, max_batch=max_batch)
    replies = [c.text for c in completions]
    by_set["general"] = completions
    if base_replies is not None:
        same = sum(a == b for a, b in zip(replies, base_replies, strict=True))
        result["general_same_as_base"] = {"share": same / len(general), "same": same, "n": len(general),
                                          "max_tokens": general_tokens,
                                          "examples": [[e.prompt, r] for e, r in zip(general[:5], replies, strict=False)]}
        print(f"  {row} general replies equal to the base's: {same}/{len(general)}", file=sys.stderr)
    if routed:
        result["routing"] = routing(by_set)
        print(f"  {row} routing accuracy {result['routing']['accuracy']:.3f}: {result['routing']['confusion']}",
              file=sys.stderr)
    result["_general_replies"] = replies
    batches = general_text.token_batches(composition.tokenizer, texts, batch_size=4)
    nll = general_text.mean_nll(evaluate.composition_scorer(composition), batches)
    result["general_nll"] = {
        "mean": nll.mean,
        "tokens": nll.tokens,
        "per_passage": summary(nll.per_text),
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(f"  {row} nll: {nll.mean:.4f} ({result['seconds']} s)", file=sys.stderr)
    del composition
    gc.collect()
    return result


def check_targets(results: list[dict]) -> list[str]:
    """Issue 12's targets for the routed row, each as a line saying met or MISSED, with numbers."""
    by = {r["row"]: r for r in results}
    routed = by.get("composition:routed")
    if routed is None:
        return []
    lines = []
    acc = routed["routing"]["accuracy"]
    lines.append(f"routing accuracy {acc:.3f} (target >= 0.95): {'met' if acc >= 0.95 else 'MISSED'}")
    for skill in SKILLS:
        spec = by.get(f"specialist:{skill}")
        if spec is None:
            continue
        gap = spec[skill]["accuracy"] - routed[skill]["accuracy"]
        lines.append(f"{skill}: routed {routed[skill]['accuracy']:.3f} vs specialist {spec[skill]['accuracy']:.3f}, "
                     f"gap {100 * gap:.1f} points (target <= 2): {'met' if gap <= 0.02 else 'MISSED'}")
    share = (routed.get("general_same_as_base") or {}).get("share")
    if share is not None:
        lines.append(f"general replies equal to the base's: {share:.3f} (target >= 0.95): "
                     f"{'met' if share >= 0.95 else 'MISSED'}")
    return lines


def csv_rows(results: list[dict]) -> list[dict]:
    out = []
    for r in results:
        flat = {"row": r["row"], "method": r.get("method"), "status": r.get("status", "measured")}
        for skill in SKILLS:
            s = r.get(skill) or {}
            flat[f"{skill}_accuracy"] = s.get("accuracy")
            flat[f"{skill}_n"] = s.get("n")
            flat[f"{skill}_ci95_low"], flat[f"{skill}_ci95_high"] = s.get("ci95", (None, None))
        flat["general_same_as_base"] = (r.get("general_same_as_base") or {}).get("share")
        flat["routing_accuracy"] = (r.get("routing") or {}).get("accuracy")
        flat["general_nll"] = (r.get("general_nll") or {}).get("mean")
        flat["seconds"] = r.get("seconds")
        out.append(flat)
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in results if "general_nll" in r]
    names = [r["row"] for r in measured]
    fig, (ax_acc, ax_nll) = plt.subplots(
        1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [2, 1]}
    )
    width = 0.4
    for i, skill in enumerate(SKILLS):
        xs = [j + (i - 0.5) * width for j in range(len(names))]
        accs = [r[skill]["accuracy"] for r in measured]
        errs = [
            [a - r[skill]["ci95"][0] for a, r in zip(accs, measured, strict=True)],
            [r[skill]["ci95"][1] - a for a, r in zip(accs, measured, strict=True)],
        ]
        ax_acc.bar(
            xs, accs, width, yerr=errs, capsize=2, label=f"{skill} (n={measured[0][skill]['n']})"
        )
    ax_acc.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax_acc.set_ylabel("exact match (greedy), Wilson 95% interval")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend()
    nlls = [r["general_nll"]["mean"] for r in measured]
    ax_nll.barh(names, nlls, color="gray")
    for y, value in enumerate(nlls):
        ax_nll.text(value, y, f" {value:.3f}", va="center", fontsize=8)
    ax_nll.set_xlim(min(nlls) - 0.3, max(nlls) + 0.25)  # the differences, not the bulk
    ax_nll.invert_yaxis()
    ax_nll.tick_params(axis="y", labelsize=8)
    ax_nll.set_xlabel("general-text NLL (nats/token, lower is better)")
    fig.suptitle("SmolLM2-135M-Instruct: specialists, weight merges and decoding-time compositions")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--n", type=int, default=tasks.HELDOUT_SIZE, help="held-out items per skill"
    )
    parser.add_argument("--general-tokens", type=int, default=48, help="max tokens of a general reply")
    parser.add_argument("--passages", type=int, default=general_text.PASSAGES)
    parser.add_argument("--rows", default=None, help="comma-separated subset of the rows")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--merge-dir", type=Path, default=cache_root() / "bench-merges")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from quality.json")
    args = parser.parse_args(argv)
    if args.plot_only:
        plot(json.loads((args.out / "quality.json").read_text())["rows"], args.out / "quality.png")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = args.rows.split(",") if args.rows else DEFAULT_ROWS
    if "base" in rows:
        rows = ["base", *[r for r in rows if r != "base"]]  # the general replies are compared to it
    texts = general_text.passages(args.passages)
    general = tasks.heldout("general", 10_000)
    results, base_replies = [], None
    for row in rows:
        print(f"{row}", file=sys.stderr)
        result = measure(row, row_spec(row, args.merge_dir), args.n, texts, args.max_batch, general,
                         base_replies, args.general_tokens)
        replies = result.pop("_general_replies")
        if row == "base":
            base_replies = replies
            result["general_same_as_base"] = {"share": 1.0, "same": len(general), "n": len(general),
                                              "max_tokens": args.general_tokens}
        results.append(result)
    targets = check_targets(results)
    for line in targets:
        print(line, file=sys.stderr)
    settings = {
        "command": " ".join(
            ["python", "benchmarks/quality/bench_quality.py", *(argv or sys.argv[1:])]
        ),
        "n": args.n,
        "general_prompts": len(general),
        "general_tokens": args.general_tokens,
        "passages": args.passages,
        "max_tokens": {s: tasks.get_task(s).max_answer_tokens for s in SKILLS},
        "general_text": "pydoc_data.topics (this Python), first passages of ~600 chars, <=128 tokens",
        "merges": {k: {"method": m, "weights": w, **x} for k, (m, w, x) in MERGES.items()},
        "decoding": "greedy (temperature 0), engine library API, chat template",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(
        json.dumps(
            {"conditions": conditions(benchmark="quality", **settings), "rows": results, "targets": targets},
            indent=2
        )
        + "\n"
    )
    table = csv_rows(results)
    with (args.out / "quality.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    plot(results, args.out / "quality.png")
    for r in table:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
