"""One live server per test module (see ``live.py``)."""

from __future__ import annotations

import pytest

from .live import start_server


@pytest.fixture(scope="module")
def live(tiny):
    server, engines = start_server(tiny)
    server.engines = engines
    yield server
    server.stop()
