"""Serving under load: the HTTP server in a subprocess, AsyncComposeClient at concurrency 1, 4, 16.

    python benchmarks/serving/bench_load.py [--tokens 64] [--levels 1 4 16] [--repeats 3]

The server is ``compose-serve serve --config smollm2 default`` (SmolLM2-135M-Instruct alone, and
``default``, served as ``specialists``: the K=2 mixture 0.5/0.5 of the project's add and reverse
LoRA specialists), started by this script on a free port. A
round at concurrency C runs C clients back to back (closed loop) until max(C, --min-requests)
chat requests are done; each request is greedy, streams, ignores EOS so that it produces exactly
``--tokens`` tokens, and asks for log-probs so that every token arrives in a chunk of its own.
Rounds interleave the levels, ``--repeats`` of each; one warm-up request per model is not
measured. Per request: TTFT (send to first token), inter-token latencies, its decode rate
``(tokens - 1) / (last - first)``; per round: the aggregate rate ``all tokens / wall time``.
Medians, p90 and spread go to ``benchmarks/results/serving_cpu.json`` with the conditions (the
load average too: the machine may be shared), and the ratio of the median aggregate rates at the
highest concurrency and at 1 (target >= 4).

``start_server``/``stop_server``, ``token_arrivals``/``request_record``, ``closed_loop``,
``level_row`` and ``format_row`` are imported by ``benchmarks/throughput/bench_throughput.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from conditions import conditions, summary  # noqa: E402

from compose_serve.client import AsyncComposeClient  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three uses of copper.",
    "Why is the sky blue? Answer briefly.",
    "Give me a short recipe for pancakes.",
    "What does a compiler do?",
    "Translate 'good morning' into Spanish and German.",
]


def start_server(
    configs: list[str], max_batch: int, torch_threads: int | None
) -> tuple[subprocess.Popen, str]:
    """``compose-serve serve`` on a free port; returns the process and its /v1 URL."""
    cmd = [
        sys.executable,
        "-m",
        "compose_serve.cli",
        "serve",
        "--in-process",
        "--port",
        "0",
        "--max-batch",
        str(max_batch),
        "--config",
        *configs,
    ]
    if torch_threads is not None:
        cmd += ["--torch-threads", str(torch_threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(600)
    match = re.search(r"http://\S+/v1", line[0]) if line else None
    if match is None:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line}")
    return proc, match.group(0)


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server of ``start_server`` (SIGINT, then SIGKILL after a minute)."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


async def token_arrivals(stream: AsyncIterable[Any]) -> list[float]:
    """The arrival time of every token of a streamed chat completion (with log-probs on, one
    ``logprobs.content`` entry per token); works for ``openai``'s chunks and the project's."""
    arrivals: list[float] = []
    async for chunk in stream:
        for choice in chunk.choices:
            n = len(choice.logprobs.content) if choice.logprobs and choice.logprobs.content else 0
            arrivals.extend([time.perf_counter()] * n)
    return arrivals


def request_record(sent: float, arrivals: list[float], tokens: int) -> dict:
    """TTFT, inter-token latencies and decode rate of one request sent at ``sent``."""
    if len(arrivals) != tokens:
        raise RuntimeError(f"expected {tokens} tokens, got {len(arrivals)}")
    return {
        "ttft": arrivals[0] - sent,
        "itl": [b - a for a, b in zip(arrivals[:-1], arrivals[1:], strict=True)],
        "decode_rate": (len(arrivals) - 1) / max(arrivals[-1] - arrivals[0], 1e-9),
        "tokens": len(arrivals),
    }


async def one_request(client: AsyncComposeClient, model: str, question: str, tokens: int) -> dict:
    """One streamed chat request: the arrival time of each token (one chunk per token)."""
    sent = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=tokens,
        temperature=0,
        ignore_eos=True,
        logprobs=True,
        top_logprobs=0,
        stream=True,
    )
    return request_record(sent, await token_arrivals(stream), tokens)


RequestFn = Callable[[Any, str, str, int], Awaitable[dict]]


async def closed_loop(
    client: Any,
    model: str,
    concurrency: int,
    requests: int,
    tokens: int,
    request: RequestFn = one_request,
    questions: list[str] | None = None,
) -> dict:
    """``concurrency`` closed-loop workers sharing ``client`` until ``requests`` are done, each
    request ``request(client, model, question, tokens)`` with the questions in turn (``QUESTIONS``
    unless given): the round's wall time and records."""
    todo = list(range(requests))
    records: list[dict] = []
    questions = questions or QUESTIONS

    async def worker() -> None:
        while todo:
            i = todo.pop()
            question = questions[i % len(questions)]
            records.append(await request(client, model, question, tokens))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return {"wall": wall, "tokens": sum(r["tokens"] for r in records), "records": records}


