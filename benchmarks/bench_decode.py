"""Decode throughput of the engine on SmolLM2-135M-Instruct against transformers' ``generate``.

    python benchmarks/bench_decode.py [--tokens 64] [--repeats 3] [--batches 1 8]

Rows (each at every batch size, greedy, ``--tokens`` new tokens per sequence, prefill included
on both sides, one warm-up run skipped, median of ``--repeats``):
- ``hf_generate``: ``model.generate`` on the plain model, what a user would run instead;
- ``engine_one``: this engine, one member;
- ``engine_mixture_k2``: a K=2 mixture (two copies of SmolLM2, weights 0.5/0.5);
- ``engine_lora``: one member with an unmerged LoRA adapter (rank 16, all linear layers);
- ``engine_siamese_gate``: the siamese pair (base + that adapter in one forward) with an IMSM gate.
The adapter and gate are random (throughput does not depend on their values) and built in a
temporary folder. Ratios against the baselines of the same run are written beside the numbers:
one member / generate (target >= 1.0), mixture / one member (>= 0.48), siamese / LoRA (>= 0.8 at B=8).
Results: ``benchmarks/results/decode_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conditions import conditions, summary  # noqa: E402

from compose_serve.composition import build_composition  # noqa: E402
from compose_serve.config import parse_composition  # noqa: E402
from compose_serve.engine import Engine, Request  # noqa: E402
from compose_serve.members.smollm2 import smollm2_dir  # noqa: E402
from compose_serve.methods.interweave import ImsmGate  # noqa: E402
from compose_serve.sampling import SamplingParams  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"


def make_adapter_and_gate(root: Path, model_dir: Path) -> tuple[Path, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(root / "lora")
    ImsmGate(base.config.hidden_size, rank=8).save(root / "gate")
    return root / "lora", root / "gate"


def time_hf_generate(model, prompt_ids, batch, tokens, repeats) -> list[float]:
    ids = torch.tensor([prompt_ids] * batch)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                  do_sample=False, pad_token_id=0)
    rates = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        model.generate(ids, **kwargs)
        if i:  # the first run warms up
            rates.append(batch * tokens / (time.perf_counter() - started))
    return rates


def time_engine(composition, prompt_ids, batch, tokens, repeats) -> list[float]:
    engine = Engine(composition, max_batch=batch)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    rates = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        engine.generate([Request(list(prompt_ids), params) for _ in range(batch)])
        if i:
            rates.append(batch * tokens / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 when the CPU is shared)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = smollm2_dir()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    root = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    lora, gate = make_adapter_and_gate(root, model_dir)
    smol = {"model": "smollm2-135m-instruct", "device": device}
    compositions = {
        "engine_one": {"method": "mixture", "members": [{"name": "s", **smol}]},
        "engine_mixture_k2": {"method": "mixture", "members": [{"name": "x", **smol, "weight": 0.5},
                                                               {"name": "y", **smol, "weight": 0.5}]},
        "engine_lora": {"method": "mixture", "members": [{"name": "l", **smol, "adapter": str(lora)}]},
        "engine_siamese_gate": {"method": "interweave", "params": {"gate": str(gate)},
                                "members": [{"name": "p", **smol, "adapter": str(lora)}]},
    }
    hf = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    prompt_ids = AutoTokenizer.from_pretrained(model_dir).encode(PROMPT)
    rows: dict[str, dict[int, dict]] = {"hf_generate": {}}
    for batch in args.batches:
        rows["hf_generate"][batch] = summary(time_hf_generate(hf, prompt_ids, batch, args.tokens, args.repeats))
        print(f"hf_generate B={batch}: {rows['hf_generate'][batch]['median']:.1f} tokens/s", file=sys.stderr)
    del hf
    for name, body in compositions.items():
        composition = build_composition(parse_composition({"name": name, **body}))
        rows[name] = {}
        for batch in args.batches:
            rows[name][batch] = summary(time_engine(composition, prompt_ids, batch, args.tokens, args.repeats))
            print(f"{name} B={batch}: {rows[name][batch]['median']:.1f} tokens/s", file=sys.stderr)
        del composition

    def ratio(a: str, b: str, batch: int) -> float:
        return rows[a][batch]["median"] / rows[b][batch]["median"]

    ratios = {batch: {"one_member_vs_generate": ratio("engine_one", "hf_generate", batch),
                      "mixture_k2_vs_one_member": ratio("engine_mixture_k2", "engine_one", batch),
                      "siamese_gate_vs_lora": ratio("engine_siamese_gate", "engine_lora", batch)}
              for batch in args.batches}
    import os

    result = {"benchmark": "decode", "unit": "output tokens/s (prefill included), median over repeats",
              "conditions": conditions(model="SmolLM2-135M-Instruct", dtype="float32", device=device,
                                       prompt_tokens=len(prompt_ids), new_tokens=args.tokens,
                                       repeats=args.repeats, lora_rank=16, gate_rank=8,
                                       load_average=os.getloadavg()),
              "targets": {"one_member_vs_generate": 1.0, "mixture_k2_vs_one_member": 0.48,
                          "siamese_gate_vs_lora_at_b8": 0.8},
              "rows": rows, "ratios": ratios}
    out = args.out or Path(__file__).resolve().parent / "results" / f"decode_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(ratios, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
