"""Fused sampling: greedy equals the reference's argmax, seeds repeat, draws follow the target.

The chi-square tests draw one token per row from many rows of one distribution (each row its own
seed) and compare the counts with ``softmax(reference_logprobs / T)``.
"""

from __future__ import annotations

import compose_serve.kernels as kernels
import pytest
import torch
import triton
import triton.language as tl
from compose_serve.kernels import reference, sample
from kernel_cases import TOL, make_coeffs, make_members, make_temperatures, make_weights
from scipy.stats import chisquare, kstest

F32, BF16 = torch.float32, torch.bfloat16


def _probs_draw(z, w, t, temp, seeds, **kw):
    return sample.sample_mix_probs(z, w, t, temp, seeds, **kw)


def _logits_draw(z, c, temp, seeds, **kw):
    return sample.sample_mix_logits(z, c, temp, seeds, **kw)


@triton.jit
def _noise_kernel(out_ptr, seed, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK).to(tl.int64)
    tl.store(out_ptr + cols, sample._gumbel(seed, cols))


def test_gumbel_noise_is_standard_gumbel(device):
    """The kernels' noise, 65536 draws of one stream: Kolmogorov-Smirnov against Gumbel(0, 1)."""
    noise = torch.empty(65536, device=device)
    _noise_kernel[(1,)](noise, 1234, BLOCK=65536)
    assert torch.isfinite(noise).all() and noise.max() < 23.0  # the clamp bounds the top tail
    p = kstest(noise.cpu().double().numpy(), lambda g: torch.exp(-torch.exp(-torch.from_numpy(g))).numpy()).pvalue
    assert p > 1e-3


# --- greedy -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("K", "B", "V", "dtype", "path"),
    [(1, 3, 7, F32, "single"), (3, 17, 1000, BF16, "single"), (2, 3, 8193, F32, "chunked"),
     (4, 1, 65537, BF16, "chunked"), (3, 2, 49152, torch.float16, "chunked")],
)
def test_greedy_is_reference_argmax(K, B, V, dtype, path, device):
    z = make_members(K, B, V, dtype, device, seed=K + V)
    w, t, c = make_weights(B, K, device), make_temperatures(K, device), make_coeffs(B, K, device)
    zeros, seeds = torch.zeros(B, device=device), torch.arange(B, device=device)
    ref = reference.mix_probs(z, w, t)
    tokens, logprobs = _probs_draw(z, w, t, zeros, seeds)
    assert sample.LAST_PLAN.path == path
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(tokens, ref.argmax(-1))
    torch.testing.assert_close(logprobs, ref.gather(1, tokens[:, None])[:, 0], **TOL[dtype])
    ref = reference.mix_logits(z, c)
    tokens, logprobs = _logits_draw(z, c, zeros, seeds)
    assert sample.LAST_PLAN.path == path
    assert torch.equal(tokens, ref.argmax(-1))
    torch.testing.assert_close(logprobs, ref.gather(1, tokens[:, None])[:, 0], **TOL[dtype])


@pytest.mark.parametrize("block", [None, 16], ids=["single", "chunked"])
def test_greedy_never_picks_a_masked_token_and_ties_go_low(block, device):
    z = torch.zeros(2, 2, 40, device=device)
    z[:, 0, 7] = z[:, 0, 30] = 5.0  # a tie: the lower token wins, as torch.argmax
    z[:, 1] = float("-inf")
    z[0, 1, 33] = 1.0  # row 1: only token 33 is possible
    w = torch.full((2, 2), 0.5, device=device)
    tokens, logprobs = _probs_draw(z, w, None, torch.zeros(2, device=device),
                                   torch.zeros(2, dtype=torch.int64, device=device), block=block)
    assert tokens.tolist() == [7, 33]
    # member 1 scores nothing in row 1, so it contributes nothing: p(33) = 0.5 * 1
    torch.testing.assert_close(logprobs[1], torch.tensor(0.5, device=device).log())


# --- seeds ----------------------------------------------------------------------------------
def test_same_seed_same_tokens_on_every_path(device):
    """Noise depends on (seed, token) only: tile size and segments do not change the draw."""
    K, B, V = 2, 6, 300
    z = make_members(K, B, V, F32, device, seed=1, scale=0.5)  # flat: many likely tokens
    w, c = make_weights(B, K, device), make_coeffs(B, K, device) * 0.3
    temp, seeds = torch.ones(B, device=device), torch.arange(100, 100 + B, device=device)
    first = _probs_draw(z, w, None, temp, seeds)
    assert sample.LAST_PLAN.path == "single"
    again = _probs_draw(z, w, None, temp, seeds)
    chunked = _probs_draw(z, w, None, temp, seeds, block=64, segments=2)
    assert sample.LAST_PLAN.path == "chunked"
    assert torch.equal(first[0], again[0]) and torch.equal(first[0], chunked[0])
    torch.testing.assert_close(first[1], chunked[1], **TOL[F32])
    other = _probs_draw(z, w, None, temp, seeds + 1000)
    assert not torch.equal(first[0], other[0])
    first = _logits_draw(z, c, temp, seeds)
    assert torch.equal(first[0], _logits_draw(z, c, temp, seeds, block=32, segments=3)[0])
    assert torch.equal(first[0], _logits_draw(z, c, temp, seeds)[0])


