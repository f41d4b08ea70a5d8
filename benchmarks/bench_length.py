"""The engine at length and under churn (issue 15), on SmolLM2-135M-Instruct, same run, as ratios.

    python benchmarks/bench_length.py [--suites length churn burst] [--threads 2]

Suites (each writes its rows and ratios into ``benchmarks/results/length_<device>.json``):

- ``length``: decode step time (ms, median over ``--steps`` steps) at B = 4 with 64, 1,024 and
  3,072 tokens of context, for this engine's slot cache, and for the raw transformers model with
  its ``DynamicCache`` (the layout the slot cache sat on before: ``update`` concatenates the whole
  cache every token) and a ``StaticCache`` (preallocated, the reference) sized to each context, and
  one sized for 3,072 at every context (it attends all its columns, masked, at every step: what
  made the issue's StaticCache figures flat). Targets: engine step at 3,072 <= 1.3x its step at
  64; >= 1.8x faster than the DynamicCache at 3,072.
- ``churn``: eight normal streams (``--tokens`` tokens each) through the ``AsyncEngine``, alone, then
  next to eight loops that submit a request (24 prompt tokens), read 3 tokens and close it, over
  and over, at each ``--churn-budgets`` value of ``engine.max_prefill_tokens``. Target: the eight
  streams take <= 1.3x their time alone.
- ``burst``: eight streams run; a burst of 32 requests with 1,000-token prompts (``--burst-tokens``
  new tokens each) arrives 0.5 s later; the eight streams' p90 inter-token latency with the burst
  against without it, at each ``--budgets`` value of ``engine.max_prefill_tokens`` (the burst is
  dropped once the eight streams are done: their tokens all came while it was being prefilled).
  Target: <= 2x.

``churn`` and ``burst`` run with the engine's packed steps (a step's decode and prefill chunk in
one forward; a new request's first chunk rides in it) on and off, ``--pack on off``, and with the
chunk paced (``engine.prefill_slowdown``, ``--slowdowns 0.5``: sized from measured step costs, capped
by the budget) or fixed at the budget (``none``), in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conditions import conditions, summary  # noqa: E402

from compose_serve.composition import build_composition  # noqa: E402
from compose_serve.config import load_composition  # noqa: E402
from compose_serve.engine import Engine, Request  # noqa: E402
from compose_serve.engine.scheduler import AsyncEngine  # noqa: E402
from compose_serve.sampling import SamplingParams  # noqa: E402

CONTEXTS = (64, 1024, 3072)


def prompt_of(length: int, seed: int) -> list[int]:
    """A prompt of ``length`` token ids (ordinary tokens, seeded)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(200, 40000, (length,), generator=g).tolist()


def engine_step_ms(composition, context: int, batch: int, steps: int) -> list[float]:
    engine = Engine(composition, max_batch=batch, max_prefill_tokens=0)
    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    engine.add([Request(prompt_of(context, i), params) for i in range(batch)])
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        engine.step()
        times.append(1e3 * (time.perf_counter() - started))
    engine.reset()
    return times


@torch.inference_mode()
def hf_step_ms(model, cache_kind: str, context: int, batch: int, steps: int, max_len: int | None = None) -> list[float]:
    """The raw model's decode step time with a ``DynamicCache`` or a ``StaticCache`` sized to
    ``max_len`` (default: this context and its steps)."""
    from transformers import DynamicCache, StaticCache

    ids = torch.tensor([prompt_of(context, i) for i in range(batch)])
    if cache_kind == "static":
        cache = StaticCache(config=model.config, max_cache_len=max_len or context + steps + 1)
    else:
        cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for step in range(steps):
        position = torch.full((batch, 1), context + step)
        started = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True, position_ids=position,
                    cache_position=torch.tensor([context + step]))
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        times.append(1e3 * (time.perf_counter() - started))
    return times


