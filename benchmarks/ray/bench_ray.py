"""Ray Serve against the in-process server, and distributed against colocated placement.

    python benchmarks/ray/bench_ray.py [--tokens 32] [--concurrency 1 8] [--config smollm2]

Every server runs in its own subprocess on loopback and is driven by the official ``openai``
async client (streamed completions, greedy, ``ignore_eos``), ``--repeats`` rounds after a warm-up;
the in-process and the colocated servers run side by side and take their rounds in turn (so a
drift of the machine falls on both alike), the distributed one runs after them:
- ``in_process``: ``compose-serve serve --in-process`` (uvicorn, no Ray);
- ``ray_colocated``: the same composition on Ray Serve, one replica holding members and engine;
- ``ray_distributed``: the same composition with each member in its own deployment.
Reported per concurrency: aggregate output tokens/s (median), and the mean time per decoding step
(wall time of a round / tokens per request), whose difference between distributed and colocated
is the per-step cost of crossing replicas. Ratios: colocated / in-process (issue 15: >= 0.95 at c = 1 and 8),
distributed step time / colocated step time. Results: ``benchmarks/results/ray_<device>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conditions import conditions, summary  # noqa: E402

from compose_serve.config import load_composition  # noqa: E402

HERE = Path(__file__).resolve().parent
PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, config: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    if kind == "in_process":
        cmd = [sys.executable, "-m", "compose_serve.cli", "serve", "--in-process", "--config", str(config), "--port", str(port)]
    else:
        cmd = [sys.executable, "-c", "import sys; from compose_serve.deployments.run import serve_on_ray; "
               "serve_on_ray([sys.argv[1]], port=int(sys.argv[2]))", str(config), str(port)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


async def wait_ready(client, model: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.completions.create(model=model, prompt="hi", max_tokens=1)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(2.0)


async def one_round(client, model: str, concurrency: int, tokens: int) -> float:
    async def request() -> int:
        stream = await client.completions.create(model=model, prompt=PROMPT, max_tokens=tokens, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        count = 0
        async for chunk in stream:
            count += bool(chunk.choices and chunk.choices[0].text is not None)
        return count

    started = time.perf_counter()
    await asyncio.gather(*(request() for _ in range(concurrency)))
    return time.perf_counter() - started


class Server:
    """One server subprocess on loopback and an ``openai`` client for it."""

    def __init__(self, kind: str, config: Path) -> None:
        import openai

        self.kind, self.port = kind, free_port()
        self.proc = start(kind, config, self.port)
        self.client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused",
                                         max_retries=0, timeout=600)

    async def stop(self) -> None:
        await self.client.close()
        os.killpg(self.proc.pid, 2)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)


async def measure(servers: dict[str, tuple[str, Path]], model: str, args) -> dict:
    """Start every server in ``servers`` ({row: (kind, config)}), warm each up, then run the rounds
    interleaved (repeat by repeat, concurrency by concurrency, server by server), so that a drift
    of the machine falls on every server alike. Returns {row: {c: summaries}}."""
    running = {row: Server(kind, config) for row, (kind, config) in servers.items()}
    try:
        for server in running.values():
            await wait_ready(server.client, model)
        for c in args.concurrency:
            for server in running.values():
                await one_round(server.client, model, c, args.tokens)  # warm-up
        walls: dict[str, dict[int, list[float]]] = {row: {c: [] for c in args.concurrency} for row in running}
        for _ in range(args.repeats):
            for c in args.concurrency:
                for row, server in running.items():
                    walls[row][c].append(await one_round(server.client, model, c, args.tokens))
        out = {}
        for row, per_c in walls.items():
            out[row] = {c: {"tokens_per_s": summary([c * args.tokens / w for w in ws]),
                            "step_ms": summary([1000 * w / args.tokens for w in ws])} for c, ws in per_c.items()}
            for c in args.concurrency:
                print(f"{row} c={c}: {out[row][c]['tokens_per_s']['median']:.1f} tokens/s, "
                      f"{out[row][c]['step_ms']['median']:.1f} ms/step", file=sys.stderr)
        return out
    finally:
        for server in running.values():
            await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--config", default="smollm2")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    spec = load_composition(args.config)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    configs = {}
    for placement in ("colocated", "distributed"):
        body = spec.model_dump(mode="json")
        body["deployment"] = {**body["deployment"], "placement": placement}
        configs[placement] = tmp / f"{placement}.yaml"
        configs[placement].write_text(yaml.safe_dump(body))
    # in-process and Ray colocated side by side, rounds interleaved; distributed on its own Ray instance after
    rows = asyncio.run(measure({"in_process": ("in_process", configs["colocated"]),
                                "ray_colocated": ("ray", configs["colocated"])}, spec.name, args))
    rows.update(asyncio.run(measure({"ray_distributed": ("ray", configs["distributed"])}, spec.name, args)))

    def med(row: str, c: int, key: str) -> float:
        return rows[row][c][key]["median"]

    ratios = {c: {"ray_colocated_vs_in_process_tokens": med("ray_colocated", c, "tokens_per_s")
                  / med("in_process", c, "tokens_per_s"),
                  "distributed_step_overhead_ms": med("ray_distributed", c, "step_ms") - med("ray_colocated", c, "step_ms"),
                  "distributed_vs_colocated_step_time": med("ray_distributed", c, "step_ms")
                  / med("ray_colocated", c, "step_ms")}
              for c in args.concurrency}
    device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
    result = {"benchmark": "ray", "composition": spec.name, "members": len(spec.members),
              "conditions": conditions(tokens_per_request=args.tokens, repeats=args.repeats, rounds="interleaved",
                                       client="openai.AsyncOpenAI, streamed", dtype="float32"),
              "targets": {"ray_colocated_vs_in_process_tokens": 0.95}, "rows": rows, "ratios": ratios}
    out = HERE.parent / "results" / f"ray_{device}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(ratios, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
