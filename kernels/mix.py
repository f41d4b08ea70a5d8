"""Fused Triton kernels for the two fusions: ``mix_probs`` and ``mix_logits`` -> log-probs ``[B, V]``.

The story, as in the Triton softmax tutorial. The reference (``reference.mix_probs``) is

    z = stack(members).float() / T[:, None, None]           # [K, B, V]
    logprobs = logsumexp_k(log w[b, k] + log_softmax(z_k))   # [B, V]

and each step is one or more full float32 passes over ``[K, B, V]``: the upcast, the division,
``log_softmax`` (two reads, one write), the addition of ``log w``, and ``logsumexp`` over K (a
max, a shifted exp, a sum): about ten passes, ``(e + 40) * K*B*V`` bytes or so, with ``e`` bytes
per input element. The least any implementation can move is reading the members once and
writing the result once: ``e * K*B*V + 4 * B*V`` bytes. The naive probability-space form
(``reference.naive_mix_probs``: K softmaxes, a weighted sum, a log) moves about as much, and
underflows to ``-inf`` where the mixture probability is below float32's range.

Here one program owns one row (or one segment of a row) and keeps everything in registers:

- ``"single"`` path (``V <= block``): the program loads each member's row once, computes that
  member's log-normaliser ``lse_k`` on the spot, and folds ``log w_k + z_k/T_k - lse_k`` into a
  per-column running logsumexp over the members. Traffic: the minimum.
- ``"chunked"`` path (any ``V``): ``lse_k`` needs the whole row before any output can be
  written, so two kernels run. ``_probs_stats_kernel`` walks its segment's tiles keeping an online
  max ``m`` and sum ``total`` of ``exp(x - m)`` per member; ``_probs_out_kernel`` combines the
  segments' ``(m, total)`` into ``lse_k``, reads its tiles again and writes the mixture. Traffic:
  ``2e * K*B*V + 4 * B*V`` from DRAM at worst (the second read can hit L2 when the batch's
  members fit in it).

``mix_logits`` (``log_softmax(sum_k c_k z_k)``) has the same two paths with one normaliser for the
combined row instead of one per member.

Members arrive as up to ``MAX_MEMBERS`` = 8 separate pointers ``z0 .. z7`` (a list of tensors is
never copied into one buffer) sharing one stride pair; ``K`` is a compile-time constant, so the
member loop is unrolled and unused pointers are never touched. All offsets are int64. Inputs are
float32, bfloat16 or float16, upcast to float32 on load; outputs are float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .launch import Members, Plan, check_tensor, members_from, plan

NEG_INF = tl.constexpr(float("-inf"))

LAST_PLAN: Plan | None = None  # the plan of the latest launch from this module (tests assert it)


# ---------------------------------------------------------------------------------------------
# Helpers shared by every kernel (also used by sample.py).
# ---------------------------------------------------------------------------------------------
@triton.jit
def _pick(k: tl.constexpr, a0, a1, a2, a3, a4, a5, a6, a7):
    """Argument ``a{k}``; ``k`` is a compile-time constant, so this costs no instruction."""
    if k == 0:
        a = a0
    elif k == 1:
        a = a1
    elif k == 2:
        a = a2
    elif k == 3:
        a = a3
    elif k == 4:
        a = a4
    elif k == 5:
        a = a5
    elif k == 6:
        a = a6
    else:
        a = a7
    return a


@triton.jit
def _load_scores(z_ptr, row, cols, V, stride_zb, stride_zv, live, other: tl.constexpr):
    """One member's scores at ``cols`` of ``row`` as float32; ``other`` where masked."""
    offsets = row * stride_zb + cols * stride_zv  # int64: row and cols are int64
    # mask: columns past the vocabulary, and the whole tile when the member does not take part
    # (``live`` False: weight or coefficient 0; its vocabulary is read as empty), so a dropped
    # member costs no memory traffic
    mask = cols < tl.where(live, V, 0)
    return tl.load(z_ptr + offsets, mask=mask, other=other).to(tl.float32)


@triton.jit
def _inv_temperature(t_ptr, k: tl.constexpr, HAS_T: tl.constexpr):
    """``1 / T_k`` for member k, or 1 when the composition has no per-member temperatures."""
    if HAS_T:  # noqa: SIM108 - a compile-time branch: the unused side is never generated
        inv_t = 1.0 / tl.load(t_ptr + k).to(tl.float32)
    else:
        inv_t = 1.0
    return inv_t


