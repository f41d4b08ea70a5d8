"""SlotCache: one left-padded batch KV cache whose rows are addressed by key.

Layout (as in text-generation-inference's padded batches): every layer holds keys and values
``[R, H, L, hd]`` for R rows, each row's tokens right-aligned; ``mask [R, L]`` marks the real
positions (1) and the left padding (0); ``next_pos [R]`` is each row's next position id.
New rows join by ``extend`` (both sides padded on the left to a common length, then
concatenated); rows leave by ``drop`` (the others are kept, and columns that became padding in
every row are trimmed). A running row is never recomputed.

Keys are hashable row ids: a slot number for a plain member, ``(slot, stream)`` for a siamese one.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class SlotCache:
    """A batch KV cache with addressable rows; see the module docstring."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.keys: list[Hashable] = []
        self.mask: torch.Tensor | None = None  # [R, L] long
        self.next_pos: torch.Tensor | None = None  # [R] long

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def length(self) -> int:
        """Columns currently held (padding included)."""
        return 0 if self.mask is None else self.mask.shape[1]

    def extend(self, cache: DynamicCache, mask: torch.Tensor, keys: Sequence[Hashable]) -> None:
        """Append rows prefilled elsewhere: ``cache`` with ``mask [n, Lp]`` (left-padded)."""
        duplicate = set(keys) & set(self.keys)
        if duplicate:
            raise ValueError(f"rows already in the cache: {sorted(map(str, duplicate))}")
        _check_layers(cache)
        next_pos = mask.sum(dim=1)  # positions are 0..len-1 over the real tokens
        if self.cache is None:
            self.cache, self.mask, self.next_pos, self.keys = cache, mask, next_pos, list(keys)
            return
        total = max(self.length, mask.shape[1])
        pad_old, pad_new = total - self.length, total - mask.shape[1]
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, pad_old), _pad_left(new.keys, pad_new)])
            old.values = torch.cat([_pad_left(old.values, pad_old), _pad_left(new.values, pad_new)])
        self.mask = torch.cat([F.pad(self.mask, (pad_old, 0)), F.pad(mask, (pad_new, 0))])
        self.next_pos = torch.cat([self.next_pos, next_pos])
        self.keys.extend(keys)

    def select(self, keys: Sequence[Hashable]) -> None:
        """Keep exactly ``keys``, in that order; trims columns that are padding in every row."""
        keys = list(keys)
        if keys == self.keys:
            return
        if not keys:
            self.__init__()
            return
        index = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in keys if k not in index]
        if missing:
            raise KeyError(f"rows not in the cache: {missing}")
        rows = torch.tensor([index[k] for k in keys], device=self.mask.device)
        mask = self.mask.index_select(0, rows)
        first = int(mask.any(dim=0).long().argmax())  # first column some row still uses
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, rows)[:, :, first:]
            layer.values = layer.values.index_select(0, rows)[:, :, first:]
        self.mask, self.next_pos, self.keys = mask[:, first:], self.next_pos.index_select(0, rows), keys

    def drop(self, keys: Sequence[Hashable]) -> None:
        """Forget ``keys`` (unknown keys are ignored)."""
        gone = set(keys)
        self.select([k for k in self.keys if k not in gone])

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask ``[R, L+1]`` and position ids ``[R, 1]`` for a one-token decode of every row."""
        ones = torch.ones_like(self.mask[:, :1])
        return torch.cat([self.mask, ones], dim=1), self.next_pos.unsqueeze(1)

    def advance(self, mask: torch.Tensor) -> None:
        """Record a one-token decode of every row (``mask`` as returned by ``step_inputs``)."""
        self.mask = mask
        self.next_pos = self.next_pos + 1


def _pad_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """Pad ``[R, H, L, hd]`` with n zero columns in front of L."""
    return x if n == 0 else F.pad(x, (0, 0, n, 0))


def _check_layers(cache: DynamicCache) -> None:
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(
                f"cache layers of type {type(layer).__name__} (sliding-window or linear attention) "
                "are not supported by the slot cache yet; only full-attention models are"
            )
