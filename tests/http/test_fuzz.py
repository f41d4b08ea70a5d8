"""schemathesis fuzzes /openapi.json against a real server on loopback (issue 13): chat,
completions and the model routes, ``max_tokens`` capped. No response may be a 5xx, and every
response must conform to the document (status, content type, headers, body schema).

The server counts what it answered, so the test proves that it fuzzed (how many requests, how
many were accepted and generated). Run with ``-s`` to see the counts (the README's figures).
schemathesis and hypothesis are pinned in the ``test`` extra: a pair that runs on Python 3.11.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import httpx
import pytest

from compose_serve.composition import build_composition
from compose_serve.config import parse_composition
from compose_serve.engine import Engine
from compose_serve.engine.scheduler import AsyncEngine
from compose_serve.http import InProcessBackend, build_app

from .live import LiveServer

pytest.importorskip("schemathesis")

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)
MAX_EXAMPLES = 100  # per operation and phase; about 2,000 requests in all


class CountStatuses:
    """ASGI middleware: how many responses of each status the server sent."""

    def __init__(self, app) -> None:
        self.app, self.statuses = app, Counter()

    async def __call__(self, scope, receive, send):
        async def counting(message):
            if message["type"] == "http.response.start":
                self.statuses[message["status"]] += 1
            await send(message)

        await self.app(scope, receive, counting if scope["type"] == "http" else send)


@pytest.fixture(scope="module")
def server(tiny):
    def members(*names):
        return [{"name": n, "model": str(tiny[k])} for n, k in zip(names, ("a", "b"), strict=True)]

    specs = [
        {"name": "mix", "method": "mixture", "members": members("a", "b"), "engine": {"max_batch": 8, "max_queue": 64}},
        {"name": "delta", "method": "delta", "members": members("expert", "antiexpert"), "params": {"alpha": 0.5}},
    ]
    engines = [AsyncEngine(Engine(build_composition(parse_composition(s)))) for s in specs]
    counter = CountStatuses(build_app(InProcessBackend(engines)))
    live = LiveServer(counter).start()
    live.statuses = counter.statuses
    yield live
    live.stop()


def _fuzzed_schema(schema: dict, models: list[str]) -> dict:
    """The server's own document, with generation bounded: known model names (and one unknown),
    ``max_tokens`` <= 8, ``n`` <= 2, so that fuzzing reaches the engine and stays fast."""
    small = {"anyOf": [{"type": "integer", "maximum": 8}, {"type": "null"}]}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        fields = schema["components"]["schemas"][name]["properties"]
        fields["model"] = {"type": "string", "enum": [*models, "no-such-model"]}
        for field in ("max_tokens", "max_completion_tokens"):
            if field in fields:
                fields[field] = small
        fields["n"] = {"anyOf": [{"type": "integer", "maximum": 2}, {"type": "null"}]}
        if "best_of" in fields:
            fields["best_of"] = {"anyOf": [{"type": "integer", "maximum": 2}, {"type": "null"}]}
    return schema


def test_schemathesis_finds_no_server_error_and_no_nonconforming_response(server, tmp_path):
    models = [card["id"] for card in httpx.get(server.base_url + "/models").json()["data"]]
    schema = _fuzzed_schema(httpx.get(server.url + "/openapi.json").json(), models)
    path = tmp_path / "openapi.json"
    path.write_text(json.dumps(schema))
    server.statuses.clear()
    command = [
        sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
        "run", str(path), "--url", server.url, "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES),
        "--seed", "13", "--workers", "1", "--include-path-regex", "^/v1/", "--request-timeout", "60",
        "--suppress-health-check", "all", "--no-color",
    ]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    statuses = dict(sorted(server.statuses.items()))
    total = sum(statuses.values())
    print(f"\nschemathesis: {total} requests fuzzed, statuses {statuses}")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert total >= 500  # it really fuzzed
    assert statuses.get(200, 0) >= 100  # and much of it reached the engine
    assert not [s for s in statuses if s >= 500]
