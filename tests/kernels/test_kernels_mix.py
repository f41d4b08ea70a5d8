"""Parity of the Triton ``mix_probs`` / ``mix_logits`` kernels with the torch reference.

Each case asserts the path that ran (``mix.LAST_PLAN``). Big vocabularies use small batches: in
the interpreter a program costs milliseconds.
"""

from __future__ import annotations

import pytest
import torch
from compose_serve.kernels import launch, mix, reference
from kernel_cases import TOL, make_coeffs, make_members, make_temperatures, make_weights

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
NEG_INF = float("-inf")

# (K, B, V, dtype): every K in 1..4, B in {1, 3, 17}, every dtype, the single-path limit and one
# past it, and real vocabularies (49152 = SmolLM2, 65537 = odd) with small B.
CASES = [
    (1, 1, 7, F32), (2, 3, 7, F32), (3, 17, 7, F32), (4, 3, 7, BF16), (2, 17, 7, F16),
    (1, 17, 1000, F32), (2, 1, 1000, BF16), (3, 3, 1000, F16), (4, 17, 1000, F32),
    (4, 3, 1000, BF16),
    (2, 3, launch.SINGLE_MAX_COLS, F32),
    (2, 3, launch.SINGLE_MAX_COLS + 1, BF16), (3, 1, launch.SINGLE_MAX_COLS + 1, F32),
    (2, 3, 49152, BF16), (4, 1, 49152, F16),
    (1, 1, 65537, F32), (3, 3, 65537, BF16), (4, 1, 65537, F16),
]


def _id(case) -> str:
    K, B, V, dtype = case
    return f"K{K}-B{B}-V{V}-{str(dtype).removeprefix('torch.')}"


def expected_path(V: int) -> str:
    return "single" if V <= launch.SINGLE_MAX_COLS else "chunked"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_mix_probs_matches_reference(case, device):
    K, B, V, dtype = case
    z = make_members(K, B, V, dtype, device, seed=V + K)
    w, t = make_weights(B, K, device, seed=K), make_temperatures(K, device)
    out = mix.mix_probs(z, w, t)
    assert mix.LAST_PLAN.path == expected_path(V)
    assert out.dtype == torch.float32 and out.shape == (B, V)
    torch.testing.assert_close(out, reference.mix_probs(z, w, t), **TOL[dtype])


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_mix_logits_matches_reference(case, device):
    K, B, V, dtype = case
    z = make_members(K, B, V, dtype, device, seed=V + K)
    c = make_coeffs(B, K, device, seed=K)
    out = mix.mix_logits(z, c)
    assert mix.LAST_PLAN.path == expected_path(V)
    torch.testing.assert_close(out, reference.mix_logits(z, c), **TOL[dtype])


@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("segments", [1, 3, None])
def test_chunked_path_on_small_rows(K, segments, device):
    """Tiles of 128 over V = 1000: 8 tiles, the last one partial, split into segments."""
    z = make_members(K, 3, 1000, F32, device, seed=K)
    w, t, c = make_weights(3, K, device), make_temperatures(K, device), make_coeffs(3, K, device)
    out = mix.mix_probs(z, w, t, block=128, segments=segments)
    assert mix.LAST_PLAN.path == "chunked" and mix.LAST_PLAN.block == 128
    if segments is not None:
        assert mix.LAST_PLAN.segments == segments
    torch.testing.assert_close(out, reference.mix_probs(z, w, t), **TOL[F32])
    out = mix.mix_logits(z, c, block=128, segments=segments)
    assert mix.LAST_PLAN.path == "chunked"
    torch.testing.assert_close(out, reference.mix_logits(z, c), **TOL[F32])


def test_no_temperatures_means_one(device):
    z = make_members(3, 3, 500, F32, device)
    w = make_weights(3, 3, device)
    torch.testing.assert_close(mix.mix_probs(z, w, None), mix.mix_probs(z, w, torch.ones(3, device=device)))
    torch.testing.assert_close(mix.mix_probs(z, w), reference.mix_probs(z, w), **TOL[F32])


