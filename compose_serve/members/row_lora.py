"""Per-row LoRA: every row of a batch runs its own adapter (or none) through ONE copy of the base.

PEFT loads the adapters (its key mapping, ranks, ``alpha_pattern``, rsLoRA scaling); then each PEFT
``LoraLayer`` is swapped for a ``RowLoRALinear`` that keeps the base ``nn.Linear`` (the same
tensor, never copied) and every adapter's factors stacked:

    A_cat [R_total, in]   the adapters' A matrices one under the other (R_total = sum of ranks)
    B_cat [out, R_total]  their B matrices side by side, each multiplied by its scaling

A forward over ``x [N, T, in]`` whose rows use adapters ``names [N]`` is then, whatever the mix,

    y = base(x) + ((x @ A_cat^T) * M[:, None, :]) @ B_cat^T     M [N, R_total]: 1 on the row's
                                                                 adapter's columns, else 0

two small matmuls per layer instead of PEFT's gather / scatter per adapter (Punica's BGMV idea
written as dense torch: with ranks of 4-16 the wasted columns cost less than indexing). When
every row runs the same adapter the mask is dropped and only that adapter's slice is used; when
every row is the bare base (``"__base__"``) the layer is the base layer alone.

``RowAdapters`` is the one object all layers of a model read the current call's plan from:
``rows(names)`` before a forward sets it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError

BASE = "__base__"


class RowAdapters:
    """The adapters loaded into one model, and the plan of the current forward."""

    def __init__(self, names: Sequence[str], ranks: Sequence[int]) -> None:
        self.names = list(names)
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, rank in zip(names, ranks, strict=True):
            self.offsets[name] = (start, start + rank)
            start += rank
        self.total_rank = start
        self.single: tuple[int, int] | None = None  # columns of the one adapter every row uses
        self.mask: torch.Tensor | None = None  # [N, 1, R_total] when rows differ ([1, T, R_total] per token)
        self.active = False  # False: every row is the bare base
        self._key: tuple[str, ...] | None = None

    def tokens(self, names: Sequence[str], device: torch.device, dtype: torch.dtype) -> None:
        """Set the plan for a packed forward (batch 1) whose token t runs adapter ``names[t]``."""
        self.rows(names, device, dtype, per_token=True)

    def rows(self, names: Sequence[str], device: torch.device, dtype: torch.dtype, per_token: bool = False) -> None:
        """Set the plan for a forward whose row i runs adapter ``names[i]`` (or ``"__base__"``);
        ``per_token``: of a packed forward whose token i does (the mask is ``[1, T, R_total]``)."""
        key = (per_token, *names)
        if key == self._key and (self.mask is None or self.mask.device == device):
            return  # decode steps repeat the same rows: the plan is reused
        unknown = sorted(set(names) - set(self.offsets) - {BASE})
        if unknown:
            raise KeyError(f"adapters {unknown} are not loaded; loaded: {self.names}")
        distinct = set(names)
        self._key, self.mask, self.single = key, None, None
        self.active = distinct != {BASE}
        if not self.active:
            return
        if len(distinct) == 1:
            self.single = self.offsets[names[0]]
            return
        mask = torch.zeros((len(names), self.total_rank), dtype=dtype)
        for row, name in enumerate(names):
            if name != BASE:
                start, end = self.offsets[name]
                mask[row, start:end] = 1
        self.mask = (mask.unsqueeze(0) if per_token else mask.unsqueeze(1)).to(device)


class RowLoRALinear(nn.Module):
    """A base ``nn.Linear`` plus stacked LoRA factors, applied per row (module docstring)."""

    def __init__(self, base: nn.Linear, a_cat: torch.Tensor, b_cat: torch.Tensor, plan: RowAdapters) -> None:
        super().__init__()
        self.base_layer = base
        self.register_buffer("a_cat", a_cat, persistent=False)  # [R_total, in]
        self.register_buffer("b_cat", b_cat, persistent=False)  # [out, R_total], scaling folded in
        self.plan = plan

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        plan = self.plan
        if not plan.active:
            return y
        if plan.single is not None:
            start, end = plan.single
            return y + (x @ self.a_cat[start:end].T) @ self.b_cat[:, start:end].T
        low = (x @ self.a_cat.T) * plan.mask  # [N, T, R_total], other adapters' columns zeroed
        return y + low @ self.b_cat.T


def install_row_lora(peft_model) -> tuple[nn.Module, RowAdapters]:
    """Replace every PEFT LoRA layer of ``peft_model`` by a ``RowLoRALinear`` holding all its
    adapters; returns the bare transformers model (base weights untouched) and its plan object."""
    from peft.tuners.lora import LoraLayer

    names = list(peft_model.peft_config)
    for name, config in peft_model.peft_config.items():
        if getattr(config, "use_dora", False) or getattr(config, "lora_bias", False):
            raise ConfigError(f"adapter {name!r}: DoRA and LoRA bias are not supported by per-row LoRA",
                              param="adapter")
    model = peft_model.get_base_model()
    ranks: dict[str, int] = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    for _, module in layers:
        for name in module.lora_A:
            ranks.setdefault(name, module.r[name])
    order = [n for n in names if n in ranks]
    plan = RowAdapters(order, [ranks[n] for n in order])
    for path, module in layers:
        base = module.get_base_layer()
        if not isinstance(base, nn.Linear) or getattr(module, "lora_variant", None):
            raise ConfigError(f"layer {path}: per-row LoRA supports plain LoRA on linear layers only",
                              param="adapter")
        a_parts, b_parts = [], []
        for name in order:
            start, end = plan.offsets[name]
            if name in module.lora_A:
                if module.r[name] != end - start:
                    raise ConfigError(f"adapter {name!r}: layer {path} has rank {module.r[name]}, others "
                                      f"{end - start}; per-layer ranks (rank_pattern) are not supported",
                                      param="adapter")
                a_parts.append(module.lora_A[name].weight.detach())
                b_parts.append(module.lora_B[name].weight.detach() * module.scaling[name])
            else:  # this adapter leaves the layer alone: zero factors
                a_parts.append(base.weight.new_zeros((end - start, base.in_features)))
                b_parts.append(base.weight.new_zeros((base.out_features, end - start)))
        row_layer = RowLoRALinear(base, torch.cat(a_parts).contiguous(), torch.cat(b_parts, dim=1).contiguous(), plan)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, row_layer)
    return model, plan