def suite_length(composition, args) -> dict:
    from transformers import AutoModelForCausalLM

    from compose_serve.members.smollm2 import smollm2_dir

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir()).eval()
    rows: dict[str, dict[int, dict]] = {"engine": {}, "hf_dynamic_cache": {}, "hf_static_cache": {},
                                        "hf_static_cache_sized_for_3072": {}}
    longest = max(CONTEXTS) + args.steps + 1
    for context in CONTEXTS:
        rows["engine"][context] = summary(engine_step_ms(composition, context, args.batch, args.steps))
        rows["hf_dynamic_cache"][context] = summary(hf_step_ms(model, "dynamic", context, args.batch, args.steps))
        rows["hf_static_cache"][context] = summary(hf_step_ms(model, "static", context, args.batch, args.steps))
        rows["hf_static_cache_sized_for_3072"][context] = summary(
            hf_step_ms(model, "static", context, args.batch, args.steps, max_len=longest))
        print(f"context {context}: " + ", ".join(f"{k} {v[context]['median']:.1f} ms" for k, v in rows.items()),
              file=sys.stderr, flush=True)
    med = {k: {c: v[c]["median"] for c in CONTEXTS} for k, v in rows.items()}
    ratios = {"engine_3072_vs_64": med["engine"][3072] / med["engine"][64],
              "dynamic_cache_vs_engine_at_3072": med["hf_dynamic_cache"][3072] / med["engine"][3072],
              "static_cache_vs_engine_at_3072": med["hf_static_cache"][3072] / med["engine"][3072],
              "static_cache_3072_vs_64": med["hf_static_cache"][3072] / med["hf_static_cache"][64],
              "static_cache_sized_for_3072_3072_vs_64":
                  med["hf_static_cache_sized_for_3072"][3072] / med["hf_static_cache_sized_for_3072"][64],
              "engine_at_64_vs_static_sized_for_3072_at_64":
                  med["engine"][64] / med["hf_static_cache_sized_for_3072"][64]}
    targets = {"engine_3072_vs_64": "<= 1.3", "dynamic_cache_vs_engine_at_3072": ">= 1.8"}
    config = model.config  # what one decode step must read from memory, at least
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # float32 K and V
    bytes_read = {"weights": sum(p.numel() for p in model.parameters()) * 4,
                  **{f"kv_cache_at_{c}": kv_per_token * c * args.batch for c in CONTEXTS}}
    return {"unit": "ms per decode step, median", "batch": args.batch, "steps": args.steps, "rows": rows,
            "ratios": ratios, "targets": targets, "bytes_read_per_step": bytes_read}


