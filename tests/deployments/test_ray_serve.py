"""Ray Serve on a real local Ray instance: the official openai client through Ray's HTTP proxy.

Outputs must equal the in-process library engine exactly (greedy and seeded), for colocated and
distributed placement; a composition replica SIGKILLed mid-stream ends each of its streams with
one error event, /health keeps answering within a second, other compositions keep answering, and
Ray brings the replica back (issue 13).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from compose_serve.composition import build_composition
from compose_serve.config import parse_composition
from compose_serve.engine import Engine, Request
from compose_serve.sampling import SamplingParams

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")


def _spec(tiny, name, placement):
    return {"name": name, "method": "mixture", "deployment": {"placement": placement},
            "members": [{"name": "a", "model": str(tiny["a"]), "weight": 0.3},
                        {"name": "b", "model": str(tiny["b"]), "weight": 0.7}]}


@pytest.fixture(scope="module")
def ray_server(tiny):
    from compose_serve.deployments import build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             object_store_memory=100 * 2**20)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    specs = [parse_composition(_spec(tiny, "colo", "colocated")),
             parse_composition(_spec(tiny, "dist", "distributed")),
             parse_composition({**_spec(tiny, "other", "colocated"), "members": [
                 {"name": "c", "model": str(tiny["c"])}]})]
    serve.run(build_app(specs), name="compose", route_prefix="/")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    client.url = f"http://127.0.0.1:{port}"
    yield client
    serve.shutdown()
    ray.shutdown()


def _library(tiny, prompt, params):
    engine = Engine(build_composition(parse_composition(_spec(tiny, "lib", "colocated"))), max_batch=2)
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    return engine.generate([Request(tok.encode(prompt), params)])[0]


@pytest.mark.parametrize("model", ["colo", "dist"])
def test_greedy_and_seeded_equal_the_library_engine(ray_server, tiny, model):
    greedy = _library(tiny, "The quick", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    seeded = _library(tiny, "The quick", SamplingParams(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True))
    extra = {"ignore_eos": True}
    got = ray_server.completions.create(model=model, prompt="The quick", max_tokens=12, temperature=0,
                                        extra_body=extra)
    assert got.choices[0].text == greedy.text and got.usage.completion_tokens == 12
    stream = ray_server.completions.create(model=model, prompt="The quick", max_tokens=12, temperature=0.8,
                                           seed=7, stream=True, extra_body=extra)
    assert "".join(c.choices[0].text for c in stream if c.choices) == seeded.text


def test_a_bad_request_is_a_400_naming_the_field(ray_server):
    with pytest.raises(openai.BadRequestError) as err:
        ray_server.completions.create(model="dist", prompt="x", max_tokens=4, top_p=3.0)
    assert err.value.body["param"] == "top_p"
    with pytest.raises(openai.NotFoundError):
        ray_server.completions.create(model="nope", prompt="x", max_tokens=4)


def _stream_lines(url: str, body: dict, keep: int | None = None) -> list[str]:
    """The SSE data lines of one streamed completion (the first ``keep`` of them, then drop)."""
    lines = []
    with httpx.Client(timeout=60) as client, client.stream("POST", url + "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                if keep is not None and len(lines) >= keep:
                    break
    return lines


def _composition_stats(name: str) -> dict:
    handle = serve.get_deployment_handle(f"composition-{name}", app_name="compose")
    return handle.stats.remote().result(timeout_s=10)


def test_dropped_streams_free_their_slots_under_ray(ray_server):
    """Issue 13, item 8: clients that read three chunks and go away stop their generation."""
    body = {"model": "colo", "prompt": "The", "max_tokens": 200, "ignore_eos": True, "stream": True}
    threads = [threading.Thread(target=_stream_lines, args=(ray_server.url, body, 3)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    deadline = time.monotonic() + 5
    while (stats := _composition_stats("colo"))["running"] + stats["waiting"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats["running"] == stats["waiting"] == 0


def test_metrics_under_ray_have_the_in_process_names(ray_server):
    ray_server.completions.create(model="colo", prompt="The", max_tokens=2)
    text = httpx.get(ray_server.url + "/metrics", timeout=10).text
    for name in ("compose_serve:num_requests_running{", "vllm:num_requests_waiting{",
                 'compose_serve:request_success_total{finished_reason="length",model_name="colo"}',
                 "vllm:generation_tokens_total{", "vllm:time_to_first_token_seconds_bucket{"):
        assert name in text


def test_sigkilled_replica_ends_each_stream_and_health_keeps_answering(ray_server):
    """SIGKILL of the composition replica during 4 streams (issue 13): each stream gets one error
    event and ends, /health answers within 1 s throughout (503 while the replica is down), and a
    request succeeds again within 60 s; the killed composition's neighbour keeps serving."""
    url = ray_server.url
    body = {"model": "colo", "prompt": "The", "max_tokens": 240, "ignore_eos": True, "stream": True}
    streams: list[list[str]] = []
    threads = [threading.Thread(target=lambda: streams.append(_stream_lines(url, body))) for _ in range(4)]
    health: list[tuple[int, float]] = []
    stop = threading.Event()

    def poll_health():
        with httpx.Client(timeout=5) as client:
            while not stop.is_set():
                started = time.perf_counter()
                status = client.get(url + "/health").status_code
                health.append((status, time.perf_counter() - started))
                time.sleep(0.2)

    poller = threading.Thread(target=poll_health)
    poller.start()
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while _composition_stats("colo")["running"] < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(_composition_stats("colo")["pid"], signal.SIGKILL)
    killed = time.monotonic()
    for thread in threads:
        thread.join(30)
    other = ray_server.completions.create(model="other", prompt="The", max_tokens=4)
    attempts = []
    while True:  # Ray starts a new replica; until then each request is answered (503), not left waiting
        started = time.monotonic()
        try:
            again = ray_server.completions.create(model="colo", prompt="The", max_tokens=4)
            break
        except openai.APIStatusError as exc:
            attempts.append((exc.status_code, time.monotonic() - started))
            assert time.monotonic() - killed < 60
            time.sleep(0.5)
    recovered = time.monotonic() - killed
    time.sleep(1.0)
    stop.set()
    poller.join()
    print(f"\nray SIGKILL: {len(streams)} streams ended with one error event each; recovery {recovered:.1f} s; "
          f"{len(attempts)} requests refused meanwhile (statuses {sorted({a[0] for a in attempts})}, slowest "
          f"{max([a[1] for a in attempts], default=0):.2f} s); /health slowest {max(h[1] for h in health):.2f} s "
          f"over {len(health)} polls, statuses {sorted({h[0] for h in health})}")
    assert len(streams) == 4
    for lines in streams:
        errors = [json.loads(x) for x in lines if x.startswith('{"error"')]
        assert len(errors) == 1 and lines[-1].startswith('{"error"')  # one error event, then the end
        assert errors[0]["error"]["type"] == "service_unavailable"
    assert other.usage.completion_tokens >= 1 and again.usage.completion_tokens >= 1
    assert all(status == 503 for status, _ in attempts) and all(seconds < 6 for _, seconds in attempts)
    assert max(seconds for _, seconds in health) < 1.0 and 503 in {status for status, _ in health}


