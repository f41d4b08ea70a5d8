"""SlotCache: a preallocated KV cache whose rows are addressed by key, written in place.

One cache serves every kind of member: a plain member keys its rows by slot, members on a shared
base by ``(member, slot)``, a siamese pair by ``(member, slot, stream)``.

Layout (gpt-fast's static cache, with per-row lengths): every layer holds keys and values
``[R_cap, H, L_cap, hd]``, zeros where nothing was written. A row's tokens sit at columns
``0 .. length-1`` (left-aligned, so a token's column is its position). Rows are kept in two ranges:

    [0, n_decoding)          rows that decode: one decode forward reads them as a VIEW, no copy
    [n_decoding, n_live)     rows still being prefilled (chunk by chunk)

- ``plan_prefill(keys, chunk_lens)`` admits new keys at the end and plans a forward that appends
  each row's next chunk (``chunk_lens[i]`` tokens) after its current length;
- ``plan_decode(keys)`` plans a one-token forward over exactly the decoding rows (a row whose
  prefill is done joins them here, by one row swap);
- during the forward, the model calls ``update(k, v, layer)``: the new keys and values are written
  in place at each row's columns, and the attention reads the planned rows' first ``kv_len``
  columns (a view for a range of rows; prefill rows that are scattered are gathered);
- ``plan_packed(decode_keys, prefill_keys, chunk_lens)`` plans ONE forward over both: the decoding
  rows' next tokens and the prefilling rows' next chunks packed into a single sequence of T tokens
  (batch 1), so the weights are read once per step; ``update`` writes every token at its own
  (row, column) and hands the attention the whole buffers, and ``packed_attention`` attends each
  part to its own rows (the decode rows as one batch, each chunk to its row);
- ``release(keys)`` frees rows: the last row of the range moves into the hole (one row copied,
  its own length only); no other row is ever touched;
- ``checkpoint()`` / ``rollback(saved)`` undo the forwards planned since the checkpoint (one that
  failed half-way included): rows admitted since are released, the others get their lengths back;
  what those forwards wrote past the old lengths is never read, and is overwritten when the rows
  advance again.
Capacity grows by doubling (rows) and by ``BLOCK``-token steps (length) up to ``max_length``;
growing copies the cache once, amortised over many steps.

The attention mask is built here as a 4D boolean ``[n, 1, q, kv_len]`` (True = attend): query t of
row i (absolute position ``p = start_i + t``) sees the columns ``j <= p`` that row i holds. Query
rows past a row's chunk (padding) see the row's real columns only, so no row is ever empty.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

BLOCK = 256  # length capacity grows in steps of this many tokens


@dataclass
class Plan:
    """One forward over ``rows`` (physical indices, in the order of the forward's batch)."""

    rows: torch.Tensor  # [n] long
    write_cols: torch.Tensor  # [n, q] long: the column each new token goes to
    kv_len: int  # columns the attention reads
    contiguous: bool  # rows form the range rows[0] .. rows[-1]: read as a view


@dataclass
class PackedPlan:
    """One packed forward (batch 1, T tokens): the ``decoding`` rows' tokens (physical rows
    ``0 .. decoding-1``, in that order) first, then each chunk of ``segments``."""

    write_rows: torch.Tensor  # [T] long: the row each token's keys and values go to
    write_cols: torch.Tensor  # [T] long: their column
    decoding: int
    decode_kv_len: int
    decode_mask: torch.Tensor | None  # [decoding, 1, 1, decode_kv_len] bool
    segments: list[tuple[int, int, int, int]]  # (row, start column, tokens, offset in the T tokens)
    segment_masks: list[torch.Tensor]  # each [1, 1, tokens, start + tokens] bool: causal from start


def packed_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                     dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """A transformers attention function for a packed forward (``SlotCache.plan_packed``).

    ``query [1, Hq, T, hd]``; ``key``/``value`` are the cache's whole buffers ``[R_cap, Hkv, L_cap, hd]``
    (``SlotCache.update`` returns them for a packed plan); ``kwargs["slot_plan"]`` is the plan.
    Returns ``([1, T, Hq, hd], None)``: each part attended by transformers' own SDPA function."""
    plan: PackedPlan = kwargs["slot_plan"]
    outs = []
    b = plan.decoding
    if b:
        q = query[0, :, :b].transpose(0, 1).unsqueeze(2)  # [B, Hq, 1, hd]
        out, _ = sdpa_attention_forward(module, q, key[:b, :, : plan.decode_kv_len], value[:b, :, : plan.decode_kv_len],
                                        plan.decode_mask, dropout=0.0, scaling=scaling, is_causal=False)
        outs.append(out.transpose(0, 1))  # [B, 1, Hq, hd] -> [1, B, Hq, hd]
    for (row, start, n, offset), mask in zip(plan.segments, plan.segment_masks, strict=True):
        kv = slice(0, start + n)
        out, _ = sdpa_attention_forward(module, query[:, :, offset : offset + n], key[row : row + 1, :, kv],
                                        value[row : row + 1, :, kv], mask, dropout=0.0, scaling=scaling,
                                        is_causal=False)
        outs.append(out)  # [1, n, Hq, hd]
    return torch.cat(outs, dim=1), None


PACKED_ATTENTION = "compose_serve_packed"


def register_packed_attention() -> str:
    """Register ``packed_attention`` with transformers (once); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    return PACKED_ATTENTION


class SlotCache(Cache):
    """A keyed, preallocated KV cache; see the module docstring."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, max_length: int, rows: int = 4) -> None:
        super().__init__(layers=[])
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device, self.max_length = dtype, torch.device(device), max_length
        self.keys_: list[torch.Tensor] = []
        self.values_: list[torch.Tensor] = []
        self._allocate(rows, min(BLOCK, max_length))
        self.order: list[Hashable] = []  # physical row -> key, live rows only
        self.row_of: dict[Hashable, int] = {}
        self.lengths: list[int] = []  # tokens held, per physical row
        self.n_decoding = 0
        self.plan: Plan | PackedPlan | None = None

    @classmethod
    def for_model(cls, config, dtype: torch.dtype, device: torch.device, max_length: int) -> SlotCache:
        """A cache shaped for a transformers decoder config (full attention on every layer)."""
        for kind in getattr(config, "layer_types", None) or ["full_attention"]:
            if kind != "full_attention":
                raise NotImplementedError(
                    f"layers of type {kind!r} (sliding-window or linear attention) are not supported by "
                    "the slot cache yet; only full-attention models are")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, dtype, device, max_length)

    # -- what the members ask -------------------------------------------------------------
    @property
    def keys(self) -> list[Hashable]:
        """Live keys in physical order (decoding rows first)."""
        return list(self.order)

    def __len__(self) -> int:
        return len(self.order)

    def length_of(self, key: Hashable) -> int:
        return self.lengths[self.row_of[key]]

    @property
    def capacity(self) -> tuple[int, int]:
        """``(rows, length)`` allocated."""
        return self.keys_[0].shape[0], self.keys_[0].shape[2]

    def plan_prefill(self, keys: Sequence[Hashable], chunk_lens: Sequence[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Plan a forward appending ``chunk_lens[i]`` tokens to each key (new keys are admitted);
        the forward's input is right-padded to ``width``. Returns ``positions [n, width]`` and the
        4D ``mask [n, 1, width, kv_len]``."""
        self._admit_prefilling(keys)
        rows = [self.row_of[k] for k in keys]
        starts = torch.tensor([self.lengths[r] for r in rows], dtype=torch.long)
        ends = starts + torch.tensor(list(chunk_lens), dtype=torch.long)
        self._reserve(int((starts + width).max()))
        cols = starts.unsqueeze(1) + torch.arange(width).unsqueeze(0)  # [n, width]
        kv_len = int((starts + width).max())
        self.plan = self._plan(rows, cols, kv_len)
        for r, end in zip(rows, ends.tolist(), strict=True):
            self.lengths[r] = end
        return self._finish_inputs(cols, ends)

    def plan_decode(self, keys: Sequence[Hashable]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Plan a one-token forward over ``keys``, which must be every decoding row plus rows whose
        prefill is done. The forward runs over physical rows ``0 .. B-1``; returns ``perm [B]``
        (``perm[i]`` is the physical row of ``keys[i]``: inputs go ``x_phys[perm] = x``, outputs
        come back ``y = y_phys[perm]``), ``positions [B, 1]`` and ``mask [B, 1, 1, kv_len]``."""
        self._join_decoding(keys)
        batch = self.n_decoding
        starts = torch.tensor(self.lengths[:batch], dtype=torch.long)
        self._reserve(int(starts.max()) + 1)
        cols = starts.unsqueeze(1)  # [B, 1]
        self.plan = self._plan(list(range(batch)), cols, int(starts.max()) + 1)
        for r in range(batch):
            self.lengths[r] += 1
        perm = torch.tensor([self.row_of[k] for k in keys], dtype=torch.long)
        positions, mask = self._finish_inputs(cols, starts + 1)
        return perm, positions, mask

    def plan_packed(self, decode_keys: Sequence[Hashable], prefill_keys: Sequence[Hashable],
                    chunk_lens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Plan one packed forward: ``decode_keys`` as ``plan_decode`` (every decoding row, plus rows
        whose prefill is done) and ``prefill_keys`` as ``plan_prefill`` (new keys admitted), their
        tokens in one sequence: the decode rows' in physical order, then each chunk. Returns
        ``perm [B]`` (as ``plan_decode``) and ``positions [T]``."""
        if set(decode_keys) & set(prefill_keys):
            raise ValueError("a key is listed twice")
        self._join_decoding(decode_keys)
        self._admit_prefilling(prefill_keys)
        batch = self.n_decoding
        starts = self.lengths[:batch]
        rows = [self.row_of[k] for k in prefill_keys]
        pstarts = [self.lengths[r] for r in rows]
        need = max([s + 1 for s in starts] + [s + n for s, n in zip(pstarts, chunk_lens, strict=True)])
        self._reserve(need)
        write_rows, write_cols, positions = list(range(batch)), list(starts), list(starts)
        segments, masks, offset = [], [], batch
        for row, start, n in zip(rows, pstarts, chunk_lens, strict=True):
            segments.append((row, start, n, offset))
            cols = list(range(start, start + n))
            write_rows += [row] * n
            write_cols += cols
            positions += cols
            q = torch.arange(start, start + n).view(-1, 1)
            masks.append((torch.arange(start + n).view(1, -1) <= q).view(1, 1, n, start + n).to(self.device))
            offset += n
        decode_mask, kv_len = None, 0
        if batch:
            kv_len = max(starts) + 1
            first = torch.tensor(starts).view(-1, 1, 1, 1)
            decode_mask = (torch.arange(kv_len).view(1, 1, 1, -1) <= first).to(self.device)
        device = self.device
        self.plan = PackedPlan(torch.tensor(write_rows, device=device), torch.tensor(write_cols, device=device),
                               batch, kv_len, decode_mask, segments, masks)
        for r in range(batch):
            self.lengths[r] += 1
        for r, n in zip(rows, chunk_lens, strict=True):
            self.lengths[r] += n
        perm = torch.tensor([self.row_of[k] for k in decode_keys], dtype=torch.long)
        return perm, torch.tensor(positions, dtype=torch.long, device=device)

    @torch.inference_mode()
    def release(self, keys: Sequence[Hashable]) -> None:
        """Forget ``keys`` (unknown keys are ignored); each hole is filled by moving one row."""
        for key in keys:
            row = self.row_of.pop(key, None)
            if row is None:
                continue
            last = len(self.order) - 1
            if row < self.n_decoding:  # keep [decoding | prefilling] contiguous
                self.n_decoding -= 1
                self._move(self.n_decoding, row)
                self._move(last, self.n_decoding)
            else:
                self._move(last, row)
            self.order.pop()
            self.lengths.pop()

    def checkpoint(self) -> dict[Hashable, int]:
        """The live keys and their lengths, for ``rollback``."""
        return dict(zip(self.order, self.lengths, strict=True))

    def rollback(self, saved: dict[Hashable, int]) -> None:
        """Undo what was planned since ``saved = checkpoint()``: keys admitted since are released,
        every other key gets its length back. A key released since cannot come back (KeyError)."""
        gone = [k for k in saved if k not in self.row_of]
        if gone:
            raise KeyError(f"rows released since the checkpoint cannot be rolled back: {gone}")
        self.release([k for k in self.order if k not in saved])
        for key, length in saved.items():
            self.lengths[self.row_of[key]] = length
        self.plan = None

    # -- what the model asks (transformers Cache API) ------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write ``[n, H, q, hd]`` new keys/values in place; return the planned rows' K/V
        ``[n, H, kv_len, hd]`` for the attention."""
        plan = self.plan
        k_all, v_all = self.keys_[layer_idx], self.values_[layer_idx]
        if isinstance(plan, PackedPlan):  # [1, H, T, hd]: each token at its (row, column)
            k_all[plan.write_rows, :, plan.write_cols] = key_states[0].transpose(0, 1).to(k_all.dtype)
            v_all[plan.write_rows, :, plan.write_cols] = value_states[0].transpose(0, 1).to(v_all.dtype)
            return k_all, v_all  # packed_attention reads each part's rows
        rows = plan.rows.unsqueeze(1).expand_as(plan.write_cols)  # [n, q]
        k_all[rows, :, plan.write_cols] = key_states.transpose(1, 2).to(k_all.dtype)  # [n, q, H, hd]
        v_all[rows, :, plan.write_cols] = value_states.transpose(1, 2).to(v_all.dtype)
        if plan.contiguous:
            first, n = int(plan.rows[0]), plan.rows.shape[0]
            return k_all[first : first + n, :, : plan.kv_len], v_all[first : first + n, :, : plan.kv_len]
        return k_all[plan.rows, :, : plan.kv_len], v_all[plan.rows, :, : plan.kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths, default=0)

    # -- bookkeeping ----------------------------------------------------------------------
    def _join_decoding(self, keys: Sequence[Hashable]) -> None:
        """Check that ``keys`` are every decoding row plus rows whose prefill is done, and move the
        latter into the decoding range (one row swap each)."""
        wanted = set(keys)
        if len(wanted) != len(keys):
            raise ValueError("a key is listed twice")
        missing = [k for k in keys if k not in self.row_of]
        if missing:
            raise KeyError(f"rows not in the cache: {missing}")
        stale = [k for k in self.order[: self.n_decoding] if k not in wanted]
        if stale:
            raise ValueError(f"every decoding row must be decoded each step; missing {stale}")
        for key in keys:
            row = self.row_of[key]
            if row >= self.n_decoding:
                self._swap(row, self.n_decoding)
                self.n_decoding += 1

    def _admit_prefilling(self, keys: Sequence[Hashable]) -> None:
        """Admit the new ``keys`` of a prefill chunk; a key that already decodes is refused."""
        for key in keys:
            if key not in self.row_of:
                self._admit(key)
            elif self.row_of[key] < self.n_decoding:
                raise ValueError(f"row {key!r} already decodes; it cannot be prefilled again")

    def _plan(self, rows: list[int], cols: torch.Tensor, kv_len: int) -> Plan:
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        device = self.device
        return Plan(torch.tensor(rows, dtype=torch.long, device=device), cols.to(device), kv_len, contiguous)

    def _finish_inputs(self, cols: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids (= columns) and the 4D mask of the planned forward."""
        kv = torch.arange(self.plan.kv_len)
        visible = (kv.view(1, 1, -1) <= cols.unsqueeze(-1)) & (kv.view(1, 1, -1) < ends.view(-1, 1, 1))
        return cols.to(self.device), visible.unsqueeze(1).to(self.device)  # [n, q], [n, 1, q, kv_len]

    def _admit(self, key: Hashable) -> None:
        row = len(self.order)
        if row == self.capacity[0]:
            self._allocate(2 * row, self.capacity[1])
        self.order.append(key)
        self.row_of[key] = row
        self.lengths.append(0)

    def _reserve(self, length: int) -> None:
        if length > self.max_length:
            raise ValueError(f"a row needs {length} positions; the cache holds at most {self.max_length}")
        if length > self.capacity[1]:
            grown = max(length, 2 * self.capacity[1])
            self._allocate(self.capacity[0], min(self.max_length, -(-grown // BLOCK) * BLOCK))

    def _allocate(self, rows: int, length: int) -> None:
        """(Re)allocate every layer at ``[rows, H, length, hd]``, keeping what is held."""
        shape = (rows, self.num_kv_heads, length, self.head_dim)
        fresh_k, fresh_v = [], []
        for layer in range(self.num_layers):
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)  # zeros: masked columns stay finite
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if self.keys_:
                old_rows, _, old_len, _ = self.keys_[layer].shape
                k[:old_rows, :, :old_len] = self.keys_[layer]
                v[:old_rows, :, :old_len] = self.values_[layer]
            fresh_k.append(k)
            fresh_v.append(v)
        self.keys_, self.values_ = fresh_k, fresh_v

    def _move(self, src: int, dst: int) -> None:
        """Row ``src`` takes physical row ``dst`` (its own columns only are copied)."""
        if src == dst:
            return
        n = self.lengths[src]
        for k, v in zip(self.keys_, self.values_, strict=True):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]
        key = self.order[src]
        self.order[dst], self.lengths[dst] = key, n
        self.row_of[key] = dst

    def _swap(self, a: int, b: int) -> None:
        if a == b:
            return
        n = max(self.lengths[a], self.lengths[b])
        for k, v in zip(self.keys_, self.values_, strict=True):
            k[[a, b], :, :n] = k[[b, a], :, :n]
            v[[a, b], :, :n] = v[[b, a], :, :n]
        ka, kb = self.order[a], self.order[b]
        self.order[a], self.order[b] = kb, ka
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]
        self.row_of[ka], self.row_of[kb] = b, a
