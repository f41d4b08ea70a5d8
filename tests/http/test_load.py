"""Overload and abandonment against a real server on loopback (issue 13): every admitted request
finishes and every refused one is a 429 with Retry-After at ten times the capacity; 200 clients
that go away at random points leak no slot, and the engine then gives the same tokens as before.

Each test prints its counts (``pytest -s tests/http/test_load.py``): the README's figures.
"""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from .live import serve_specs

MAX_BATCH, MAX_QUEUE = 4, 4
CAPACITY = MAX_BATCH + MAX_QUEUE


@pytest.fixture(scope="module")
def server(tiny):
    spec = {
        "name": "load",
        "method": "mixture",
        "members": [{"name": "a", "model": str(tiny["a"])}, {"name": "b", "model": str(tiny["b"])}],
        "engine": {"max_batch": MAX_BATCH, "max_queue": MAX_QUEUE},
    }
    live, engines = serve_specs([spec], held=("load",))
    live.engine = engines["load"]
    live.engine.engine.delay = 0.005  # steps of a small real model, not of a 2-layer toy
    yield live
    live.stop()


def _body(stream: bool, max_tokens: int = 12, prompt: str = "The quick") -> dict:
    body = {"model": "load", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": stream}
    return {**body, "stream_options": {"include_usage": True}} if stream else body


async def _one(client: httpx.AsyncClient, stream: bool) -> tuple[int, dict, str | None, int]:
    """(status, headers, finish_reason, tokens) of one request read to its end."""
    if not stream:
        response = await client.post("/completions", json=_body(False))
        if response.status_code != 200:
            return response.status_code, dict(response.headers), None, 0
        body = response.json()
        return 200, {}, body["choices"][0]["finish_reason"], body["usage"]["completion_tokens"]
    async with client.stream("POST", "/completions", json=_body(True)) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, dict(response.headers), None, 0
        finish, tokens = None, 0
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for choice in chunk["choices"]:
                    finish = choice["finish_reason"] or finish
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return 200, {}, finish, tokens


def _idle(engine) -> bool:
    stats = engine.stats()
    members_empty = all(not m.live_slots for m in engine.engine.members)
    return stats.running == stats.waiting == 0 and engine.engine.free_slots == MAX_BATCH and members_empty


async def _wait_idle(engine, seconds: float = 5.0) -> bool:
    for _ in range(int(seconds / 0.02)):
        if _idle(engine):
            return True
        await asyncio.sleep(0.02)
    return _idle(engine)


def test_ten_times_the_capacity(server):
    async def main():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as client:
            results = await asyncio.gather(*(_one(client, stream=i % 2 == 0) for i in range(10 * CAPACITY)))
        return results, await _wait_idle(server.engine)

    results, idle = asyncio.run(main())
    admitted = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    print(f"\noverload: {len(results)} requests at {10 * CAPACITY // CAPACITY}x capacity {CAPACITY}: "
          f"{len(admitted)} admitted, {len(admitted)} completed, {len(refused)} refused (429)")
    assert len(admitted) + len(refused) == len(results)  # nothing else: no 500, no hang
    assert len(admitted) >= CAPACITY and refused
    assert all(finish == "length" and tokens == 12 for _, _, finish, tokens in admitted)
    assert all(int(headers["retry-after"]) >= 1 for _, headers, _, _ in refused)
    assert idle


def test_two_hundred_clients_that_go_away_leak_nothing(server):
    """Streams dropped after k chunks, blocking requests cancelled after a random delay, streams
    closed right after their headers: then no slot, queue entry or member cache row is left."""
    rng = random.Random(13)

    async def reference(client) -> str:
        response = await client.post("/completions", json=_body(False, 16, "Every member scores"))
        return response.json()["choices"][0]["text"]

    async def leave(client, gate, outcomes):
        kind, k, delay = rng.choice(("stream", "blocking", "headers")), rng.randrange(12), rng.random() * 0.2
        async with gate:
            try:
                if kind == "blocking":
                    response = await asyncio.wait_for(client.post("/completions", json=_body(False, 60)), delay)
                    outcomes["refused" if response.status_code == 429 else "finished"] += 1
                    return
                async with client.stream("POST", "/completions", json=_body(True, 60)) as response:
                    if response.status_code == 429:
                        outcomes["refused"] += 1
                        return
                    if kind == "stream":
                        async for i, _ in _enumerate(response.aiter_lines()):
                            if i >= 2 * k:
                                break
                outcomes["dropped"] += 1
            except asyncio.TimeoutError:
                outcomes["dropped"] += 1

    async def main():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as client:
            before = await reference(client)
            outcomes = {"dropped": 0, "refused": 0, "finished": 0}
            # at the batch size: a slot left by a client is free at the next step boundary, and the
            # queue takes whoever comes in between
            gate = asyncio.Semaphore(MAX_BATCH)
            await asyncio.gather(*(leave(client, gate, outcomes) for _ in range(200)))
            idle = await _wait_idle(server.engine)
            stats = server.engine.stats()
            after = await reference(client)
        return before, after, outcomes, idle, stats

    before, after, outcomes, idle, stats = asyncio.run(main())
    leaked = MAX_BATCH - server.engine.engine.free_slots
    print(f"\ndisconnects: 200 clients, {outcomes['dropped']} went away mid-request, {outcomes['refused']} "
          f"refused, {outcomes['finished']} finished first; slots leaked {leaked}, "
          f"running {stats.running}, waiting {stats.waiting}")
    assert sum(outcomes.values()) == 200 and outcomes["dropped"] > 150
    assert idle and leaked == 0 and not server.engine._streams
    assert after == before and before


async def _enumerate(lines):
    i = 0
    async for line in lines:
        yield i, line
        i += 1