@triton.jit
def _finite(m):
    """``m``, or 0 where ``m`` is -inf: subtracting it then never computes ``-inf - -inf``."""
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def _fold_tile(m, total, x):
    """Online softmax statistics: fold tile ``x`` into the running max ``m`` and sum ``total``."""
    m_new = tl.maximum(m, tl.max(x, axis=0))  # scalar: max over everything seen so far
    shift = _finite(m_new)  # all -inf so far: keep total = 0 without NaN
    total = total * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)  # rescale the old sum
    return m_new, total


@triton.jit
def _lse(m, total):
    """``log sum exp`` from online statistics; -inf when every score was -inf (total = 0)."""
    return _finite(m) + tl.log(total)


@triton.jit
def _fold_logaddexp(acc_m, acc_s, u):
    """Per column, fold ``u`` into the running logsumexp ``acc_m + log(acc_s)`` with one exp."""
    hi = tl.maximum(acc_m, u)  # the new running max
    lo = tl.minimum(acc_m, u)
    gap = tl.exp(lo - _finite(hi))  # exp(lo - hi) in [0, 1]; 0 when both are -inf
    # u is the new max: rescale the old sum and add exp(0) = 1; else add exp(u - max)
    acc_s = tl.where(u > acc_m, acc_s * gap + 1.0, acc_s + gap)
    return hi, acc_s


@triton.jit
def _log_share(w, lse):
    """``log w - lse``: the member's offset in log space; -inf (no share) when ``w = 0`` or the
    member scored every token -inf (an empty distribution contributes nothing)."""
    live = (w > 0) & (lse > NEG_INF)
    return tl.where(live, tl.log(tl.where(live, w, 1.0)) - tl.where(live, lse, 0.0), NEG_INF)


@triton.jit
def _member_log_share(
    k: tl.constexpr, K: tl.constexpr, stat_m_ptr, stat_s_ptr, row, segments,
    w_ptr, stride_wb, stride_wk, SEGMENTS_P2: tl.constexpr,
):
    """``log w_k - lse_k`` for the whole row, combining the partial stats of all segments."""
    if k < K:
        seg = tl.arange(0, SEGMENTS_P2)
        base = (row * K + k) * segments  # stats are [B, K, segments]
        m = tl.load(stat_m_ptr + base + seg, mask=seg < segments, other=NEG_INF)  # padded slots
        total = tl.load(stat_s_ptr + base + seg, mask=seg < segments, other=0.0)  # add nothing
        m_row = tl.max(m, axis=0)
        lse = _lse(m_row, tl.sum(total * tl.exp(m - _finite(m_row)), axis=0))
        w = tl.load(w_ptr + row * stride_wb + k * stride_wk).to(tl.float32)
        share = _log_share(w, lse)
    else:
        share = 0.0  # no such member: never read
    return share


@triton.jit
def _all_log_shares(K: tl.constexpr, stat_m_ptr, stat_s_ptr, row, segments,
                    w_ptr, stride_wb, stride_wk, SEGMENTS_P2: tl.constexpr):
    """The eight ``_member_log_share`` values (slots past K are dummies)."""
    s0 = _member_log_share(0, K, stat_m_ptr, stat_s_ptr, row, segments,
                           w_ptr, stride_wb, stride_wk, SEGMENTS_P2)
    s1 = _member_log_share(1, K, stat_m_ptr, stat_s_ptr, row, segments,
                           w_ptr, stride_wb, stride_wk, SEGMENTS_P2)
    s2 = _member_log_share(2, K, stat_m_ptr, stat_s_ptr, row, segments,
                           w_ptr, stride_wb, stride_wk, SEGMENTS_P2)
    s3 = _member_log_share(3, K, stat_m_ptr, stat_s_ptr, row, segments,
                           w_ptr, stride_wb, stride_wk, SEGMENTS_P2)
    s4 = _member_log_share(4, K, stat_m_ptr, stat_s_ptr, row, segments,
                           w_ptr, stride_wb, stride_wk, SEGMENTS_P2)
    s5 = _member_log_share(5, K, stat_m_ptr, stat_s_ptr, row, segments,
                           w_ptr, stride_wb, stride_wk, SEGMENTS_P2)
    s6 = _member_log_share(6, K, stat_m_ptr, stat_s_ptr, row, segments,
                           w_ptr, stride_wb, stride_wk, SEGMENTS_P2)
    s7 = _member_log_share(7, K, stat_m_ptr, stat_s_ptr, row, segments,
                           w_ptr, stride_wb, stride_wk, SEGMENTS_P2)
    return s0, s1, s2, s3, s4, s5, s6, s7


