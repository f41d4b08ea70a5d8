"""Decode throughput of the engine on SmolLM2-135M-Instruct against transformers' ``generate``.

    python benchmarks/bench_decode.py [--tokens 64] [--repeats 3] [--batches 1 8]

Rows (each at every batch size, greedy, ``--tokens`` new tokens per sequence, prefill included
on both sides, one warm-up run skipped, median of ``--repeats``):
- ``hf_generate``: ``model.generate`` on the plain model, what a user would run instead;
- ``engine_one``: this engine, one member;
- ``engine_mixture_k2``: a K=2 dense mixture (weights 0.5/0.5) of two LoRA members on one shared
  base (one forward over 2B rows);
- ``engine_lora_peft``: one member with an unmerged LoRA adapter (rank 16, all linear layers) run
  by PEFT (its own ``LoraLayer`` forward), the path before per-row LoRA;
- ``engine_lora``: the same adapter on the shared base's per-row LoRA (``members/row_lora.py``);
- ``engine_lora_merged``: the same adapter merged into the weights (``merge_adapter: true``);
- ``engine_routed_mixed``: three members on one base (the bare base and two adapters), each
  request sent to one of them in turn (one-hot per-request weights, as a top-1 router does), so a
  batch mixes adapters row by row;
- ``engine_siamese_gate``: the siamese pair (base + that adapter in one forward) with an IMSM gate.
Adapters and gate are random (throughput does not depend on their values) and built in a
temporary folder. Ratios against the baselines of the same run are written beside the numbers:
one member / generate (target >= 1.0), per-row LoRA / PEFT LoRA, routed mixed batch / one member,
siamese / LoRA (issue 7's target: >= 0.85 at B=8).
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
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    get_peft_model(base, config).save_pretrained(root / "lora2")
    ImsmGate(base.config.hidden_size, rank=8).save(root / "gate")
    return root / "lora", root / "gate"


def time_hf_generate(model, prompt_ids, batch, tokens, repeats) -> list[float]:
    """Tokens/s of ``model.generate`` (greedy, exactly ``tokens`` new tokens, inputs on the model's device)."""
    ids = torch.tensor([prompt_ids] * batch, device=model.device)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                  do_sample=False, pad_token_id=pad)
    rates = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        model.generate(ids, **kwargs)
        if ids.is_cuda:
            torch.cuda.synchronize()
        if i:  # the first run warms up
            rates.append(batch * tokens / (time.perf_counter() - started))
    return rates


def time_engine(composition, prompt_ids, batch, tokens, repeats, one_hot: bool = False,
                fused_sampling: bool | None = None) -> list[float]:
    """Tokens/s of ``batch`` requests; ``one_hot`` sends request i to member i mod K alone;
    ``fused_sampling`` as ``Engine``'s (None: where the kernels run Triton)."""
    engine = Engine(composition, max_batch=batch, fused_sampling=fused_sampling)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    names = composition.method.member_names

    def weights(i: int):
        return {"weights": {names[i % len(names)]: 1.0}} if one_hot else None

    rates = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        engine.generate([Request(list(prompt_ids), params, composition=weights(j)) for j in range(batch)])
        if i:
            rates.append(batch * tokens / (time.perf_counter() - started))
    return rates


def peft_lora_composition(lora: Path):
    """One member whose unmerged adapter runs through PEFT's own forward (no per-row LoRA)."""
    from compose_serve.composition import Composition, eos_ids
    from compose_serve.members.hf import HFMember, attach_adapter, load_causal_lm, load_tokenizer
    from compose_serve.methods import build_method

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lm = attach_adapter(load_causal_lm("smollm2-135m-instruct", dtype, device), str(lora), merge=False)
    member = HFMember("l", lm, load_tokenizer("smollm2-135m-instruct"))
    spec = parse_composition({"name": "peft", "method": "mixture", "members": [{"name": "l", "model": "x"}]})
    return Composition(spec, [member], build_method(spec), member.tokenizer, member.vocab_size, eos_ids(member))


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
    lora2 = lora.parent / "lora2"
    compositions = {
        "engine_one": {"method": "mixture", "members": [{"name": "s", **smol}]},
        "engine_mixture_k2": {"method": "mixture",
                              "members": [{"name": "x", **smol, "weight": 0.5, "adapter": str(lora)},
                                          {"name": "y", **smol, "weight": 0.5, "adapter": str(lora2)}]},
        "engine_lora_peft": None,  # built by hand below: PEFT's own unmerged forward
        "engine_lora": {"method": "mixture", "members": [{"name": "l", **smol, "adapter": str(lora)}]},
        "engine_lora_merged": {"method": "mixture",
                               "members": [{"name": "l", **smol, "adapter": str(lora), "merge_adapter": True}]},
        "engine_routed_mixed": {"method": "mixture",
                                "members": [{"name": "general", **smol}, {"name": "a", **smol, "adapter": str(lora)},
                                            {"name": "b", **smol, "adapter": str(lora2)}]},
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
        if body is None:
            composition = peft_lora_composition(lora)
        else:
            composition = build_composition(parse_composition({"name": name, **body}))
        rows[name] = {}
        for batch in args.batches:
            rates = time_engine(composition, prompt_ids, batch, args.tokens, args.repeats,
                                one_hot=name == "engine_routed_mixed")
            rows[name][batch] = summary(rates)
            print(f"{name} B={batch}: {rows[name][batch]['median']:.1f} tokens/s", file=sys.stderr)
        del composition

    def ratio(a: str, b: str, batch: int) -> float:
        return rows[a][batch]["median"] / rows[b][batch]["median"]

    ratios = {batch: {"one_member_vs_generate": ratio("engine_one", "hf_generate", batch),
                      "mixture_k2_vs_one_member": ratio("engine_mixture_k2", "engine_one", batch),
                      "row_lora_vs_peft_lora": ratio("engine_lora", "engine_lora_peft", batch),
                      "row_lora_vs_merged": ratio("engine_lora", "engine_lora_merged", batch),
                      "routed_mixed_vs_one_member": ratio("engine_routed_mixed", "engine_one", batch),
                      "siamese_gate_vs_lora": ratio("engine_siamese_gate", "engine_lora", batch),
                      "siamese_gate_vs_peft_lora": ratio("engine_siamese_gate", "engine_lora_peft", batch)}
              for batch in args.batches}
    import os

    result = {"benchmark": "decode", "unit": "output tokens/s (prefill included), median over repeats",
              "conditions": conditions(model="SmolLM2-135M-Instruct", dtype="bfloat16" if device == "cuda" else "float32",
                                       device=device,
                                       prompt_tokens=len(prompt_ids), new_tokens=args.tokens,
                                       repeats=args.repeats, lora_rank=16, gate_rank=8,
                                       load_average=os.getloadavg()),
              "targets": {"one_member_vs_generate": 1.0, "siamese_gate_vs_lora_at_b8": 0.85},
              "rows": rows, "ratios": ratios}
    out = args.out or Path(__file__).resolve().parent / "results" / f"decode_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(ratios, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
