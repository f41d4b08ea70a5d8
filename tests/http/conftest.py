"""One live server per test module (see ``live.py``)."""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

from .live import start_server


@pytest.fixture(scope="module")
def live(tiny):
    server, engines = start_server(tiny)
    server.engines = engines
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tok(tiny):
    return AutoTokenizer.from_pretrained(tiny["tokenizer"])


@pytest.fixture(scope="module")
def oai(live):
    """The official openai client on the module's live server."""
    with openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0) as client:
        yield client