async def run_round(url: str, model: str, concurrency: int, requests: int, tokens: int) -> dict:
    """``concurrency`` closed-loop clients until ``requests`` are done: the round's records."""
    async with AsyncComposeClient(url, max_retries=0, timeout=600) as client:
        return await closed_loop(client, model, concurrency, requests, tokens)


def level_row(concurrency: int, tokens: int, rounds: list[dict]) -> dict:
    """One concurrency level over its rounds: aggregate rate per round, latencies pooled."""
    records = [r for one in rounds for r in one["records"]]
    return {
        "concurrency": concurrency,
        "rounds": len(rounds),
        "requests": len(records),
        "tokens_per_request": tokens,
        "aggregate_tokens_per_s": summary([one["tokens"] / one["wall"] for one in rounds]),
        "ttft_s": summary([r["ttft"] for r in records]),
        "inter_token_latency_s": summary([x for r in records for x in r["itl"]]),
        "per_request_tokens_per_s": summary([r["decode_rate"] for r in records]),
    }


def format_row(model: str, row: dict) -> str:
    """One line of a ``level_row``: aggregate rate [spread], TTFT and ITL p50/p90 in ms."""
    rate = row["aggregate_tokens_per_s"]
    return (
        f"{model:16s} c={row['concurrency']:2d}  "
        f"{rate['median']:6.1f} tok/s [{rate['min']:5.1f}, {rate['max']:5.1f}]  "
        f"TTFT p50 {row['ttft_s']['median'] * 1e3:6.0f} ms p90 {row['ttft_s']['p90'] * 1e3:6.0f}  "
        f"ITL p50 {row['inter_token_latency_s']['median'] * 1e3:5.0f} ms "
        f"p90 {row['inter_token_latency_s']['p90'] * 1e3:5.0f}"
    )


async def warm_up(url: str, model: str) -> None:
    async with AsyncComposeClient(url, max_retries=0, timeout=600) as client:
        await one_request(client, model, "Hello!", 8)


def bench_model(url: str, model: str, args) -> dict:
    """Rounds interleave the levels (1, 4, 16, 1, 4, 16, ...), so that a slow spell of a shared
    machine falls on every level rather than on one."""
    asyncio.run(warm_up(url, model))
    rounds: dict[int, list[dict]] = {level: [] for level in args.levels}
    for _ in range(args.repeats):
        for level in args.levels:
            requests = max(level, args.min_requests)
            rounds[level].append(asyncio.run(run_round(url, model, level, requests, args.tokens)))
    rows = [level_row(level, args.tokens, rounds[level]) for level in args.levels]
    for row in rows:
        print(format_row(model, row), flush=True)
    low, high = rows[0], rows[-1]
    ratio = high["aggregate_tokens_per_s"]["median"] / low["aggregate_tokens_per_s"]["median"]
    return {
        "levels": rows,
        f"aggregate_ratio_c{high['concurrency']}_vs_c{low['concurrency']}": ratio,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tokens", type=int, default=64, help="generated per request (EOS ignored)"
    )
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3, help="rounds per level (median reported)")
    parser.add_argument("--min-requests", type=int, default=2, help="per round, at least")
    parser.add_argument("--models", nargs="+", default=["smollm2", "specialists"])
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="the server's (default: its own rule)"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving_cpu.json"))
    args = parser.parse_args()

    load_before = os.getloadavg()
    proc, url = start_server(["smollm2", "default"], max(args.levels), args.torch_threads)
    try:
        results = {model: bench_model(url, model, args) for model in args.models}
    finally:
        stop_server(proc)

    report = {
        "benchmark": "serving load: HTTP server (in-process engine) + AsyncComposeClient, streamed chat",
        "conditions": conditions(
            server="compose-serve serve --config smollm2 default (subprocess, uvicorn, no Ray)",
            client="AsyncComposeClient (httpx), closed loop, one chunk per token (logprobs on)",
            models={
                "smollm2": "SmolLM2-135M-Instruct, one member",
                "specialists": "K=2 mixture of the add and reverse LoRA specialists of SmolLM2 "
                "(adapters/, weights 0.5/0.5)",
            },
            server_torch_threads=args.torch_threads or max(1, (os.cpu_count() or 2) - 1),
            dtype="float32",
            max_batch=max(args.levels),
            tokens_per_request=args.tokens,
            greedy=True,
            ignore_eos=True,
            warm_up="one 8-token request per model, not measured",
            rounds_per_level=args.repeats,
            requests_per_round="max(concurrency, --min-requests), closed loop",
            load_average_before=load_before,
            load_average_after=os.getloadavg(),
        ),
        "target": "aggregate tokens/s at the highest concurrency >= 4x one stream",
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for model, result in results.items():
        ratio = next(v for k, v in result.items() if k.startswith("aggregate_ratio"))
        print(
            f"{model}: aggregate tokens/s c={args.levels[-1]} / c={args.levels[0]} = {ratio:.2f}x"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