def test_logprob_is_the_fused_untempered_one(device):
    K, B, V = 3, 4, 50
    z = make_members(K, B, V, F32, device, seed=2)
    w, t, c = make_weights(B, K, device), make_temperatures(K, device), make_coeffs(B, K, device)
    temp = torch.tensor([0.0, 0.5, 1.0, 2.0], device=device)  # greedy and sampled rows mixed
    seeds = torch.arange(B, device=device)
    for block in (None, 16):
        tokens, logprobs = _probs_draw(z, w, t, temp, seeds, block=block)
        ref = reference.mix_probs(z, w, t)
        torch.testing.assert_close(logprobs, ref.gather(1, tokens[:, None])[:, 0], **TOL[F32])
        assert tokens[0] == ref[0].argmax()
        tokens, logprobs = _logits_draw(z, c, temp, seeds, block=block)
        ref = reference.mix_logits(z, c)
        torch.testing.assert_close(logprobs, ref.gather(1, tokens[:, None])[:, 0], **TOL[F32])


def test_bad_sampling_inputs_name_the_argument():
    z, w = torch.zeros(2, 3, 10), torch.full((3, 2), 0.5)
    ones, seeds = torch.ones(3), torch.arange(3)
    with pytest.raises(ValueError, match="temperature"):
        sample.sample_mix_probs(z, w, None, torch.ones(2), seeds)
    with pytest.raises(ValueError, match="seeds"):
        sample.sample_mix_probs(z, w, None, ones, seeds.float())
    with pytest.raises(ValueError, match="seeds"):
        sample.sample_mix_logits(z, w, ones, seeds[:2])
    with pytest.raises(ValueError, match="coeffs"):
        sample.sample_mix_logits(z, w[:2], ones, seeds)


# --- distribution: chi-square against the reference -------------------------------------------
def _chi_square_p(tokens: torch.Tensor, logprobs: torch.Tensor, temp: float) -> float:
    """p-value of the token counts against ``softmax(logprobs / temp)``."""
    p = torch.softmax(logprobs.double().cpu() / temp, dim=-1)
    counts = torch.bincount(tokens.cpu(), minlength=p.numel()).double()
    expected = p * counts.sum()
    assert expected.min() > 5, "choose a distribution where every token is drawn often enough"
    return chisquare(counts.numpy(), expected.numpy() * (counts.sum() / expected.sum()).item()).pvalue


def _one_distribution(rows: int, V: int, device, seed: int):
    """K = 2 members, one row each, broadcast to ``rows`` rows (batch stride 0)."""
    z = make_members(2, 1, V, F32, device, seed=seed, scale=0.6)
    return z.expand(2, rows, V), torch.tensor([[0.35, 0.65]], device=device).expand(rows, 2)


# Row counts for the interpreter, where one sampled row costs about 7 ms; a GPU takes 8x more.
ROWS_SCALE = 8 if torch.cuda.is_available() else 1


@pytest.mark.parametrize(
    ("temp", "rows", "V", "block"),
    [(1.0, 2000, 8, None), (0.6, 1500, 12, None), (1.0, 500, 20, 16)],
    ids=["T1-single", "T0.6-single", "T1-chunked"],
)
def test_sample_mix_probs_follows_the_mixture(temp, rows, V, block, device):
    rows *= ROWS_SCALE
    z, w = _one_distribution(rows, V, device, seed=V)
    t = torch.tensor([1.0, 0.7], device=device)
    seeds = torch.arange(rows, device=device) * 7919 + 13
    tokens, _ = _probs_draw(z, w, t, torch.full((rows,), temp, device=device), seeds, block=block)
    assert sample.LAST_PLAN.path == ("single" if block is None else "chunked")
    assert _chi_square_p(tokens, reference.mix_probs(z[:, :1], w[:1], t)[0], temp) > 1e-3


@pytest.mark.parametrize(
    ("temp", "rows", "V", "block"),
    [(1.0, 1500, 8, None), (1.7, 1500, 16, None), (1.0, 500, 20, 16)],
    ids=["T1-single", "T1.7-single", "T1-chunked"],
)
def test_sample_mix_logits_follows_the_product(temp, rows, V, block, device):
    rows *= ROWS_SCALE
    z, _ = _one_distribution(rows, V, device, seed=V + 1)
    c = torch.tensor([[1.3, -0.4]], device=device).expand(rows, 2)
    seeds = torch.arange(rows, device=device) * 104729 + 5
    tokens, _ = _logits_draw(z, c, torch.full((rows,), temp, device=device), seeds, block=block)
    assert sample.LAST_PLAN.path == ("single" if block is None else "chunked")
    assert _chi_square_p(tokens, reference.mix_logits(z[:, :1], c[:1])[0], temp) > 1e-3


@pytest.mark.parametrize("temp", [1.0, 0.6])
def test_torch_backend_draws_follow_the_mixture_and_repeat(temp, monkeypatch):
    """The public API on the torch backend: an exact draw, deterministic per seed."""
    monkeypatch.setenv("COMPOSE_SERVE_KERNELS", "torch")
    rows, V = 4000, 8
    z, w = _one_distribution(rows, V, "cpu", seed=3)
    t = torch.tensor([1.0, 0.7])
    temps, seeds = torch.full((rows,), temp), torch.arange(rows)
    tokens, logprobs = kernels.sample_mix_probs(z, w, t, temps, seeds)
    ref = reference.mix_probs(z[:, :1], w[:1], t)[0]
    assert _chi_square_p(tokens, ref, temp) > 1e-3
    torch.testing.assert_close(logprobs, ref[tokens])
    assert torch.equal(tokens[:50], kernels.sample_mix_probs(z[:, :50], w[:50], t, temps[:50],
                                                             seeds[:50])[0])
    c = torch.tensor([[1.3, -0.4]]).expand(rows, 2)
    tokens, _ = kernels.sample_mix_logits(z, c, temps, seeds)
    assert _chi_square_p(tokens, reference.mix_logits(z[:, :1], c[:1])[0], temp) > 1e-3
