"""Throughput against a merged model: output tokens/s, TTFT and inter-token latency over HTTP.

    python benchmarks/throughput/bench_throughput.py [--tokens 32] [--levels 1 8 32] [--repeats 3]
                                                     [--models merged base mixture routed]

Compositions of SmolLM2-135M-Instruct, each behind its own ``compose-serve serve
--in-process`` subprocess (uvicorn, no Ray; one server per model, so no model competes with
another inside a server; all stay up, an idle one sleeps) on a free port, with
``--max-batch`` = the highest level and ``--torch-threads`` (default 1):

- ``merged``: the TIES merge (weights 1/1, density 0.5) of the two specialist adapters
  ``adapters/add`` and ``adapters/reverse``, the best weight merge of the quality benchmark,
  served as a one-member composition (a plain model folder; built with ``compose_serve.merge``
  into ``~/.cache/compose-serve/bench-merges/ties`` unless an identical merge is there);
- ``base``: the built-in ``smollm2`` (SmolLM2-135M-Instruct alone);
- ``mixture``: the built-in ``mixture``, served as ``specialists`` (the add and reverse LoRA
  specialists, unmerged on one shared base, mixed 0.5/0.5: K=2 dense);
- ``routed``: the built-in ``default``, served as ``routed`` (general, add and reverse on one
  shared base, a fitted router picks one member per request);
- ``siamese`` (on request): the built-in ``imsm``, the trained IMSM pair for reverse.

Every model gets the same questions in turn: held-out prompts of the three skills the routed
composition serves (``general``, ``add``, ``reverse``: phrasings no model was trained or routed
on), so a batch mixes skills as real traffic would. After the rounds, each server's peak resident
memory (``VmHWM`` of its process) is read, and its ratio to the base model's server recorded.

The client is the one users use: the official ``openai.AsyncOpenAI``, streamed chat completions,
greedy, ``extra_body={"ignore_eos": True}`` so that each request makes exactly ``--tokens``
tokens, log-probs on so that each token arrives in a chunk of its own. A round at concurrency C
runs C closed-loop workers until max(C, --min-requests) requests are done (the loop, the records
and the summaries are ``benchmarks/serving/bench_load.py``'s). Rounds interleave models and
levels (every repeat walks the levels, and at each level every model, the model order rotating
from one repeat to the next), so that a slow spell of the shared machine falls on all of them.
Per request: TTFT (send to first token) and inter-token latencies (pooled per level); per round:
the aggregate output rate (all tokens / wall time). Medians, p90 and spread, and the ratios of
each model's median aggregate tokens/s, median TTFT and median ITL to the merged model's at the
same level in the same run, go to ``benchmarks/results/throughput_cpu.{json,csv,png}`` with the
conditions (the load average before, after and at the start of every round).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
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
from bench_load import (  # noqa: E402
    closed_loop,
    format_row,
    level_row,
    request_record,
    start_server,
    stop_server,
    token_arrivals,
)
from conditions import conditions, summary  # noqa: E402

from compose_serve.members.smollm2 import cache_root  # noqa: E402

QUESTIONS: list[str] = []  # filled in main(): held-out prompts of every skill
MODELS = ("merged", "base", "mixture", "routed", "siamese")
DEFAULT_MODELS = ["merged", "base", "mixture", "routed"]
DESCRIPTIONS = {
    "merged": "TIES merge (1/1, density 0.5) of adapters/add and adapters/reverse into SmolLM2, "
    "one member",
    "base": "built-in smollm2: SmolLM2-135M-Instruct alone, one member",
    "mixture": "built-in mixture (specialists): add + reverse LoRA specialists (unmerged, one shared base), "
    "mixture 0.5/0.5, K=2",
    "routed": "built-in default (routed): general + add + reverse on one shared base, router top_k 1",
    "siamese": "built-in imsm: trained IMSM pair (SmolLM2 + adapters/imsm-reverse twin in one forward, gate)",
}


def questions(per_skill: int = 8) -> list[str]:
    """Held-out prompts of general, add and reverse, interleaved."""
    from compose_serve.train import tasks

    sets = [[e.prompt for e in tasks.heldout(t, per_skill)] for t in ("general", "add", "reverse")]
    return [q for group in zip(*sets, strict=True) for q in group]


def peak_rss_mb(pid: int) -> float:
    """The peak resident set size of a live process (``VmHWM``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def ties_merge(merge_dir: Path) -> Path:
    """The TIES merge folder of the quality benchmark (merged now unless the same merge of the same
    adapters is there)."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "quality"))
    from bench_quality import merged_model

    return merged_model("ties", merge_dir)


def model_configs(merge_dir: Path, folder: Path, max_batch: int,
                  engine_extra: dict | None = None) -> dict[str, tuple[str, str]]:
    """Each model: (the config ``serve --config`` takes, the name it is served under). The merged
    composition is written as a YAML file into ``folder``; with ``engine_extra`` (engine fields,
    e.g. ``prefill_slowdown``) every model is, the built-in ones from their parsed specs."""
    engine = {"max_batch": max_batch, "max_queue": 256, **(engine_extra or {})}
    specs = {
        "merged": {
            "name": "merged",
            "method": "mixture",
            "members": [{"name": "merged", "model": str(ties_merge(merge_dir))}],
            "engine": engine,
        },
    }
    configs = {"base": ("smollm2", "smollm2"), "mixture": ("mixture", "specialists"),
               "routed": ("default", "routed"), "siamese": ("imsm", "imsm-reverse")}
    if engine_extra:
        from compose_serve.config import load_composition

        for model, (builtin, _name) in list(configs.items()):
            spec = load_composition(builtin).model_dump(mode="json")  # paths resolved: it reloads as is
            spec["engine"] = {**spec["engine"], **engine_extra}
            specs[model] = spec
    for model, spec in specs.items():
        path = folder / f"{model}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        configs[model] = (str(path), spec["name"])
    return configs


async def openai_request(client, model: str, question: str, tokens: int) -> dict:
    """One streamed chat completion through ``openai.AsyncOpenAI``: its TTFT and token gaps."""
    sent = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=tokens,
        temperature=0,
        logprobs=True,
        top_logprobs=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    return request_record(sent, await token_arrivals(stream), tokens)


async def openai_round(url: str, model: str, concurrency: int, requests: int, tokens: int) -> dict:
    """One closed-loop round with a fresh ``openai.AsyncOpenAI`` client."""
    import openai

    async with openai.AsyncOpenAI(
        base_url=url, api_key="unused", max_retries=0, timeout=600
    ) as client:
        return await closed_loop(client, model, concurrency, requests, tokens, openai_request, QUESTIONS)


def ratios(rows: dict[str, dict[int, dict]], reference: str = "merged") -> dict:
    """Each model's median aggregate tokens/s, TTFT and ITL over the reference's, per level."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for model, levels in rows.items():
        out[model] = {}
        for level, row in levels.items():
            ref = rows[reference][level]
            out[model][level] = {
                key: row[field]["median"] / ref[field]["median"]
                for key, field in (
                    ("aggregate_tokens_per_s", "aggregate_tokens_per_s"),
                    ("ttft", "ttft_s"),
                    ("inter_token_latency", "inter_token_latency_s"),
                )
            }
    return out


def csv_rows(rows: dict[str, dict[int, dict]], ratio: dict) -> list[dict]:
    out = []
    for model, levels in rows.items():
        for level, row in levels.items():
            rate, ttft, itl = (
                row["aggregate_tokens_per_s"],
                row["ttft_s"],
                row["inter_token_latency_s"],
            )
            r = ratio[model][level]
            out.append(
                {
                    "model": model,
                    "concurrency": level,
                    "rounds": row["rounds"],
                    "requests": row["requests"],
                    "tokens_per_request": row["tokens_per_request"],
                    "aggregate_tokens_per_s_median": round(rate["median"], 2),
                    "aggregate_tokens_per_s_min": round(rate["min"], 2),
                    "aggregate_tokens_per_s_max": round(rate["max"], 2),
                    "ratio_aggregate_vs_merged": round(r["aggregate_tokens_per_s"], 3),
                    "ttft_ms_median": round(ttft["median"] * 1e3, 1),
                    "ttft_ms_p90": round(ttft["p90"] * 1e3, 1),
                    "ratio_ttft_vs_merged": round(r["ttft"], 3),
                    "itl_ms_median": round(itl["median"] * 1e3, 1),
                    "itl_ms_p90": round(itl["p90"] * 1e3, 1),
                    "ratio_itl_vs_merged": round(r["inter_token_latency"], 3),
                }
            )
    return out


def plot(rows: dict[str, dict[int, dict]], ratio: dict, path: Path, title: str) -> None:
    """Aggregate tokens/s (with the rounds' spread), its ratio to merged, TTFT and ITL medians
    (with p90 as the upper whisker), each against concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (ax_rate, ax_ratio), (ax_ttft, ax_itl) = axes
    for model, levels in rows.items():
        xs = list(levels)
        rate = [levels[c]["aggregate_tokens_per_s"] for c in xs]
        med = [r["median"] for r in rate]
        ax_rate.errorbar(
            xs,
            med,
            yerr=[
                [m - r["min"] for m, r in zip(med, rate, strict=True)],
                [r["max"] - m for m, r in zip(med, rate, strict=True)],
            ],
            marker="o",
            capsize=3,
            label=model,
        )
        ax_ratio.plot(
            xs, [ratio[model][c]["aggregate_tokens_per_s"] for c in xs], marker="o", label=model
        )
        for ax, field in ((ax_ttft, "ttft_s"), (ax_itl, "inter_token_latency_s")):
            stats = [levels[c][field] for c in xs]
            mid = [s["median"] * 1e3 for s in stats]
            ax.errorbar(
                xs,
                mid,
                yerr=[
                    [0.0] * len(xs),
                    [s["p90"] * 1e3 - m for s, m in zip(stats, mid, strict=True)],
                ],
                marker="o",
                capsize=3,
                label=model,
            )
    ax_rate.set_ylabel("aggregate output tokens/s (median, min-max)")
    ax_ratio.set_ylabel("aggregate tokens/s / merged's")
    ax_ratio.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax_ttft.set_ylabel("TTFT ms (median, whisker to p90)")
    ax_itl.set_ylabel("inter-token latency ms (median, whisker to p90)")
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(next(iter(rows.values()))), [str(c) for c in next(iter(rows.values()))])
        ax.set_xlabel("concurrent streams")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32, help="per request (EOS ignored)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3, help="rounds per model and level")
    parser.add_argument("--min-requests", type=int, default=2, help="per round, at least")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=DEFAULT_MODELS)
    parser.add_argument("--torch-threads", type=int, default=1, help="each server's")
    parser.add_argument("--merge-dir", type=Path, default=cache_root() / "bench-merges")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="folder of throughput_<device>.{json,csv,png}",
    )
    parser.add_argument("--device-name", default="cpu", help="the file name's <device>")
    parser.add_argument("--prefill-slowdown", default=None,
                        help="every model's engine.prefill_slowdown ('none': a fixed chunk of max_prefill_tokens; "
                             "default: each config's own, 0.5)")
    parser.add_argument(
        "--note",
        default="the machine may be shared with other jobs; the load average also counts this "
        "benchmark's own server and client",
        help="recorded in the conditions",
    )
    args = parser.parse_args(argv)
    if "merged" not in args.models:
        parser.error("the ratios need the merged model: keep it in --models")
    levels = sorted(args.levels)
    max_batch = max(levels)
    QUESTIONS[:] = questions()

    started = time.perf_counter()
    load_before = os.getloadavg()
    folder = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    extra = None
    if args.prefill_slowdown is not None:
        slowdown = args.prefill_slowdown
        extra = {"prefill_slowdown": None if slowdown.lower() in ("none", "null") else float(slowdown)}
    configs = model_configs(args.merge_dir, folder, max_batch, extra)
    servers: dict[str, tuple] = {}
    rounds: dict[str, dict[int, list[dict]]] = {m: {c: [] for c in levels} for m in args.models}
    round_log: list[dict] = []
    try:
        for model in args.models:
            config, _ = configs[model]
            t0 = time.perf_counter()
            servers[model] = start_server([config], max_batch, args.torch_threads)
            print(
                f"{model}: served at {servers[model][1]} after {time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        for model in args.models:  # warm-up: one request, then one short burst at the top level
            url, name = servers[model][1], configs[model][1]
            asyncio.run(openai_round(url, name, 1, 1, 8))
            asyncio.run(openai_round(url, name, max_batch, max_batch, 4))
        for repeat in range(args.repeats):
            order = (
                args.models[repeat % len(args.models) :] + args.models[: repeat % len(args.models)]
            )
            for level in levels:
                for model in order:
                    url, name = servers[model][1], configs[model][1]
                    load = os.getloadavg()[0]
                    one = asyncio.run(
                        openai_round(url, name, level, max(level, args.min_requests), args.tokens)
                    )
                    rounds[model][level].append(one)
                    round_log.append(
                        {
                            "repeat": repeat,
                            "concurrency": level,
                            "model": model,
                            "wall_s": one["wall"],
                            "tokens": one["tokens"],
                            "load_average_1min_at_start": load,
                        }
                    )
                    print(
                        f"repeat {repeat} c={level:2d} {model:8s} {one['tokens'] / one['wall']:6.1f}"
                        f" tok/s (load {load:.2f})",
                        file=sys.stderr,
                        flush=True,
                    )
        memory = {m: peak_rss_mb(servers[m][0].pid) for m in args.models}
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    memory_ratio = {m: memory[m] / memory["base"] for m in args.models} if "base" in memory else {}
    for model in args.models:
        print(f"{model}: peak resident memory {memory[model]:.0f} MiB "
              f"({memory_ratio.get(model, float('nan')):.2f}x base)")

    rows = {m: {c: level_row(c, args.tokens, rounds[m][c]) for c in levels} for m in args.models}
    ratio = ratios(rows)
    for model in args.models:
        for level in levels:
            r = ratio[model][level]
            print(
                f"{format_row(model, rows[model][level])}  vs merged: rate "
                f"{r['aggregate_tokens_per_s']:.2f}x TTFT {r['ttft']:.2f}x "
                f"ITL {r['inter_token_latency']:.2f}x"
            )
    wall = time.perf_counter() - started
    cond = conditions(
        server="compose-serve serve --in-process (uvicorn, no Ray), one subprocess per model, "
        "all up for the whole run",
        client="official openai.AsyncOpenAI (fresh per round), streamed chat completions, closed "
        "loop, log-probs on (one chunk per token), in the benchmark's own process",
        models={m: DESCRIPTIONS[m] for m in args.models},
        served_as={m: configs[m][1] for m in args.models},
        dtype="float32",
        server_torch_threads=args.torch_threads,
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        max_batch=max_batch,
        engine_overrides=extra,
        tokens_per_request=args.tokens,
        greedy=True,
        ignore_eos=True,
        levels=levels,
        rounds_per_model_and_level=args.repeats,
        requests_per_round=f"max(concurrency, {args.min_requests}), closed loop",
        order="repeat > level > model, model order rotated each repeat",
        warm_up="per model: one 8-token request, then max_batch concurrent 4-token requests; not "
        "measured",
        load_average_before=load_before,
        load_average_after=os.getloadavg(),
        load_average_1min_at_round_start=summary(
            [r["load_average_1min_at_start"] for r in round_log]
        ),
        wall_s=round(wall, 1),
        note=args.note,
    )
    report = {
        "benchmark": "throughput against a merged model: HTTP server + openai client, streamed chat",
        "conditions": cond,
        "results": {m: [rows[m][c] for c in levels] for m in args.models},
        "ratios_vs_merged": {
            "definition": "median(model) / median(merged) at the same concurrency, same run; "
            "aggregate tokens/s (higher is better), TTFT and ITL (lower is better)",
            **{m: {str(c): ratio[m][c] for c in levels} for m in args.models},
        },
        "rounds": round_log,
        "peak_resident_memory_mib": memory,
        "peak_resident_memory_vs_base": memory_ratio,
        "questions": QUESTIONS,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"throughput_{args.device_name}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    table = csv_rows(rows, ratio)
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    plot(
        rows,
        ratio,
        stem.with_suffix(".png"),
        f"SmolLM2-135M compositions vs a TIES merge over HTTP ({args.device_name}, "
        f"{args.torch_threads} torch thread, {args.tokens} tokens/request, "
        f"{cond['date'][:10]}, 1-min load {load_before[0]:.1f} before, "
        f"{cond['load_average_after'][0]:.1f} after)",
    )
    print(f"wrote {stem}.{{json,csv,png}} in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
