"""The command line, run as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "compose_serve.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_json_reports_every_step(tiny, tmp_path):
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"name": "mix", "method": "mixture", "members": [
        {"name": "a", "model": str(tiny["a"]), "weight": 0.5}, {"name": "b", "model": str(tiny["b"]), "weight": 0.5}]}))
    done = _cli("generate", "--config", str(config), "--prompt", "The quick", "--max-tokens", "6",
                "--top-logprobs", "3", "--weights", "a=1,b=0", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert len(out["token_ids"]) == len(out["steps"]) == out["usage"]["completion_tokens"] <= 6
    assert all(len(s["top_logprobs"]) == 3 and s["diagnostics"]["weights"] == {"a": 1.0, "b": 0.0}
               for s in out["steps"])
    assert "tokens/s" in done.stderr
    # weights a=1, b=0 is member a alone: greedy tokens equal transformers' own
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    ids = torch.tensor([tok.encode("The quick")])
    model = AutoModelForCausalLM.from_pretrained(tiny["a"]).eval()
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                          pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    assert out["token_ids"] == want[: len(out["token_ids"])]


def test_generate_error_names_the_field(tiny, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"name": "bad", "method": "mixture", "members": [
        {"name": "a", "model": str(tiny["a"]), "weight": 0.9}, {"name": "b", "model": str(tiny["b"]), "weight": 0.3}]}))
    done = _cli("generate", "--config", str(config), "--prompt", "x")
    assert done.returncode == 2 and "members.weight" in done.stderr and "sum to 1" in done.stderr
