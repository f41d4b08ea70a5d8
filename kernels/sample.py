"""Fused sampling: fuse the members and draw one token per row without writing the ``[B, V]`` row.

The unfused way is ``mix_probs`` (writes ``4 * B*V`` bytes of log-probs) followed by torch
sampling, which reads that row back and makes several more ``[B, V]`` passes (divide by the
temperature, draw noise, take its log, add, argmax): about ``40 * B*V`` bytes on top of the
fusion's own traffic. Here the token is chosen while the fused scores are still in registers:

    token[b]   = argmax_v( logprobs[b, v] / T[b] + G[b, v] )   (T[b] = 0: argmax_v logprobs[b, v])
    logprob[b] = logprobs[b, token[b]]                          (the fused, untempered log-prob)

with ``G`` standard Gumbel noise, which makes ``token`` an exact draw from
``softmax(logprobs / T)`` (the Gumbel-max trick). The noise comes from Philox (``tl.rand``) seeded
by ``seeds[b]`` and indexed by the column, so a row's draw depends on its seed alone, not on the
tile size, the split into segments or the other rows: the same seed gives the same token on every
path. Ties go to the lowest token id, as with ``torch.argmax``.

Paths (see ``launch.plan``): ``"single"`` does everything in one program per row; ``"chunked"``
lets each (row, segment) program keep the best (score, token, log-prob) of its segment, and
``_combine_kernel`` picks the best segment per row. ``sample_mix_probs`` first needs each
member's normaliser, so its chunked path runs ``mix._probs_stats_kernel`` first (the members are
read twice); ``sample_mix_logits`` has a single normaliser, computed online in the same pass
that samples (the members are read once).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .launch import Members, Plan, check_tensor, members_from, plan
from .mix import (
    NEG_INF,
    _all_log_shares,
    _combined_tile,
    _finite,
    _fold_tile,
    _lse,
    _mixture_row,
    _mixture_tile,
    _probs_stats_kernel,
    check_temperatures,
    member_args,
)

LAST_PLAN: Plan | None = None  # the plan of the latest launch from this module (tests assert it)


@triton.jit
def _gumbel(seed, cols):
    """Standard Gumbel noise ``-log(E)``, ``E ~ Exp(1)``, one draw per column of the row's stream."""
    u = tl.rand(seed, cols)  # Philox uniform in [0, 1), on a 2^-31 grid near 0
    # E = -log(1 - u). Near u = 0 use the series u + u^2/2 + u^3/3 (1 - u would round to 1):
    # small E is the Gumbel's upper tail, which decides the winners, so it must stay exact.
    e = tl.where(u < 0.0078125, u * (1.0 + u * (0.5 + u * 0.33333334)), -tl.log(1.0 - u))
    return -tl.log(tl.maximum(e, 2.3283064e-10))  # u = 0 (p = 2^-31): E = 2^-32, G = 22.2


@triton.jit
def _scores(logprobs, cols, temp, seed):
    """Gumbel-max scores at ``cols``: ``logprobs / T + G``; at ``T = 0`` the log-probs (greedy)."""
    if temp > 0:  # noqa: SIM108 - a runtime branch per row: greedy rows draw no noise
        scores = logprobs / temp + _gumbel(seed, cols)
    else:
        scores = logprobs
    return scores


@triton.jit
def _fold_best(best_score, best_col, best_val, scores, vals, cols, first_col):
    """Keep the best (score, column, value) seen so far; ties keep the earlier column."""
    tile_best, pos = tl.max(scores, axis=0, return_indices=True)  # first max in the tile
    col = first_col + pos  # the tile's columns are consecutive
    val = tl.max(tl.where(cols == col, vals, NEG_INF), axis=0)  # vals[pos] as a scalar
    better = tile_best > best_score  # strict: an equal score later in the row loses
    return (tl.where(better, tile_best, best_score), tl.where(better, col, best_col),
            tl.where(better, val, best_val))


