"""The router of a routed composition: prompt -> one probability per member, before any member decodes.

Features come from the members' shared BASE model (no adapter active): the hidden states after
decoder block ``layer`` (1-based; ``layer == num_layers`` is the last block's output, before the
final norm), pooled over the prompt. The forward stops right after that block, so a feature costs
``layer / num_layers`` of a prefill.

    layer_features(decoder, input_ids [n, L], attention_mask [n, L], layer, pooling) -> [n, d] float32
    chunk_features(decoder, state, piece, layer, pooling)   one prompt, a chunk at a time (the engine)
    Router.probs(features [n, d]) -> [n, K] = softmax(((f - mean) / std) @ weight.T + bias)

Inputs are LEFT-padded (as the engine pads prompts): position ids count real tokens only, ``mean``
pools over the real tokens, ``last`` takes column -1 (every row's last real token).

On disk (``Router.save`` / ``Router.load``), a folder with
- ``router.safetensors``: ``mean [d]``, ``std [d]``, ``weight [K, d]``, ``bias [K]`` (float32);
- ``router.json``: ``member_names`` (the K classes, in column order), ``layer``, ``pooling``,
  ``hidden_size`` (d), and ``settings`` (free-form: base model, fit settings, held-out report, ...).
Every problem ``load`` finds is a ``ConfigError`` with ``param="params.router"`` naming it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConfigError

POOLINGS = ("mean", "last")
WEIGHTS_FILE = "router.safetensors"
CONFIG_FILE = "router.json"
PARAM = "params.router"


class _StopForward(Exception):
    """Raised by the hook on the deepest wanted block: the rest of the forward is not needed."""


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``hidden [n, L, d]`` of left-padded rows -> ``[n, d]`` float32 (``mean`` or ``last``)."""
    hidden = hidden.float()
    if pooling == "last":
        return hidden[:, -1]
    mask = attention_mask.to(hidden.device, torch.float32).unsqueeze(-1)  # [n, L, 1]
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def multi_layer_features(
    decoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: list[int],
    pooling: str = "mean",
) -> dict[int, torch.Tensor]:
    """Pooled outputs of several blocks in one forward that stops after the deepest: layer -> ``[n, d]``."""
    blocks = decoder.layers
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    for layer in layers:
        if not 1 <= layer <= len(blocks):
            raise ValueError(f"layer must be in 1..{len(blocks)} (the decoder's blocks), got {layer}")
    device = next(decoder.parameters()).device
    ids, mask = input_ids.to(device), attention_mask.to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = blocks_output(decoder, layers, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    return {layer: pool(hidden, mask, pooling) for layer, hidden in out.items()}


def blocks_output(decoder: torch.nn.Module, layers: list[int], **forward) -> dict[int, torch.Tensor]:
    """Run ``decoder(**forward)`` up to the deepest of ``layers`` (1-based blocks) and no further;
    returns each block's output hidden states ``[n, L, d]``."""
    deepest = max(layers)
    out: dict[int, torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(module, args, output):
            out[layer] = output[0] if isinstance(output, tuple) else output
            if layer == deepest:
                raise _StopForward

        return hook

    blocks = decoder.layers
    handles = [blocks[layer - 1].register_forward_hook(hook_for(layer)) for layer in sorted(set(layers))]
    try:
        with torch.inference_mode():
            decoder(**forward)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return out


@dataclass
class FeatureState:
    """One prompt's router features computed chunk by chunk (the engine routes a long prompt under
    its prefill budget, between decode steps): the blocks below ``layer`` keep a cache of what
    they saw, and the pooled output of block ``layer`` is accumulated."""

    cache: object | None = None  # a transformers DynamicCache (blocks below ``layer`` only)
    seen: int = 0  # prompt tokens taken so far
    pooled: torch.Tensor | None = None  # [d] float32: the sum (mean pooling) or the last output

    def features(self, pooling: str) -> torch.Tensor:
        """``[d]`` float32: the pooled output of block ``layer`` over the ``seen`` tokens."""
        return self.pooled / max(self.seen, 1) if pooling == "mean" else self.pooled


def chunk_features(decoder: torch.nn.Module, state: FeatureState, piece: list[int], layer: int, pooling: str,
                   cache_kwarg: str = "cache") -> None:
    """Take the next ``piece`` of one prompt into ``state`` (blocks 1..``layer`` of ``decoder``, no
    adapter active, and no further). The features of the whole prompt equal ``layer_features``'s
    for it, whatever the chunks."""
    from transformers import DynamicCache

    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if state.cache is None:
        state.cache = DynamicCache(config=decoder.config)
    device = next(decoder.parameters()).device
    ids = torch.tensor([piece], dtype=torch.long, device=device)
    positions = torch.arange(state.seen, state.seen + len(piece), device=device).unsqueeze(0)
    out = blocks_output(decoder, [layer], input_ids=ids, position_ids=positions, use_cache=True,
                        **{cache_kwarg: state.cache})
    hidden = out[layer][0].float()  # [c, d]
    if pooling == "last":
        state.pooled = hidden[-1]
    else:
        state.pooled = hidden.sum(dim=0) + (0 if state.pooled is None else state.pooled)
    state.seen += len(piece)


def layer_features(
    decoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int,
    pooling: str = "mean",
) -> torch.Tensor:
    """The output of block ``layer`` (1-based) pooled over each left-padded prompt: ``[n, d]`` float32.

    ``decoder`` is a transformers decoder stack (``model.get_decoder()``, e.g. ``LlamaModel``) with
    no adapter active; ``input_ids`` / ``attention_mask`` are ``[n, L]``, left-padded. Blocks after
    ``layer`` (and the final norm) never run.
    """
    return multi_layer_features(decoder, input_ids, attention_mask, [layer], pooling)[layer]


@dataclass
class Router:
    """Multinomial logistic regression over standardised features: K members, d features."""

    member_names: list[str]
    layer: int
    pooling: str
    mean: torch.Tensor  # [d]
    std: torch.Tensor  # [d], > 0
    weight: torch.Tensor  # [K, d]
    bias: torch.Tensor  # [K]
    settings: dict = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.mean.shape[0])

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        """``features [n, d]`` -> member probabilities ``[n, K]`` (float32, rows sum to 1)."""
        device = features.device
        z = (features.float() - self.mean.to(device)) / self.std.to(device)  # [n, d]
        return torch.softmax(z @ self.weight.to(device).T + self.bias.to(device), dim=-1)

    def save(self, directory: str | Path) -> Path:
        """Write ``router.safetensors`` and ``router.json`` into ``directory``; returns the folder."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().float().cpu().contiguous()
                   for name in ("mean", "std", "weight", "bias")}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        meta = {"member_names": list(self.member_names), "layer": self.layer, "pooling": self.pooling,
                "hidden_size": self.hidden_size, "settings": self.settings}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(
        cls, path: str | Path, member_names: list[str] | None = None, hidden_size: int | None = None,
        num_layers: int | None = None,
    ) -> Router:
        """Read a router folder (or its ``router.safetensors``; the json is the file beside it with
        suffix ``.json``) and check it: tensor shapes against the json, and, when given, the
        composition's ``member_names`` (the same names; another order is re-indexed to this one),
        the base model's ``hidden_size`` and its ``num_layers``. Any problem is a ``ConfigError``."""
        weights_file, config_file = _files(Path(path))
        meta = _read_meta(config_file)
        tensors = _read_tensors(weights_file, meta)
        names = meta["member_names"]
        _check_against(meta, member_names, hidden_size, num_layers)
        router = cls(list(names), meta["layer"], meta["pooling"], settings=meta.get("settings") or {}, **tensors)
        if member_names is not None and list(member_names) != names:  # same set, composition's order
            order = torch.tensor([names.index(n) for n in member_names])
            router.member_names = list(member_names)
            router.weight, router.bias = router.weight[order], router.bias[order]
        return router


def _files(path: Path) -> tuple[Path, Path]:
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    config = weights.with_suffix(".json")
    for f in (weights, config):
        if not f.is_file():
            raise ConfigError(f"router file {str(f)!r} does not exist (a router is a folder with {WEIGHTS_FILE} "
                              f"and {CONFIG_FILE}, written by compose-serve fit-router)", param=PARAM)
    return weights, config


def _read_meta(config_file: Path) -> dict:
    try:
        meta = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"router config {str(config_file)!r} is not valid JSON: {exc}", param=PARAM) from None
    if not isinstance(meta, dict):
        raise ConfigError(f"router config {str(config_file)!r} must hold a JSON object", param=PARAM)
    missing = [k for k in ("member_names", "layer", "pooling", "hidden_size") if k not in meta]
    if missing:
        raise ConfigError(f"router config {str(config_file)!r} lacks {missing}", param=PARAM)
    names = meta["member_names"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)
            and len(set(names)) == len(names)):
        raise ConfigError(f"router member_names must be a non-empty list of distinct names, got {names!r}",
                          param=PARAM)
    if meta["pooling"] not in POOLINGS:
        raise ConfigError(f"router pooling must be one of {list(POOLINGS)}, got {meta['pooling']!r}", param=PARAM)
    for key in ("layer", "hidden_size"):
        if not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] < 1:
            raise ConfigError(f"router {key} must be an integer >= 1, got {meta[key]!r}", param=PARAM)
    return meta


