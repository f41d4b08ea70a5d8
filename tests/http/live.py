"""A real uvicorn server on loopback, in a thread of the test process, and the test compositions.

Running in-process lets a test hold the engine's steps (``HeldEngine``) while HTTP clients talk
to the server, so queue and cancel tests never depend on this machine's speed.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from compose_serve.composition import build_composition
from compose_serve.config import parse_composition
from compose_serve.engine import Engine, Request
from compose_serve.engine.scheduler import AsyncEngine
from compose_serve.http import InProcessBackend, build_app

#: the JSON schema the structured-output tests constrain to (a string with maxLength, an integer
#: range and an enum: the kinds xgrammar compiles differently)
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}


class HeldEngine(Engine):
    """An Engine whose ``step`` waits while ``go`` is clear, then sleeps ``delay`` seconds, and
    raises once when ``fail_next`` is set."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.go = threading.Event()
        self.go.set()
        self.delay = 0.0
        self.fail_next = False

    def step(self):
        self.go.wait()
        if self.delay:
            time.sleep(self.delay)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected step failure")
        return super().step()


def specs(tiny) -> dict[str, dict]:
    """The served compositions: a mixture (members a, b), a delta, and one held for queue tests."""

    def member(name, key, **kw):
        return {"name": name, "model": str(tiny[key]), **kw}

    return {
        "tiny-mix": {
            "name": "tiny-mix",
            "method": "mixture",
            "members": [member("a", "a"), member("b", "b")],
            "engine": {"max_batch": 4, "max_queue": 64},
        },
        "tiny-delta": {
            "name": "tiny-delta",
            "method": "delta",
            "members": [member("expert", "a"), member("antiexpert", "b")],
            "params": {"alpha": 0.5},
        },
        "held": {
            "name": "held",
            "method": "mixture",
            "members": [member("solo", "c")],
            "engine": {"max_batch": 1, "max_queue": 2},
        },
    }


def build_composition_named(tiny, name: str):
    return build_composition(parse_composition(specs(tiny)[name]))


def reference(tiny, name: str, requests: list[Request]):
    """The plain Engine on a fresh copy of composition ``name``, each request alone."""
    composition = build_composition_named(tiny, name)
    out = []
    for r in requests:
        copy = Request(list(r.prompt_ids), r.params, r.composition)
        out.append(Engine(composition, max_batch=1).generate([copy])[0])
    return out


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(self, app) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def serve_specs(tiny_specs: list[dict], held: tuple[str, ...] = (), **app_options):
    """A live server for ``tiny_specs`` (composition dicts; those named in ``held`` on a
    HeldEngine); returns it and its AsyncEngines by name. ``app_options`` go to ``build_app``."""
    engines = {}
    for spec in tiny_specs:
        composition = build_composition(parse_composition(spec))
        engine = HeldEngine(composition) if spec["name"] in held else Engine(composition)
        engines[spec["name"]] = AsyncEngine(engine)
    app = build_app(InProcessBackend(list(engines.values())), **app_options)
    return LiveServer(app).start(), engines


def start_server(tiny, api_key: str | None = None) -> tuple[LiveServer, dict[str, AsyncEngine]]:
    """Every composition of ``specs`` behind one server; returns it and its AsyncEngines."""
    engines = {}
    for name in specs(tiny):
        composition = build_composition_named(tiny, name)
        engine = HeldEngine(composition) if name == "held" else Engine(composition)
        engines[name] = AsyncEngine(engine)
    app = build_app(InProcessBackend(list(engines.values())), api_key=api_key)
    return LiveServer(app).start(), engines