# --- one-hot weights: a member's own distribution ------------------------------------------
@pytest.mark.parametrize("block", [None, 64], ids=["single", "chunked"])
def test_one_hot_weights_reproduce_member(block, device):
    K, B, V = 3, 3, 300
    z = make_members(K, B, V, F32, device, seed=7)
    t = make_temperatures(K, device)
    for k in range(K):
        w = torch.nn.functional.one_hot(torch.full((B,), k), K).float().to(device)
        own = torch.log_softmax(z[k] / t[k], dim=-1)
        assert torch.equal(reference.mix_probs(z, w, t), own)  # the specification: bit for bit
        torch.testing.assert_close(mix.mix_probs(z, w, t, block=block), own, rtol=1e-6, atol=2e-6)
        c = w.clone()
        torch.testing.assert_close(mix.mix_logits(z, c, block=block), torch.log_softmax(z[k], -1),
                                   rtol=1e-6, atol=2e-6)


# --- -inf and extreme scores ----------------------------------------------------------------
@pytest.mark.parametrize("block", [None, 16], ids=["single", "chunked"])
def test_minus_inf_masks_only_the_members_share(block, device):
    K, B, V = 3, 4, 40
    z = make_members(K, B, V, F32, device, seed=3)
    w = torch.tensor([[0.2, 0.3, 0.5]] * B, device=device)
    z[0, :, 5] = NEG_INF  # member 0 masks token 5: only its share goes
    z[:, :, 9] = NEG_INF  # every member masks token 9
    z[1, 1] = NEG_INF  # row 1: member 1 scores nothing -> contributes nothing
    z[2, 2, ::3] = NEG_INF  # scattered -inf
    out = mix.mix_probs(z, w, block=block)
    ref = reference.mix_probs(z, w)
    torch.testing.assert_close(out, ref, **TOL[F32])
    assert torch.isneginf(out[:, 9]).all() and torch.isfinite(out[:, 5]).all()
    others = torch.logsumexp(torch.stack([w[0, k].log() + torch.log_softmax(z[k, 0], -1)
                                          for k in (1, 2)]), 0)
    torch.testing.assert_close(out[0, 5], others[5])
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("block", [None, 16], ids=["single", "chunked"])
def test_zero_weight_member_is_never_read(block, device):
    """A member with weight 0 may hold anything (NaN, -inf): the result is the others' mixture."""
    K, B, V = 3, 2, 40
    z = make_members(K, B, V, F32, device, seed=4)
    w = torch.tensor([[0.4, 0.0, 0.6], [0.0, 0.0, 1.0]], device=device)
    z[1, 0] = float("nan")
    z[1, 1] = NEG_INF
    z[0, 1] = float("nan")
    clean = z.clone()
    clean[1] = 0.0
    clean[0, 1] = 0.0
    expected = reference.mix_probs(clean, w)
    torch.testing.assert_close(reference.mix_probs(z, w), expected)
    torch.testing.assert_close(mix.mix_probs(z, w, block=block), expected, **TOL[F32])
    c = torch.tensor([[1.5, 0.0, -0.5], [0.0, 0.0, 1.0]], device=device)
    expected = reference.mix_logits(clean, c)
    torch.testing.assert_close(mix.mix_logits(z, c, block=block), expected, **TOL[F32])


@pytest.mark.parametrize("block", [None, 16], ids=["single", "chunked"])
def test_mix_logits_minus_inf(block, device):
    z = make_members(2, 2, 40, F32, device, seed=5)
    z[0, :, 3] = NEG_INF  # a positive coefficient on -inf masks the token
    c = torch.tensor([[1.0, 0.5], [2.0, 0.0]], device=device)
    out = mix.mix_logits(z, c, block=block)
    torch.testing.assert_close(out, reference.mix_logits(z, c), **TOL[F32])
    assert torch.isneginf(out[:, 3]).all()


@pytest.mark.parametrize("block", [None, 256], ids=["single", "chunked"])
def test_extreme_logits(block, device):
    K, B, V = 3, 3, 1000
    g = torch.Generator().manual_seed(11)
    signs = torch.randint(0, 2, (K, B, V), generator=g) * 2 - 1
    z = (signs * 1e4 + torch.randn(K, B, V, generator=g)).to(device)  # +-1e4
    w, t = make_weights(B, K, device, zero=False), make_temperatures(K, device)
    out = mix.mix_probs(z, w, t, block=block)
    ref = reference.mix_probs(z, w, t)
    assert torch.isfinite(out).all()
    # z / T reaches 2e4, where one float32 ulp is 2e-3: x - lse cancels to that absolute error
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=4e-3)
    c = make_coeffs(B, K, device)
    torch.testing.assert_close(mix.mix_logits(z, c, block=block), reference.mix_logits(z, c),
                               rtol=1e-5, atol=4e-3)