@triton.jit
def _mixture_tile(row, cols, V, z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv, t_ptr,
                  s0, s1, s2, s3, s4, s5, s6, s7, K: tl.constexpr, HAS_T: tl.constexpr):
    """``log p_mix`` at ``cols`` given each member's share ``s_k = log w_k - lse_k``."""
    acc_m = tl.full(cols.shape, NEG_INF, tl.float32)  # running logsumexp over members:
    acc_s = tl.zeros(cols.shape, tl.float32)  # acc_m + log(acc_s), per column
    for k in tl.static_range(K):
        share = _pick(k, s0, s1, s2, s3, s4, s5, s6, s7)
        z_ptr = _pick(k, z0, z1, z2, z3, z4, z5, z6, z7)
        x = _load_scores(z_ptr, row, cols, V, stride_zb, stride_zv, share > NEG_INF, NEG_INF)
        x = x * _inv_temperature(t_ptr, k, HAS_T)  # z_k / T_k
        acc_m, acc_s = _fold_logaddexp(acc_m, acc_s, x + share)  # log(w_k p_k) = z/T + share
    return acc_m + tl.log(acc_s)


@triton.jit
def _combined_tile(row, cols, V, z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv,
                   c_ptr, stride_cb, stride_ck, K: tl.constexpr):
    """``sum_k c_k z_k`` at ``cols`` (float32), -inf past the vocabulary."""
    x = tl.zeros(cols.shape, tl.float32)
    for k in tl.static_range(K):
        c = tl.load(c_ptr + row * stride_cb + k * stride_ck).to(tl.float32)  # coefficient c[b, k]
        z_ptr = _pick(k, z0, z1, z2, z3, z4, z5, z6, z7)
        # c = 0: the member is not read (other=0), so it adds exactly 0, never 0 * -inf = NaN
        x += c * _load_scores(z_ptr, row, cols, V, stride_zb, stride_zv, c != 0, 0.0)
    return tl.where(cols < V, x, NEG_INF)  # columns past V: exp() -> 0, never the argmax


# ---------------------------------------------------------------------------------------------
# mix_probs kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _mixture_row(row, cols, V, z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv,
                 w_ptr, stride_wb, stride_wk, t_ptr, K: tl.constexpr, HAS_T: tl.constexpr):
    """``log p_mix`` of a row held whole in one tile (``V <= BLOCK``): each member read once."""
    acc_m = tl.full(cols.shape, NEG_INF, tl.float32)  # running logsumexp over members, per column
    acc_s = tl.zeros(cols.shape, tl.float32)
    for k in tl.static_range(K):  # unrolled: K is a compile-time constant
        w = tl.load(w_ptr + row * stride_wb + k * stride_wk).to(tl.float32)  # w[b, k]
        z_ptr = _pick(k, z0, z1, z2, z3, z4, z5, z6, z7)
        x = _load_scores(z_ptr, row, cols, V, stride_zb, stride_zv, w > 0, NEG_INF)
        x = x * _inv_temperature(t_ptr, k, HAS_T)  # z_k / T_k; -inf stays -inf
        m = tl.max(x, axis=0)  # member k's normaliser, from the row in registers
        lse = _lse(m, tl.sum(tl.exp(x - _finite(m)), axis=0))
        acc_m, acc_s = _fold_logaddexp(acc_m, acc_s, x + _log_share(w, lse))
    return acc_m + tl.log(acc_s)


@triton.jit
def _probs_single_kernel(
    out_ptr,  # [B, V] float32, contiguous
    z0, z1, z2, z3, z4, z5, z6, z7,  # member k's [B, V] scores (slots past K unused)
    stride_zb, stride_zv,  # element strides shared by all members
    w_ptr, stride_wb, stride_wk,  # weights [B, K]
    t_ptr,  # per-member temperatures [K] (read only if HAS_T)
    V,  # vocabulary size, <= BLOCK
    K: tl.constexpr, HAS_T: tl.constexpr,
    BLOCK: tl.constexpr,  # power of two >= V: the whole row is one tile
):
    row = tl.program_id(0).to(tl.int64)  # one program per row b
    cols = tl.arange(0, BLOCK).to(tl.int64)
    mixed = _mixture_row(row, cols, V, z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv,
                         w_ptr, stride_wb, stride_wk, t_ptr, K, HAS_T)
    tl.store(out_ptr + row * V + cols, mixed, mask=cols < V)  # mask: the padding past V


