"""``compose-serve serve`` in a subprocess: two configs at once, the URL printed, Ctrl-C exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import httpx
import yaml

from compose_serve.client import ComposeClient


def test_serve_two_configs_then_ctrl_c(tiny, tmp_path):
    configs = []
    for name, members in (("pair", ["a", "b"]), ("single", ["c"])):
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "name": name,
                    "method": "mixture",
                    "members": [{"name": m, "model": str(tiny[m])} for m in members],
                }
            )
        )
        configs.append(str(path))
    env = {**os.environ, "COMPOSE_SERVE_API_KEY": "k3y"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "compose_serve.cli",
            "serve",
            "--config",
            *configs,
            "--port",
            "0",
            "--in-process",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        ready = []
        reader = threading.Thread(target=lambda: ready.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(120)
        assert ready and "serving" in ready[0], (ready, proc.poll())
        url = re.search(r"http://\S+/v1", ready[0]).group(0)
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(url.removesuffix("/v1") + "/health").json()["status"] == "ok"
        assert httpx.get(url + "/models").status_code == 401  # the key came from the environment
        with ComposeClient(url, api_key="k3y", max_retries=0) as client:
            assert {m.id for m in client.models.list().data} == {"pair", "single", "a", "b"}
            out = client.completions.create(
                model="single", prompt="The quick", max_tokens=4, ignore_eos=True
            )
            assert out.usage.completion_tokens == 4
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err
    assert "stopped" in err
