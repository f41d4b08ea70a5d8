"""``compose-serve merge``: the weight-merged baselines a user would pick instead of composing.

Every method writes a normal model folder (``config.json``, safetensors weights, the tokenizer
with its chat template) that ``from_pretrained`` and a composition member both load.

Inputs are two or more models. Each is a full model folder, or a PEFT adapter folder of ``--base``
(an ``adapter_config.json`` inside), which is first merged into the base (``merge_and_unload``)
and saved once into a cache folder keyed by the adapter's content.

- ``linear``, ``ties``, ``dare_ties``, ``task_arithmetic``: mergekit (``run_merge`` with a
  ``MergeConfiguration``, local folders, float32, fixed seed). Task vectors (the last three) are
  taken against ``--base``; ``--density`` is the fraction TIES / DARE keep.
- ``peft_weighted``: PEFT's ``add_weighted_adapter`` over the adapters themselves
  (``--combination``, PEFT's default ``svd``), then merged into the base.
- ``mod_rule``: the MoD weight rule of the paper's released code (ALGORITHMS.md, section 1): for
  every parameter whose name contains ``mlp``, ``W = where(minmax(W0) < w0, W0, W1)`` with
  ``minmax(W0) = (W0 - min W0) / (max W0 - min W0)`` (all zeros when ``W0`` is constant);
  every other tensor comes from model 0. Two models; weights ``[0.9, 0.1]`` by default.

With LoRA specialists of one base, ``linear`` with weights ``w`` equals ``task_arithmetic`` with
the same ``w`` when they sum to 1 (``W0 + sum_k w_k dW_k`` both), and PEFT's ``cat`` combination too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MERGEKIT_METHODS = ("linear", "ties", "dare_ties", "task_arithmetic")
METHODS = (*MERGEKIT_METHODS, "peft_weighted", "mod_rule")
MOD_RULE_WEIGHTS = (0.9, 0.1)


# -- inputs --------------------------------------------------------------------------------
def is_adapter(path: str | Path) -> bool:
    """A PEFT adapter folder (as opposed to a full model folder)."""
    return (Path(path) / "adapter_config.json").is_file()


def base_dir(base: str) -> Path:
    """The base model's folder (``smollm2-135m-instruct`` resolves to its converted folder)."""
    from .members.smollm2 import resolve_model

    return Path(resolve_model(base)).expanduser()


def adapter_digest(adapter: str | Path) -> str:
    """SHA-256 of an adapter folder's config and weights: merges are cached by content, not path."""
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update((Path(adapter) / name).read_bytes())
    return digest.hexdigest()


def merged_adapter_dir(base: str, adapter: str | Path, cache: Path) -> Path:
    """``base`` with ``adapter`` merged into its weights, saved under ``cache`` (once per content)."""
    adapter = Path(adapter)
    digest = hashlib.sha256(str(base_dir(base).resolve()).encode())
    digest.update(adapter_digest(adapter).encode())
    target = cache / f"{adapter.name}-{digest.hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return target
    from .members.hf import attach_adapter

    lm = attach_adapter(load_float32(base_dir(base)), str(adapter), merge=True)
    save_model(lm, base_dir(base), target)
    return target


def model_dirs(base: str, inputs: list[str], cache: Path) -> list[Path]:
    """Full model folders for ``inputs`` (adapters merged into ``base`` first)."""
    return [merged_adapter_dir(base, p, cache) if is_adapter(p) else Path(p) for p in inputs]


def load_float32(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def save_model(lm: torch.nn.Module, tokenizer_dir: Path, out: Path) -> None:
    """Weights (safetensors) + config of ``lm`` and the tokenizer of ``tokenizer_dir`` into ``out``."""
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)


# -- the methods ---------------------------------------------------------------------------
def mergekit_config(
    method: str, base: Path, models: list[Path], weights: list[float], density: float
):
    """The ``MergeConfiguration`` of one mergekit method over local folders, in float32."""
    from mergekit.config import MergeConfiguration

    def params(w: float) -> dict:
        return (
            {"weight": w, "density": density} if method in ("ties", "dare_ties") else {"weight": w}
        )

    data = {
        "merge_method": method,
        "models": [
            {"model": str(m), "parameters": params(w)} for m, w in zip(models, weights, strict=True)
        ],
        "dtype": "float32",
        "out_dtype": "float32",
        "tokenizer_source": "base",
    }
    if method != "linear":
        data["base_model"] = str(base)
    else:
        data["tokenizer_source"] = str(models[0])
    return MergeConfiguration.model_validate(data)


def merge_mergekit(
    method: str,
    base: Path,
    models: list[Path],
    weights: list[float],
    out: Path,
    density: float = 0.5,
    seed: int = 0,
) -> None:
    """Run mergekit (``run_merge``) offline on the CPU into ``out``."""
    from mergekit.merge import MergeOptions, run_merge

    config = mergekit_config(method, base, models, weights, density)
    options = MergeOptions(
        copy_tokenizer=True,
        random_seed=seed,
        quiet=True,
        write_model_card=False,
        device="cpu",
        lazy_unpickle=False,
    )
    run_merge(config, out_path=str(out), options=options)


