"""``compose-serve train``: LoRA fine-tuning of a member on one of the project's generated tasks.

    compose-serve train --task add|reverse --out DIR [--model NAME|DIR] [--steps N] [--rank R]
                        [--alpha A] [--lr LR] [--batch-size B] [--seed S] [--eval N]
                        [--targets q_proj,v_proj,...] [--threads T] [--device cpu]

Writes the PEFT adapter (safetensors) and ``train_run.json`` into ``--out``; with ``--eval N`` also
scores the trained member greedily on the task's first ``N`` held-out items and records the accuracy
in ``train_run.json``. The progress bar goes to stderr; one summary line goes to stdout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .tasks import GRADED_TASKS


def add_train(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on an argparse ``subparsers`` object; sets ``func=run_train``."""
    from .lora import TrainSettings

    d = TrainSettings(task="add")
    p = subparsers.add_parser("train", help="LoRA fine-tune a member on a generated task")
    p.add_argument("--task", required=True, choices=GRADED_TASKS)
    p.add_argument("--out", required=True, help="folder for the adapter and train_run.json")
    p.add_argument("--model", default=d.model, help="base model: a folder or smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default: 2 * rank)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--targets", default=",".join(d.target_modules), help="comma-separated module names"
    )
    p.add_argument(
        "--eval", type=int, default=0, metavar="N", help="score N held-out items after training"
    )
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=run_train)
    return p


def run_train(args) -> int:
    """Train as ``args`` say, save, optionally evaluate; returns the exit status (0)."""
    from ..errors import ConfigError
    from .lora import TrainSettings, invocation, train_lora

    for name in ("steps", "batch_size", "rank"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1", param=name)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = TrainSettings(
        task=args.task,
        model=args.model,
        steps=args.steps,
        batch_size=args.batch_size,
        rank=args.rank,
        alpha=args.alpha if args.alpha is not None else 2 * args.rank,
        lr=args.lr,
        seed=args.seed,
        target_modules=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        device=args.device,
    )
    result = train_lora(settings, args.out, command=invocation())
    line = f"trained {args.task} in {result.seconds:.0f} s, final loss {result.final_loss:.4f}"
    if args.eval:
        acc = evaluate_adapter(settings.model, args.out, args.task, args.eval, settings.device)
        line += f", held-out exact match {acc:.3f} (n={args.eval})"
    print(line)
    return 0


def evaluate_adapter(model: str, adapter: str, task: str, n: int, device: str = "cpu") -> float:
    """Greedy exact match of ``model`` + ``adapter`` on ``n`` held-out items; recorded in the run."""
    from ..composition import build_composition
    from ..config import parse_composition
    from .evaluate import task_accuracy
    from .tasks import heldout

    spec = parse_composition(
        {
            "name": f"{task}-lora",
            "method": "mixture",
            "members": [
                {
                    "name": task,
                    "model": model,
                    "adapter": str(Path(adapter).resolve()),
                    "device": device,
                }
            ],
        }
    )
    acc, _ = task_accuracy(build_composition(spec), heldout(task, n))
    run_file = Path(adapter) / "train_run.json"
    run = json.loads(run_file.read_text())
    run["heldout_exact_match"] = {"accuracy": acc, "n": n}
    run_file.write_text(json.dumps(run, indent=2) + "\n")
    return acc
