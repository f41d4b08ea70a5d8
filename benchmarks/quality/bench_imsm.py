"""IMSM against the plain LoRA adapter, same task and same training budget, on SmolLM2.

    python benchmarks/quality/bench_imsm.py [--task reverse] [--steps 60] [--n 200]

Trains IMSM (adapter + gate jointly) with exactly the settings of the committed plain LoRA adapter
``adapters/<task>`` (rank, alpha, dropout, learning rate, steps, batch size, seed, data stream; the
gate at the paper's 1e-3), then measures for the base, the LoRA adapter and IMSM: exact-match
accuracy on ``--n`` held-out items (greedy, through the engine) and the forgetting score, the mean
NLL per token on held-out general text (Python's own docs, never trained on; for IMSM the first half
of each passage plays the prompt whose means feed the gate). Writes
``benchmarks/results/quality_imsm.json`` with the conditions and the training commands.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conditions import conditions  # noqa: E402

from compose_serve.composition import build_composition  # noqa: E402
from compose_serve.config import load_composition, parse_composition  # noqa: E402
from compose_serve.members.hf import attach_adapter, load_causal_lm, load_tokenizer  # noqa: E402
from compose_serve.methods.interweave import ImsmGate  # noqa: E402
from compose_serve.train.evaluate import task_accuracy  # noqa: E402
from compose_serve.train.general_text import mean_nll, model_scorer, passages, token_batches  # noqa: E402
from compose_serve.train.imsm import ImsmSettings, imsm_scorer, train_imsm  # noqa: E402
from compose_serve.train.tasks import heldout  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--task", default="reverse")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--passages", type=int, default=32)
    parser.add_argument("--work", type=Path, default=None, help="where the IMSM run is saved")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lora_dir = ROOT / "adapters" / args.task
    lora_run = json.loads((lora_dir / "train_run.json").read_text())
    ls = lora_run["settings"]
    settings = ImsmSettings(task=args.task, model=ls["model"], steps=ls["steps"], batch_size=ls["batch_size"],
                            rank=ls["rank"], alpha=ls["alpha"], dropout=ls["dropout"], lr=ls["lr"],
                            weight_decay=ls["weight_decay"], warmup=ls["warmup"], seed=ls["seed"],
                            target_modules=tuple(ls["target_modules"]))
    work = args.work or Path(tempfile.mkdtemp(prefix="imsm-"))
    command = (f"compose-serve train-imsm --task {args.task} --out {shlex.quote(str(work))} --steps {settings.steps} "
               f"--batch-size {settings.batch_size} --rank {settings.rank} --alpha {settings.alpha} "
               f"--dropout {settings.dropout} --lr {settings.lr} --seed {settings.seed}")
    result, composition_path = train_imsm(settings, work, command)
    print(f"imsm trained: loss {result.losses[0]:.3f} -> {result.final_loss:.3f} in {result.seconds:.0f} s",
          file=sys.stderr)

    examples = heldout(args.task, args.n)
    model = settings.model
    rows = {}
    compositions = {
        "base": {"method": "mixture", "members": [{"name": "base", "model": model}]},
        "lora": {"method": "mixture", "members": [{"name": "lora", "model": model, "adapter": str(lora_dir)}]},
    }
    for name, body in compositions.items():
        comp = build_composition(parse_composition({"name": name, **body}))
        rows[name] = {"accuracy": task_accuracy(comp, examples)[0]}
        print(name, rows[name], file=sys.stderr)
    imsm = build_composition(load_composition(composition_path))
    rows["imsm"] = {"accuracy": task_accuracy(imsm, examples)[0]}
    print("imsm", rows["imsm"], file=sys.stderr)

    tokenizer = load_tokenizer(model)
    texts = passages(args.passages)
    base_lm = load_causal_lm(model, torch.float32, torch.device("cpu"))
    rows["base"]["general_nll"] = mean_nll(model_scorer(base_lm), token_batches(tokenizer, texts)).mean
    lora_lm = attach_adapter(load_causal_lm(model, torch.float32, torch.device("cpu")), str(lora_dir), merge=True)
    rows["lora"]["general_nll"] = mean_nll(model_scorer(lora_lm), token_batches(tokenizer, texts)).mean
    pair = attach_adapter(load_causal_lm(model, torch.float32, torch.device("cpu")), str(work / "adapter"), merge=False)
    gate = ImsmGate.load(work / "gate", base_lm.config.hidden_size)
    rows["imsm"]["general_nll"] = mean_nll(imsm_scorer(pair, gate), token_batches(tokenizer, texts)).mean
    for name in rows:
        rows[name]["forgetting"] = rows[name]["general_nll"] - rows["base"]["general_nll"]
    out = {"benchmark": "imsm_vs_lora", "task": args.task,
           "conditions": conditions(model=model, n_heldout=args.n, general_passages=args.passages,
                                    lora_command=lora_run["command"], imsm_command=command,
                                    imsm_first_loss=result.losses[0], imsm_final_loss=result.final_loss,
                                    imsm_train_seconds=round(result.seconds, 1)),
           "rows": rows}
    path = ROOT / "benchmarks" / "results" / "quality_imsm.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