def merge_peft_weighted(
    base: str,
    adapters: list[str],
    weights: list[float],
    out: Path,
    combination: str = "svd",
    density: float | None = None,
) -> None:
    """PEFT's ``add_weighted_adapter`` over LoRA adapters of ``base``, merged and saved."""
    from peft import PeftModel

    if not all(is_adapter(a) for a in adapters):
        raise ValueError("peft_weighted takes PEFT adapter folders only")
    names = [f"input{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(
        load_float32(base_dir(base)), adapters[0], adapter_name=names[0]
    )
    for name, adapter in zip(names[1:], adapters[1:], strict=True):
        model.load_adapter(adapter, adapter_name=name)
    uses_density = density is not None and ("ties" in combination or "dare" in combination)
    extra = {"density": density} if uses_density else {}
    model.add_weighted_adapter(names, weights, "merged", combination_type=combination, **extra)
    model.set_adapter("merged")
    save_model(model.merge_and_unload(adapter_names=["merged"]), base_dir(base), out)


def mod_rule_tensor(w0: torch.Tensor, w1: torch.Tensor, weight0: float) -> torch.Tensor:
    """``where(minmax(w0) < weight0, w0, w1)``, ``minmax`` over the whole tensor (0 if constant)."""
    low, high = w0.min(), w0.max()
    normalized = torch.zeros_like(w0) if low == high else (w0 - low) / (high - low)
    return torch.where(normalized < weight0, w0, w1)


@torch.no_grad()
def merge_mod_rule(models: list[Path], weights: list[float], out: Path) -> None:
    """The MoD weight rule on two model folders (MLP tensors mixed, the rest from model 0)."""
    if len(models) != 2 or len(weights) != 2:
        raise ValueError("the MoD weight rule takes exactly two models and two weights")
    if abs(sum(weights) - 1.0) > 1e-5:
        raise ValueError(f"MoD weights must sum to 1, got {weights}")
    model0, model1 = load_float32(models[0]), load_float32(models[1])
    other = dict(model1.named_parameters())
    for name, param in model0.named_parameters():
        if "mlp" in name:
            param.copy_(mod_rule_tensor(param, other[name], weights[0]))
    save_model(model0, models[0], out)


def merge(
    method: str,
    base: str,
    inputs: list[str],
    weights: list[float],
    out: str | Path,
    density: float = 0.5,
    combination: str = "svd",
    seed: int = 0,
    cache: str | Path | None = None,
) -> Path:
    """Merge ``inputs`` with ``method`` into the model folder ``out``; see the module docstring."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; methods are {list(METHODS)}")
    if len(inputs) < 2 or len(weights) != len(inputs):
        raise ValueError(
            f"give two or more inputs and one weight each, got {len(inputs)} and {len(weights)}"
        )
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)  # a half-written folder from an earlier run must not survive
    if method == "peft_weighted":
        merge_peft_weighted(base, inputs, weights, out, combination, density)
    else:
        from .members.smollm2 import cache_root

        folders = model_dirs(
            base, inputs, Path(cache) if cache else cache_root() / "merged-adapters"
        )
        if method == "mod_rule":
            merge_mod_rule(folders, weights, out)
        else:
            merge_mergekit(method, base_dir(base), folders, weights, out, density, seed)
    record = {
        "method": method,
        "base": base,
        "inputs": [str(i) for i in inputs],
        "input_digests": [adapter_digest(i) if is_adapter(i) else None for i in inputs],
        "weights": weights,
        "density": density if method in ("ties", "dare_ties") else None,
        "combination": combination if method == "peft_weighted" else None,
        "seed": seed,
    }
    (out / "compose_serve_merge.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


# -- the command ---------------------------------------------------------------------------
def add_merge(subparsers) -> argparse.ArgumentParser:
    """Register ``merge`` on an argparse ``subparsers`` object; sets ``func=run_merge``."""
    p = subparsers.add_parser("merge", help="merge models or adapters in weight space (a baseline)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument(
        "--base", default="smollm2-135m-instruct", help="the base model (folder or name)"
    )
    p.add_argument(
        "--adapters",
        nargs="+",
        required=True,
        metavar="DIR",
        help="PEFT adapters of --base, or full model folders",
    )
    p.add_argument(
        "--weights",
        nargs="+",
        type=float,
        default=None,
        help="one per input (default: uniform; mod_rule: 0.9 0.1)",
    )
    p.add_argument("--density", type=float, default=0.5, help="ties / dare_ties: fraction kept")
    p.add_argument(
        "--combination",
        default="svd",
        help="peft_weighted: add_weighted_adapter's combination_type",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="folder for adapters merged into the base")
    p.add_argument("--out", required=True)
    p.set_defaults(func=run_merge)
    return p


def run_merge(args) -> int:
    """Merge as ``args`` say; prints the output folder. Returns the exit status (0)."""
    weights = args.weights
    if weights is None:
        n = len(args.adapters)
        weights = list(MOD_RULE_WEIGHTS) if args.method == "mod_rule" else [1.0 / n] * n
    out = merge(
        args.method,
        args.base,
        args.adapters,
        weights,
        args.out,
        density=args.density,
        combination=args.combination,
        seed=args.seed,
        cache=args.cache,
    )
    print(out)
    return 0