def test_prompt_logprobs_and_structured_outputs_under_ray(ray_server, tiny):
    """Issue 14 through Ray's proxy: echo + logprobs with max_tokens 0 equal the library engine's
    prompt log-probs (colocated); a distributed composition, whose members score one position at
    a time, refuses them with a 400 naming the field; a guided choice holds on both placements."""
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    engine = Engine(build_composition(parse_composition(_spec(tiny, "lib", "colocated"))), max_batch=2)
    ids = tok.encode("The quick brown fox")
    [want] = engine.generate([Request(ids, SamplingParams(max_tokens=0, prompt_logprobs=1))])
    echo = ray_server.completions.create(model="colo", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    got = echo.choices[0].logprobs.token_logprobs
    assert got[0] is None and echo.usage.completion_tokens == 0
    assert got[1:] == pytest.approx([p.logprob for p in want.prompt_logprobs[1:]], abs=1e-5)
    with pytest.raises(openai.BadRequestError) as err:
        ray_server.completions.create(model="dist", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    assert err.value.body["param"] == "prompt_logprobs"
    for model in ("colo", "dist"):
        chat = ray_server.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Pick one."}], max_tokens=8,
            extra_body={"guided_choice": ["alpha", "beta"]})
        assert chat.choices[0].message.content in ("alpha", "beta")
