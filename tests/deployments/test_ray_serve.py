"""Ray Serve on a real local Ray instance: the official openai client through Ray's HTTP proxy.

Outputs must equal the in-process library engine exactly (greedy and seeded), for colocated and
distributed placement; a composition replica killed mid-stream ends that stream with one error
event, other compositions keep answering, and Ray brings the replica back.
"""

from __future__ import annotations

import os
import socket
import time

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


def test_killed_replica_ends_its_stream_with_an_error_and_comes_back(ray_server):
    stream = ray_server.completions.create(model="colo", prompt="The", max_tokens=200, stream=True,
                                           extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].text is not None
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "composition-colo" in a["name"] and a["namespace"] == "serve"]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace="serve"), no_restart=True)
    with pytest.raises(openai.APIError):  # one SSE error event ends the stream
        for _ in stream:
            pass
    other = ray_server.completions.create(model="other", prompt="The", max_tokens=4)
    assert other.usage.completion_tokens >= 1  # another composition keeps answering
    deadline = time.monotonic() + 120
    while True:  # Ray starts a new replica; a request a little later succeeds
        try:
            again = ray_server.completions.create(model="colo", prompt="The", max_tokens=4)
            break
        except openai.APIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    assert again.usage.completion_tokens >= 1