@triton.jit
def _probs_stats_kernel(
    stat_m_ptr, stat_s_ptr,  # [B, K, segments] float32: online max and sum per segment
    z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv,
    w_ptr, stride_wb, stride_wk, t_ptr,
    V, segment_len,  # segment_len: columns per program, a multiple of BLOCK
    K: tl.constexpr, HAS_T: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # grid: (B, segments)
    seg = tl.program_id(1).to(tl.int64)
    segments = tl.num_programs(1)
    start = seg * segment_len  # first column of this segment
    for k in tl.static_range(K):
        live = tl.load(w_ptr + row * stride_wb + k * stride_wk) > 0  # w = 0: read nothing
        z_ptr = _pick(k, z0, z1, z2, z3, z4, z5, z6, z7)
        inv_t = _inv_temperature(t_ptr, k, HAS_T)
        m = tl.full([], NEG_INF, tl.float32)  # online max over the segment
        total = tl.zeros([], tl.float32)  # online sum of exp(x - m)
        for off in range(0, segment_len, BLOCK):  # walk the segment tile by tile
            cols = start + off + tl.arange(0, BLOCK)
            x = _load_scores(z_ptr, row, cols, V, stride_zb, stride_zv, live, NEG_INF) * inv_t
            m, total = _fold_tile(m, total, x)
        slot = (row * K + k) * segments + seg
        tl.store(stat_m_ptr + slot, m)
        tl.store(stat_s_ptr + slot, total)


@triton.jit
def _probs_out_kernel(
    out_ptr, stat_m_ptr, stat_s_ptr,
    z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv,
    w_ptr, stride_wb, stride_wk, t_ptr,
    V, segment_len,
    K: tl.constexpr, HAS_T: tl.constexpr, BLOCK: tl.constexpr,
    SEGMENTS_P2: tl.constexpr,  # segments rounded up to a power of two
):
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1).to(tl.int64)
    segments = tl.num_programs(1)
    start = seg * segment_len
    # each member's share log w_k - lse_k for the whole row, once per program
    s0, s1, s2, s3, s4, s5, s6, s7 = _all_log_shares(
        K, stat_m_ptr, stat_s_ptr, row, segments, w_ptr, stride_wb, stride_wk, SEGMENTS_P2)
    for off in range(0, segment_len, BLOCK):
        cols = start + off + tl.arange(0, BLOCK)
        mixed = _mixture_tile(row, cols, V, z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv,
                              t_ptr, s0, s1, s2, s3, s4, s5, s6, s7, K, HAS_T)
        tl.store(out_ptr + row * V + cols, mixed, mask=cols < V)  # mask: the last tile's tail


# ---------------------------------------------------------------------------------------------
# mix_logits kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _logits_single_kernel(
    out_ptr, z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv,
    c_ptr, stride_cb, stride_ck,  # coefficients [B, K], any sign
    V, K: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    x = _combined_tile(row, cols, V, z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv,
                       c_ptr, stride_cb, stride_ck, K)
    m = tl.max(x, axis=0)
    lse = _lse(m, tl.sum(tl.exp(x - _finite(m)), axis=0))
    tl.store(out_ptr + row * V + cols, x - lse, mask=cols < V)  # log_softmax; mask: padding


@triton.jit
def _logits_stats_kernel(
    stat_m_ptr, stat_s_ptr,  # [B, segments] float32
    z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv, c_ptr, stride_cb, stride_ck,
    V, segment_len, K: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1).to(tl.int64)
    start = seg * segment_len
    m = tl.full([], NEG_INF, tl.float32)
    total = tl.zeros([], tl.float32)
    for off in range(0, segment_len, BLOCK):
        cols = start + off + tl.arange(0, BLOCK)
        x = _combined_tile(row, cols, V, z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv,
                           c_ptr, stride_cb, stride_ck, K)
        m, total = _fold_tile(m, total, x)
    tl.store(stat_m_ptr + row * tl.num_programs(1) + seg, m)
    tl.store(stat_s_ptr + row * tl.num_programs(1) + seg, total)