@triton.jit
def _pick_one(token_ptr, logprob_ptr, row, cols, scores, vals):
    """Store the argmax column of ``scores`` (whole row in one tile) and ``vals`` there."""
    _, pos = tl.max(scores, axis=0, return_indices=True)
    tl.store(token_ptr + row, pos.to(tl.int64))
    tl.store(logprob_ptr + row, tl.max(tl.where(cols == pos, vals, NEG_INF), axis=0))


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _sample_probs_single_kernel(
    token_ptr, logprob_ptr,  # [B] int64, [B] float32
    z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv,  # members, as in mix.py
    w_ptr, stride_wb, stride_wk, t_ptr,  # weights [B, K], member temperatures [K]
    temp_ptr, seed_ptr,  # sampling temperature [B] float32, Philox seed [B] int64
    V, K: tl.constexpr, HAS_T: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # one program per row, the whole row in one tile
    cols = tl.arange(0, BLOCK).to(tl.int64)
    mixed = _mixture_row(row, cols, V, z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv,
                         w_ptr, stride_wb, stride_wk, t_ptr, K, HAS_T)  # -inf past V
    scores = _scores(mixed, cols, tl.load(temp_ptr + row), tl.load(seed_ptr + row))
    _pick_one(token_ptr, logprob_ptr, row, cols, scores, mixed)


@triton.jit
def _sample_probs_partial_kernel(
    best_score_ptr, best_col_ptr, best_val_ptr,  # [B, segments]: each segment's winner
    stat_m_ptr, stat_s_ptr,  # [B, K, segments] from mix._probs_stats_kernel
    z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv,
    w_ptr, stride_wb, stride_wk, t_ptr, temp_ptr, seed_ptr,
    V, segment_len,
    K: tl.constexpr, HAS_T: tl.constexpr, BLOCK: tl.constexpr, SEGMENTS_P2: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # grid: (B, segments)
    seg = tl.program_id(1).to(tl.int64)
    segments = tl.num_programs(1)
    start = seg * segment_len
    temp = tl.load(temp_ptr + row)
    seed = tl.load(seed_ptr + row)
    s0, s1, s2, s3, s4, s5, s6, s7 = _all_log_shares(
        K, stat_m_ptr, stat_s_ptr, row, segments, w_ptr, stride_wb, stride_wk, SEGMENTS_P2)
    best_score = tl.full([], NEG_INF, tl.float32)
    best_col = start  # a segment of -inf scores reports its first column, never chosen
    best_val = tl.full([], NEG_INF, tl.float32)
    for off in range(0, segment_len, BLOCK):
        cols = start + off + tl.arange(0, BLOCK)
        mixed = _mixture_tile(row, cols, V, z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv,
                              t_ptr, s0, s1, s2, s3, s4, s5, s6, s7, K, HAS_T)  # -inf past V
        best_score, best_col, best_val = _fold_best(
            best_score, best_col, best_val, _scores(mixed, cols, temp, seed), mixed, cols,
            start + off)
    slot = row * segments + seg
    tl.store(best_score_ptr + slot, best_score)
    tl.store(best_col_ptr + slot, best_col)
    tl.store(best_val_ptr + slot, best_val)


@triton.jit
def _sample_logits_single_kernel(
    token_ptr, logprob_ptr, z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv,
    c_ptr, stride_cb, stride_ck, temp_ptr, seed_ptr,
    V, K: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    x = _combined_tile(row, cols, V, z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv,
                       c_ptr, stride_cb, stride_ck, K)  # sum_k c_k z_k, -inf past V
    m = tl.max(x, axis=0)
    logprobs = x - _lse(m, tl.sum(tl.exp(x - _finite(m)), axis=0))
    scores = _scores(logprobs, cols, tl.load(temp_ptr + row), tl.load(seed_ptr + row))
    _pick_one(token_ptr, logprob_ptr, row, cols, scores, logprobs)


@triton.jit
def _sample_logits_partial_kernel(
    best_score_ptr, best_col_ptr, best_val_ptr,  # [B, segments]; best_val: the combined score
    stat_m_ptr, stat_s_ptr,  # [B, segments]: online max / sum of the combined row
    z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv,
    c_ptr, stride_cb, stride_ck, temp_ptr, seed_ptr,
    V, segment_len, K: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1).to(tl.int64)
    start = seg * segment_len
    temp = tl.load(temp_ptr + row)
    seed = tl.load(seed_ptr + row)
    m = tl.full([], NEG_INF, tl.float32)  # online stats of the combined row
    total = tl.zeros([], tl.float32)
    best_score = tl.full([], NEG_INF, tl.float32)
    best_col = start
    best_val = tl.full([], NEG_INF, tl.float32)
    for off in range(0, segment_len, BLOCK):
        cols = start + off + tl.arange(0, BLOCK)
        x = _combined_tile(row, cols, V, z0, z1, z2, z3, z4, z5, z6, z7, stride_zb, stride_zv,
                           c_ptr, stride_cb, stride_ck, K)
        m, total = _fold_tile(m, total, x)
        # argmax of x / T + G equals that of log_softmax(x) / T + G: the shift is the same for all
        best_score, best_col, best_val = _fold_best(
            best_score, best_col, best_val, _scores(x, cols, temp, seed), x, cols, start + off)
    slot = row * tl.num_programs(1) + seg
    tl.store(best_score_ptr + slot, best_score)
    tl.store(best_col_ptr + slot, best_col)
    tl.store(best_val_ptr + slot, best_val)
    tl.store(stat_m_ptr + slot, m)
    tl.store(stat_s_ptr + slot, total)


@triton.jit
def _combine_kernel(
    token_ptr, logprob_ptr,  # [B] outputs
    best_score_ptr, best_col_ptr, best_val_ptr, stat_m_ptr, stat_s_ptr,  # [B, segments]
    segments, HAS_LSE: tl.constexpr,  # HAS_LSE: best_val is a raw score; subtract the row's lse
    SEGMENTS_P2: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # one program per row
    s = tl.arange(0, SEGMENTS_P2)
    live = s < segments  # mask: padding slots past the last segment
    base = row * segments
    scores = tl.load(best_score_ptr + base + s, mask=live, other=NEG_INF)
    _, win = tl.max(scores, axis=0, return_indices=True)  # first best segment = lowest token
    token = tl.sum(tl.where(s == win, tl.load(best_col_ptr + base + s, mask=live, other=0), 0))
    val = tl.max(tl.where(s == win, tl.load(best_val_ptr + base + s, mask=live, other=NEG_INF),
                          NEG_INF), axis=0)
    if HAS_LSE:
        m = tl.load(stat_m_ptr + base + s, mask=live, other=NEG_INF)
        total = tl.load(stat_s_ptr + base + s, mask=live, other=0.0)
        m_row = tl.max(m, axis=0)
        val = val - _lse(m_row, tl.sum(total * tl.exp(m - _finite(m_row)), axis=0))
    tl.store(token_ptr + row, token)
    tl.store(logprob_ptr + row, val)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _record(p: Plan) -> Plan:
    global LAST_PLAN
    LAST_PLAN = p
    return p


def _row_controls(
    members: Members, temperature: torch.Tensor, seeds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check ``temperature [B]`` (>= 0, 0 = greedy) and ``seeds [B]``; return them as the
    kernels read them: contiguous float32 and int64."""
    check_tensor("temperature", temperature, (members.B,), members.device)
    check_tensor("seeds", seeds, (members.B,), members.device, integer=True)
    return temperature.float().contiguous(), seeds.to(torch.int64).contiguous()


def _outputs(members: Members) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.empty(members.B, dtype=torch.int64, device=members.device)
    return tokens, torch.empty(members.B, dtype=torch.float32, device=members.device)


def _partials(members: Members, p: Plan) -> list[torch.Tensor]:
    """Per (row, segment) winner buffers: best score, best column, best value."""
    shape, device = (members.B, p.segments), members.device
    return [torch.empty(shape, dtype=torch.float32, device=device),
            torch.empty(shape, dtype=torch.int64, device=device),
            torch.empty(shape, dtype=torch.float32, device=device)]


def sample_mix_probs(
    member_logits: torch.Tensor | Sequence[torch.Tensor],
    weights: torch.Tensor,
    temperatures: torch.Tensor | None,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    *,
    block: int | None = None,
    segments: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from ``softmax(mix_probs(...) / temperature)``.

    members ``[K, B, V]`` or K x ``[B, V]``, weights ``[B, K]``, temperatures ``[K]`` or None
    (per member, part of the composition), temperature ``[B]`` (per request, 0 = greedy),
    seeds ``[B]`` int64. Returns ``(tokens [B] int64, logprobs [B] float32)``, the log-prob
    being the fused, untempered one.
    """
    members = members_from(member_logits)
    B, V, K, device = members.B, members.V, members.K, members.device
    check_tensor("weights", weights, (B, K), device)
    temperatures = check_temperatures(temperatures, members)
    temperature, seeds = _row_controls(members, temperature, seeds)
    tokens, logprobs = _outputs(members)
    p = _record(plan(V, B, device, block=block, segments=segments))
    if B == 0:
        return tokens, logprobs
    args = (*member_args(members), weights, weights.stride(0), weights.stride(1),
            weights if temperatures is None else temperatures)
    flags = {"K": K, "HAS_T": temperatures is not None, "BLOCK": p.block, "num_warps": p.num_warps}
    if p.path == "single":
        _sample_probs_single_kernel[(B,)](tokens, logprobs, *args, temperature, seeds, V, **flags)
        return tokens, logprobs
    stat_m = torch.empty((B, K, p.segments), dtype=torch.float32, device=device)
    stat_s = torch.empty_like(stat_m)
    seg_p2 = triton.next_power_of_2(p.segments)
    _probs_stats_kernel[(B, p.segments)](stat_m, stat_s, *args, V, p.segment_len, **flags)
    partials = _partials(members, p)
    _sample_probs_partial_kernel[(B, p.segments)](
        *partials, stat_m, stat_s, *args, temperature, seeds, V, p.segment_len, **flags,
        SEGMENTS_P2=seg_p2)
    _combine_kernel[(B,)](tokens, logprobs, *partials, stat_m, stat_s, p.segments,
                          HAS_LSE=False, SEGMENTS_P2=seg_p2)
    return tokens, logprobs


def sample_mix_logits(
    member_logits: torch.Tensor | Sequence[torch.Tensor],
    coeffs: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    *,
    block: int | None = None,
    segments: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from ``softmax(mix_logits(...) / temperature)``.

    coeffs ``[B, K]``, temperature ``[B]`` (0 = greedy), seeds ``[B]`` int64. Returns
    ``(tokens [B] int64, logprobs [B] float32)`` with the fused, untempered log-prob.
    """
    members = members_from(member_logits)
    B, V, K, device = members.B, members.V, members.K, members.device
    check_tensor("coeffs", coeffs, (B, K), device)
    temperature, seeds = _row_controls(members, temperature, seeds)
    tokens, logprobs = _outputs(members)
    p = _record(plan(V, B, device, block=block, segments=segments))
    if B == 0:
        return tokens, logprobs
    args = (*member_args(members), coeffs, coeffs.stride(0), coeffs.stride(1), temperature, seeds)
    flags = {"K": K, "BLOCK": p.block, "num_warps": p.num_warps}
    if p.path == "single":
        _sample_logits_single_kernel[(B,)](tokens, logprobs, *args, V, **flags)
        return tokens, logprobs
    partials = _partials(members, p)
    stat_m = torch.empty((B, p.segments), dtype=torch.float32, device=device)
    stat_s = torch.empty_like(stat_m)
    _sample_logits_partial_kernel[(B, p.segments)](
        *partials, stat_m, stat_s, *args, V, p.segment_len, **flags)
    _combine_kernel[(B,)](tokens, logprobs, *partials, stat_m, stat_s, p.segments,
                          HAS_LSE=True, SEGMENTS_P2=triton.next_power_of_2(p.segments))
    return tokens, logprobs