async def _stream(engine: AsyncEngine, ids: list[int], tokens: int, arrivals: list[float] | None = None) -> list[float]:
    """One request read to the end: the arrival times of its tokens (appended to ``arrivals`` as
    they come, so a cancelled reader's list keeps what it saw)."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    arrivals = [] if arrivals is None else arrivals
    async for _ in engine.submit(Request(ids, params)):
        arrivals.append(time.perf_counter())
    return arrivals


async def _dropper(engine: AsyncEngine, stop: asyncio.Event, seed: int) -> int:
    """Connect, read 3 tokens, close; again until ``stop``. Returns how many it dropped."""
    dropped = 0
    while not stop.is_set():
        stream = engine.submit(Request(prompt_of(24, seed + dropped), SamplingParams(max_tokens=64, ignore_eos=True)))
        read = 0
        async for _ in stream:
            read += 1
            if read == 3:
                break
        await stream.aclose()
        dropped += 1
    return dropped


class ForwardLedger:
    """Counts the members' decoder forwards while installed: per kind (``packed``: a step's decode
    and prefill chunk in one; ``plain``: a decode or a prefill alone), how many, their tokens and
    their seconds."""

    def __init__(self) -> None:
        self.rows = {kind: {"forwards": 0, "tokens": 0, "seconds": 0.0} for kind in ("packed", "plain")}
        self._saved = {}

    def __enter__(self) -> ForwardLedger:
        from compose_serve.members.hf import HFMember

        for name, kind in (("run_packed", "packed"), ("run_decoder", "plain")):
            inner = self._saved[name] = getattr(HFMember, name)
            setattr(HFMember, name, self._counting(inner, self.rows[kind]))
        return self

    def __exit__(self, *exc) -> None:
        from compose_serve.members.hf import HFMember

        for name, inner in self._saved.items():
            setattr(HFMember, name, inner)

    @staticmethod
    def _counting(inner, row: dict):
        def forward(member, ids, *args):
            started = time.perf_counter()
            try:
                return inner(member, ids, *args)
            finally:
                row["forwards"] += 1
                row["tokens"] += ids.numel()
                row["seconds"] += time.perf_counter() - started

        return forward

    def summary(self) -> dict:
        return {kind: {**row, "tokens_per_forward": row["tokens"] / max(row["forwards"], 1),
                       "ms_per_forward": 1e3 * row["seconds"] / max(row["forwards"], 1)}
                for kind, row in self.rows.items()}


def suite_churn(composition, args) -> dict:
    async def run(with_drops: bool, pack: bool, budget: int, slowdown: float | None) -> tuple[float, int]:
        engine = AsyncEngine.from_composition(composition, max_batch=16)
        engine.engine.pack_steps = pack
        engine.engine.packs_admission = pack and all(m.can_rollback for m in engine.engine.members)
        engine.engine.max_prefill_tokens = budget
        engine.engine.pacer.slowdown = slowdown
        stop = asyncio.Event()
        droppers = [asyncio.create_task(_dropper(engine, stop, 1000 * i)) for i in range(8)] if with_drops else []
        started = time.perf_counter()
        await asyncio.gather(*(_stream(engine, prompt_of(24, i), args.tokens) for i in range(8)))
        wall = time.perf_counter() - started
        stop.set()
        dropped = sum(await asyncio.gather(*droppers))
        engine.close()
        return wall, dropped

    rows = {}
    for pack, budget, slowdown in _variants(args.pack, args.churn_budgets, args.slowdowns):
        alone, drops = [], []
        dropped = 0
        for _ in range(args.repeats):
            with ForwardLedger() as ledger_alone:
                alone.append(asyncio.run(run(False, pack == "on", budget, slowdown))[0])
            with ForwardLedger() as ledger_drops:  # the last repeat's are kept
                wall, n = asyncio.run(run(True, pack == "on", budget, slowdown))
            drops.append(wall)
            dropped += n
        ratio = statistics.median(drops) / statistics.median(alone)
        print(f"churn, max_prefill_tokens {budget}, prefill_slowdown {slowdown}, packing {pack}: alone {statistics.median(alone):.2f} s, "
              f"with 8 drop loops {statistics.median(drops):.2f} s ({ratio:.2f}x; {dropped} requests dropped)",
              file=sys.stderr, flush=True)
        rows[_row_key(pack, budget, slowdown)] = {
            "max_prefill_tokens": budget, "prefill_slowdown": slowdown, "packed_steps": pack == "on",
            "alone": summary(alone),
            "with_8_drop_loops": summary(drops), "dropped_requests": dropped,
            "dropped_per_second": dropped / sum(drops), "with_drops_vs_alone": ratio,
            "forwards_last_repeat": {"alone": ledger_alone.summary(), "with_drops": ledger_drops.summary()}}
    return {"unit": "seconds for 8 streams", "tokens_per_stream": args.tokens,
            "dropper": {"prompt_tokens": 24, "tokens_read": 3}, "rows": rows,
            "targets": {"with_drops_vs_alone": "<= 1.3"}}


def suite_burst(composition, args) -> dict:
    async def run(budget: int, burst: bool, pack: bool, slowdown: float | None) -> tuple[list[float], list[float]]:
        """The 8 streams' inter-token gaps, and the TTFT of each burst request that got its first
        token before the 8 streams ended (seconds from the burst's arrival)."""
        engine = AsyncEngine.from_composition(composition, max_batch=40)
        engine.engine.max_prefill_tokens = budget
        engine.engine.pacer.slowdown = slowdown
        engine.engine.pack_steps = pack
        streams = [asyncio.create_task(_stream(engine, prompt_of(24, i), args.tokens)) for i in range(8)]
        await asyncio.sleep(0.5)  # the eight streams are decoding
        sent = time.perf_counter()
        burst_arrivals: list[list[float]] = [[] for _ in range(32 if burst else 0)]
        burst_tasks = [asyncio.create_task(_stream(engine, prompt_of(1000, 100 + i), args.burst_tokens, seen))
                       for i, seen in enumerate(burst_arrivals)]
        arrivals = await asyncio.gather(*streams)
        for task in burst_tasks:  # the eight streams are measured; the rest of the burst is dropped
            task.cancel()
        await asyncio.gather(*burst_tasks, return_exceptions=True)
        engine.close()
        gaps = [b - a for times in arrivals for a, b in zip(times, times[1:], strict=False)]
        return gaps, [seen[0] - sent for seen in burst_arrivals if seen]

    rows = {}
    for pack, budget, slowdown in _variants(args.pack, args.budgets, args.slowdowns):
        base, _ = asyncio.run(run(budget, False, pack == "on", slowdown))
        with_burst, ttfts = asyncio.run(run(budget, True, pack == "on", slowdown))
        p90 = {"alone": summary(base)["p90"], "burst": summary(with_burst)["p90"]}
        row = rows[_row_key(pack, budget, slowdown)] = {
            "max_prefill_tokens": budget, "prefill_slowdown": slowdown, "packed_steps": pack == "on",
            "itl_alone_s": summary(base), "itl_with_burst_s": summary(with_burst),
            "p90_ratio": p90["burst"] / p90["alone"],
            "burst_first_tokens_while_streams_ran": len(ttfts),
            "burst_ttft_s": summary(ttfts) if ttfts else None}
        print(f"burst, max_prefill_tokens {budget}, prefill_slowdown {slowdown}, packing {pack}: p90 ITL {1e3 * p90['alone']:.0f} ms alone, "
              f"{1e3 * p90['burst']:.0f} ms with the burst ({row['p90_ratio']:.2f}x; longest gap "
              f"{1e3 * row['itl_with_burst_s']['max']:.0f} ms); "
              f"{len(ttfts)}/32 burst requests had their first token before the streams ended", file=sys.stderr,
              flush=True)
    # The streams' own 24-token prompts are chunked too, so a small budget slows their first steps
    # even alone; the budget-independent reference is their p90 alone at the largest budget.
    reference = min(row["itl_alone_s"]["p90"] for row in rows.values() if row["max_prefill_tokens"] == max(args.budgets))
    for row in rows.values():
        row["p90_ratio_vs_alone_at_largest_budget"] = row["itl_with_burst_s"]["p90"] / reference
    return {"unit": "inter-token latency of the 8 running streams, seconds", "tokens_per_stream": args.tokens,
            "burst": {"requests": 32, "prompt_tokens": 1000, "new_tokens": args.burst_tokens},
            "rows": {str(b): r for b, r in rows.items()}, "targets": {"p90_ratio": "<= 2"}}


def _variants(packs: list[str], budgets: list[int], slowdowns: list[float | None]):
    """Every (packing, max_prefill_tokens, prefill_slowdown) of a suite, in run order."""
    return [(pack, budget, slowdown) for pack in packs for budget in budgets for slowdown in slowdowns]


def _row_key(pack: str, budget: int, slowdown: float | None) -> str:
    """``256``, ``256_unpacked``, ``256_paced0.5``, ``256_unpacked_paced0.5``: the keys of earlier
    runs (a fixed budget) are kept."""
    return f"{budget}" + ("" if pack == "on" else "_unpacked") + ("" if slowdown is None else f"_paced{slowdown:g}")


def _slowdown(text: str) -> float | None:
    return None if text.lower() in ("none", "null", "fixed") else float(text)


def _route_at_admission(self) -> float:
    """``Engine._route_chunk`` as it was before chunked routing: every prompt waiting for the
    router is read whole, at once (so at admission), whatever the budget."""
    seqs = [s for s in self.prefilling if s.routing is not None]
    for seq in seqs:
        seq.routing = None
    if seqs:
        self._route(seqs)
    return self.max_prefill_tokens or float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suites", nargs="+", default=["length", "churn", "burst"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48, help="tokens per normal stream (churn, burst)")
    parser.add_argument("--burst-tokens", type=int, default=4, help="new tokens per burst request")
    parser.add_argument("--budgets", type=int, nargs="+", default=[32, 256],
                        help="engine.max_prefill_tokens values of the burst suite (0: no limit)")
    parser.add_argument("--churn-budgets", type=int, nargs="+", default=[256],
                        help="engine.max_prefill_tokens values of the churn suite (256: the default)")
    parser.add_argument("--slowdowns", type=_slowdown, nargs="+", default=[None, 0.5],
                        help="engine.prefill_slowdown values of churn and burst ('none': the chunk is always the "
                             "budget; 0.5: the default, paced from measured step costs)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--route-at-admission", action="store_true",
                        help="a routed composition's router reads every new prompt whole at admission (the "
                             "behaviour before chunked routing), for a same-machine comparison")
    parser.add_argument("--config", default="smollm2",
                        help="built-in config or YAML (default: SmolLM2 alone; 'default': the routed composition)")
    parser.add_argument("--pack", nargs="+", choices=["on", "off"], default=["on", "off"],
                        help="churn and burst with the engine's packed steps on and/or off (same run)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.route_at_admission:
        Engine._route_chunk = _route_at_admission
    composition = build_composition(load_composition(args.config))
    device = composition.members[0].device.type
    out = args.out or Path(__file__).resolve().parent / "results" / f"length_{device}.json"
    result = json.loads(out.read_text()) if out.is_file() else {}
    suites = {"length": suite_length, "churn": suite_churn, "burst": suite_burst}
    for name in args.suites:
        load = os.getloadavg()
        result[name] = {**suites[name](composition, args), "load_average_before": load,
                        "load_average_after": os.getloadavg()}
    result["conditions"] = conditions(model=f"SmolLM2-135M-Instruct (config {args.config!r})", dtype="float32",
                                      device=device, command=" ".join(["python", *sys.argv]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