@triton.jit
def _logits_out_kernel(
    out_ptr, stat_m_ptr, stat_s_ptr,
    z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv, c_ptr, stride_cb, stride_ck,
    V, segment_len, K: tl.constexpr, BLOCK: tl.constexpr, SEGMENTS_P2: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1).to(tl.int64)
    segments = tl.num_programs(1)
    start = seg * segment_len
    s = tl.arange(0, SEGMENTS_P2)
    m = tl.load(stat_m_ptr + row * segments + s, mask=s < segments, other=NEG_INF)
    total = tl.load(stat_s_ptr + row * segments + s, mask=s < segments, other=0.0)
    m_row = tl.max(m, axis=0)  # combine the segments' online stats into the row's normaliser
    lse = _lse(m_row, tl.sum(total * tl.exp(m - _finite(m_row)), axis=0))
    for off in range(0, segment_len, BLOCK):
        cols = start + off + tl.arange(0, BLOCK)
        x = _combined_tile(row, cols, V, z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv,
                           c_ptr, stride_cb, stride_ck, K)
        tl.store(out_ptr + row * V + cols, x - lse, mask=cols < V)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _record(p: Plan) -> Plan:
    global LAST_PLAN
    LAST_PLAN = p
    return p


def member_args(members: Members) -> tuple:
    """``z0 .. z7, stride_zb, stride_zv`` as the kernels take them."""
    return (*members.pointer_args(), members.stride_b, members.stride_v)


def check_temperatures(temperatures: torch.Tensor | None, members: Members) -> torch.Tensor | None:
    """Check per-member temperatures ``[K]`` and return them contiguous (or None)."""
    if temperatures is None:
        return None
    check_tensor("temperatures", temperatures, (members.K,), members.device)
    return temperatures.contiguous()


def mix_probs(
    member_logits: torch.Tensor | Sequence[torch.Tensor],
    weights: torch.Tensor,
    temperatures: torch.Tensor | None = None,
    *,
    block: int | None = None,
    segments: int | None = None,
) -> torch.Tensor:
    """Triton ``reference.mix_probs``: members ``[K, B, V]`` or K x ``[B, V]``, weights ``[B, K]``
    (>= 0), temperatures ``[K]`` (> 0) or None -> log-probs ``[B, V]`` float32.

    ``block``/``segments`` override the plan (tests use them to force the chunked path).
    """
    members = members_from(member_logits)
    B, V, K, device = members.B, members.V, members.K, members.device
    check_tensor("weights", weights, (B, K), device)
    temperatures = check_temperatures(temperatures, members)
    out = torch.empty((B, V), dtype=torch.float32, device=device)
    p = _record(plan(V, B, device, block=block, segments=segments))
    if B == 0:
        return out
    args = (*member_args(members), weights, weights.stride(0), weights.stride(1),
            weights if temperatures is None else temperatures, V)
    flags = {"K": K, "HAS_T": temperatures is not None, "BLOCK": p.block, "num_warps": p.num_warps}
    if p.path == "single":
        _probs_single_kernel[(B,)](out, *args, **flags)
        return out
    stat_m = torch.empty((B, K, p.segments), dtype=torch.float32, device=device)
    stat_s = torch.empty_like(stat_m)
    _probs_stats_kernel[(B, p.segments)](stat_m, stat_s, *args, p.segment_len, **flags)
    _probs_out_kernel[(B, p.segments)](out, stat_m, stat_s, *args, p.segment_len, **flags,
                                       SEGMENTS_P2=triton.next_power_of_2(p.segments))
    return out


def mix_logits(
    member_logits: torch.Tensor | Sequence[torch.Tensor],
    coeffs: torch.Tensor,
    *,
    block: int | None = None,
    segments: int | None = None,
) -> torch.Tensor:
    """Triton ``reference.mix_logits``: members ``[K, B, V]`` or K x ``[B, V]``, coeffs ``[B, K]``
    (any sign) -> ``log_softmax(sum_k c_k z_k)`` ``[B, V]`` float32."""
    members = members_from(member_logits)
    B, V, K, device = members.B, members.V, members.K, members.device
    check_tensor("coeffs", coeffs, (B, K), device)
    out = torch.empty((B, V), dtype=torch.float32, device=device)
    p = _record(plan(V, B, device, block=block, segments=segments))
    if B == 0:
        return out
    args = (*member_args(members), coeffs, coeffs.stride(0), coeffs.stride(1), V)
    flags = {"K": K, "BLOCK": p.block, "num_warps": p.num_warps}
    if p.path == "single":
        _logits_single_kernel[(B,)](out, *args, **flags)
        return out
    stat_m = torch.empty((B, p.segments), dtype=torch.float32, device=device)
    stat_s = torch.empty_like(stat_m)
    _logits_stats_kernel[(B, p.segments)](stat_m, stat_s, *args, p.segment_len, **flags)
    _logits_out_kernel[(B, p.segments)](out, stat_m, stat_s, *args, p.segment_len, **flags,
                                        SEGMENTS_P2=triton.next_power_of_2(p.segments))
    return out
