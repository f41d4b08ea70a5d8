"""``backend_for`` is the one place that chooses Triton or torch; the public API follows it."""

from __future__ import annotations

import logging

import compose_serve.kernels as kernels
import pytest
import torch
from compose_serve.kernels import mix, reference, sample
from kernel_cases import TOL, make_coeffs, make_members, make_temperatures, make_weights


@pytest.fixture(autouse=True)
def _fresh_log(monkeypatch):
    monkeypatch.setattr(kernels.dispatch, "_logged", set())
    monkeypatch.delenv("COMPOSE_SERVE_KERNELS", raising=False)


def test_default_is_triton_on_cuda_torch_elsewhere():
    assert kernels.backend_for(torch.device("cpu")) == "torch"
    assert kernels.backend_for(torch.device("meta")) == "torch"
    assert kernels.backend_for(torch.device("cuda")) == "triton"  # no CUDA needed to decide


@pytest.mark.parametrize(("value", "backend"), [("triton", "triton"), (" Torch ", "torch"), ("", "torch")])
def test_env_forces_the_backend(value, backend, monkeypatch):
    monkeypatch.setenv("COMPOSE_SERVE_KERNELS", value)
    assert kernels.backend_for(torch.device("cpu")) == backend


def test_env_bad_value_is_an_error(monkeypatch):
    monkeypatch.setenv("COMPOSE_SERVE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="COMPOSE_SERVE_KERNELS"):
        kernels.backend_for(torch.device("cpu"))
    with pytest.raises(ValueError, match="COMPOSE_SERVE_KERNELS"):
        kernels.mix_probs(torch.zeros(1, 1, 4), torch.ones(1, 1))


def test_choice_is_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="compose_serve.kernels"):
        for _ in range(3):
            kernels.backend_for(torch.device("cpu"))
    assert [r.getMessage() for r in caplog.records] == ["fusion kernels: torch (for cpu tensors)"]


def _fail(*args, **kwargs):
    raise AssertionError("the Triton launcher must not run on the torch backend")


def test_cpu_default_runs_the_reference(monkeypatch):
    for name in ("mix_probs", "mix_logits"):
        monkeypatch.setattr(mix, name, _fail)
    for name in ("sample_mix_probs", "sample_mix_logits"):
        monkeypatch.setattr(sample, name, _fail)
    z = make_members(2, 3, 50, torch.float32, "cpu")
    w, c, t = make_weights(3, 2, "cpu"), make_coeffs(3, 2, "cpu"), make_temperatures(2, "cpu")
    assert torch.equal(kernels.mix_probs(z, w, t), reference.mix_probs(z, w, t))
    assert torch.equal(kernels.mix_logits(list(z), c), reference.mix_logits(z, c))
    temp, seeds = torch.tensor([0.0, 1.0, 0.5]), torch.tensor([1, 2, 3])
    tokens, logprobs = kernels.sample_mix_probs(z, w, t, temp, seeds)
    assert tokens[0] == reference.mix_probs(z, w, t)[0].argmax()
    assert torch.equal(tokens, kernels.sample_mix_probs(z, w, t, temp, seeds)[0])
    kernels.sample_mix_logits(z, c, temp, seeds)


def test_forced_triton_runs_the_kernels(monkeypatch, device):
    """On this CPU the forced Triton path runs in the interpreter."""
    monkeypatch.setenv("COMPOSE_SERVE_KERNELS", "triton")
    mix.LAST_PLAN = sample.LAST_PLAN = None
    z = make_members(3, 2, 9000, torch.bfloat16, device)
    w, c, t = make_weights(2, 3, device), make_coeffs(2, 3, device), make_temperatures(3, device)
    torch.testing.assert_close(kernels.mix_probs(list(z), w, t), reference.mix_probs(z, w, t),
                               **TOL[torch.bfloat16])
    assert mix.LAST_PLAN.path == "chunked"
    torch.testing.assert_close(kernels.mix_logits(z, c), reference.mix_logits(z, c), **TOL[torch.bfloat16])
    temp, seeds = torch.zeros(2, device=device), torch.arange(2, device=device)
    tokens, _ = kernels.sample_mix_probs(z, w, t, temp, seeds)
    assert sample.LAST_PLAN.path == "chunked"
    assert torch.equal(tokens, reference.mix_probs(z, w, t).argmax(-1))
    tokens, _ = kernels.sample_mix_logits(z, c, temp, seeds)
    assert torch.equal(tokens, reference.mix_logits(z, c).argmax(-1))


def test_empty_member_list_is_a_value_error():
    with pytest.raises(ValueError, match="member_logits"):
        kernels.mix_probs([], torch.ones(1, 0))


@pytest.mark.gpu
def test_cuda_tensors_take_triton_by_default():
    z = make_members(3, 32, 151936, torch.bfloat16, "cuda")
    w, t = make_weights(32, 3, "cuda"), make_temperatures(3, "cuda")
    mix.LAST_PLAN = None
    out = kernels.mix_probs(z, w, t)
    assert mix.LAST_PLAN is not None and mix.LAST_PLAN.path == "chunked"
    torch.testing.assert_close(out, reference.mix_probs(z, w, t), **TOL[torch.bfloat16])
    c = make_coeffs(32, 3, "cuda")
    torch.testing.assert_close(kernels.mix_logits(z, c), reference.mix_logits(z, c), **TOL[torch.bfloat16])
    temp, seeds = torch.zeros(32, device="cuda"), torch.arange(32, device="cuda")
    tokens, _ = kernels.sample_mix_probs(z, w, t, temp, seeds)
    assert torch.equal(tokens, reference.mix_probs(z, w, t).argmax(-1))


def test_more_members_than_the_kernels_take_fall_back_to_torch(monkeypatch, caplog):
    """K > MAX_MEMBERS on the Triton backend (CUDA, or forced) runs the reference instead of
    failing every step; the fallback is logged once."""
    monkeypatch.setenv("COMPOSE_SERVE_KERNELS", "triton")
    for name in ("mix_probs", "mix_logits"):
        monkeypatch.setattr(mix, name, _fail)
    k = kernels.MAX_MEMBERS + 1
    z = make_members(k, 2, 40, torch.float32, "cpu")
    w, c = make_weights(2, k, "cpu"), make_coeffs(2, k, "cpu")
    with caplog.at_level(logging.INFO, logger="compose_serve.kernels"):
        assert torch.equal(kernels.mix_probs(z, w), reference.mix_probs(z, w))
        assert torch.equal(kernels.mix_logits(list(z), c), reference.mix_logits(z, c))
    assert kernels.backend_for(torch.device("cuda"), k) == "torch"
    assert kernels.backend_for(torch.device("cuda"), kernels.MAX_MEMBERS) == "triton"
    assert [r.getMessage() for r in caplog.records] == [
        f"fusion kernels: torch ({k} members: the Triton kernels take at most {kernels.MAX_MEMBERS})"
    ]


def test_a_top_level_import_kernels_from_the_repo_root_is_not_this_folder():
    """With the repository root first on sys.path (``python -m`` from the root), ``import kernels``
    must not be compose-serve's folder: transformers imports Hugging Face's hub package by that name."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = ("import kernels, transformers.modeling_utils, compose_serve.kernels as ck; "
            "print(getattr(kernels, '__file__', None)); print(ck.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    hub, ours = out.stdout.split()
    assert Path(ours) == root / "kernels" / "__init__.py"
    assert hub == "None" or Path(hub) != Path(ours)