# --- layouts: lists, strides, transposes ---------------------------------------------------
def _layouts(K, B, V, device):
    base = make_members(K, B, V, F32, device, seed=9)
    wide = torch.zeros(K, B, 2 * V, device=device)
    wide[..., ::2] = base
    yield "vocab-stride-2", wide[..., ::2]
    yield "transposed", base.transpose(1, 2).contiguous().transpose(1, 2)  # stride_v = B
    yield "list", [base[k].clone() for k in range(K)]
    yield "list-mixed-strides", [base[0].clone(), wide[1, :, ::2], base[2].t().contiguous().t()]
    yield "batch-expanded", base[:, :1].expand(K, B, V)


@pytest.mark.parametrize("block", [None, 64], ids=["single", "chunked"])
def test_strided_and_list_inputs(block, device):
    K, B, V = 3, 3, 200
    w, t, c = make_weights(B, K, device), make_temperatures(K, device), make_coeffs(B, K, device)
    w_view = w.t().contiguous().t()  # weights [B, K] as a transposed view
    for name, z in _layouts(K, B, V, device):
        ref = reference.mix_probs(z, w, t)
        torch.testing.assert_close(mix.mix_probs(z, w_view, t, block=block), ref, **TOL[F32], msg=name)
        torch.testing.assert_close(mix.mix_logits(z, c, block=block), reference.mix_logits(z, c),
                                   **TOL[F32], msg=name)


def test_list_equals_stacked(device):
    z = make_members(4, 3, 1000, BF16, device)
    w, t = make_weights(3, 4, device), make_temperatures(4, device)
    assert torch.equal(mix.mix_probs(list(z.unbind(0)), w, t), mix.mix_probs(z, w, t))
    c = make_coeffs(3, 4, device)
    assert torch.equal(mix.mix_logits(list(z.unbind(0)), c), mix.mix_logits(z, c))


def test_eight_members_and_mixed_dtypes(device):
    K = 8
    z = [make_members(1, 2, 100, dtype, device, seed=k)[0]
         for k, dtype in enumerate([F32, BF16, F16] * 3)][:K]
    w, t = make_weights(2, K, device), make_temperatures(K, device)
    torch.testing.assert_close(mix.mix_probs(z, w, t), reference.mix_probs(z, w, t), **TOL[BF16])


def test_empty_batch(device):
    z = torch.zeros(2, 0, 10, device=device)
    assert mix.mix_probs(z, torch.zeros(0, 2, device=device)).shape == (0, 10)
    assert mix.mix_logits(z, torch.zeros(0, 2, device=device)).shape == (0, 10)


# --- input checks --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda z, w: mix.mix_probs(z[0], w), "member_logits"),  # [B, V], not [K, B, V]
        (lambda z, w: mix.mix_probs([], w), "K=0"),
        (lambda z, w: mix.mix_probs([z[0]] * 9, torch.ones(3, 9)), "K=9"),
        (lambda z, w: mix.mix_probs([z[0], z[1, :, :5]], w), "member_logits[1]"),
        (lambda z, w: mix.mix_probs(z.long(), w), "member_logits[0]"),
        (lambda z, w: mix.mix_probs(z[:, :, :0], w), "empty vocabulary"),
        (lambda z, w: mix.mix_probs(z, w[:, :1]), "weights"),
        (lambda z, w: mix.mix_probs(z, w.long()), "weights"),
        (lambda z, w: mix.mix_probs(z, w.to("meta")), "weights"),
        (lambda z, w: mix.mix_probs(z, w, torch.ones(3)), "temperatures"),
        (lambda z, w: mix.mix_logits(z, w.t()), "coeffs"),
        (lambda z, w: mix.mix_probs(z, w, block=100), "block"),
    ],
)
def test_bad_inputs_name_the_argument(call, name):
    z, w = torch.zeros(2, 3, 10), torch.full((3, 2), 0.5)
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
        call(z, w)