def _read_tensors(weights_file: Path, meta: dict) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"router weights {str(weights_file)!r} could not be read: {exc}", param=PARAM) from None
    k, d = len(meta["member_names"]), meta["hidden_size"]
    want = {"mean": (d,), "std": (d,), "weight": (k, d), "bias": (k,)}
    missing = sorted(set(want) - set(tensors))
    if missing:
        raise ConfigError(f"router weights {str(weights_file)!r} lack tensors {missing}", param=PARAM)
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise ConfigError(f"router tensor {name!r} has shape {list(tensors[name].shape)}, expected "
                              f"{list(shape)} (K={k} members, hidden_size={d} in {CONFIG_FILE})", param=PARAM)
        if not torch.isfinite(tensors[name]).all():
            raise ConfigError(f"router tensor {name!r} holds non-finite values", param=PARAM)
    if not (tensors["std"] > 0).all():
        raise ConfigError("router tensor 'std' must be > 0 everywhere", param=PARAM)
    return {name: tensors[name].float() for name in want}


def _check_against(meta: dict, member_names, hidden_size, num_layers) -> None:
    names = meta["member_names"]
    if member_names is not None and sorted(member_names) != sorted(names):
        raise ConfigError(f"router was fitted for members {names}, but the composition's members are "
                          f"{list(member_names)}", param=PARAM)
    if hidden_size is not None and meta["hidden_size"] != hidden_size:
        raise ConfigError(f"router hidden_size {meta['hidden_size']} does not match the base model's hidden size "
                          f"{hidden_size} (fitted on another model?)", param=PARAM)
    if num_layers is not None and meta["layer"] > num_layers:
        raise ConfigError(f"router layer {meta['layer']} exceeds the base model's {num_layers} decoder layers",
                          param=PARAM)


def default_layer(num_layers: int) -> int:
    """About two thirds of the depth (20 of SmolLM2-135M's 30 blocks), at least 1."""
    return max(1, min(num_layers, math.floor(2 * num_layers / 3 + 0.5)))
