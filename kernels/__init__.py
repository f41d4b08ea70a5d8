"""Fusion kernels: Triton on CUDA tensors, the plain-torch reference elsewhere.

Public API (log-probs are float32, tokens int64):
- ``mix_probs(member_logits [K, B, V] | list[K x [B, V]], weights [B, K], temperatures [K] | None) -> [B, V]``
- ``mix_logits(member_logits, coeffs [B, K]) -> [B, V]``
- ``sample_mix_probs(member_logits, weights, temperatures, temperature [B], seeds [B]) -> (tokens [B], logprobs [B])``
- ``sample_mix_logits(member_logits, coeffs, temperature [B], seeds [B]) -> (tokens [B], logprobs [B])``

The sampling functions draw from ``softmax(fused_logprobs / temperature)`` (temperature 0 =
greedy) and return the chosen token's fused, untempered log-prob; a row's draw is fixed by its
seed, so a caller passes a fresh seed per row and step (e.g. derived from the request's seed and
the step). Both backends draw from exactly that distribution, each deterministically per seed,
but their random streams differ (Triton: Philox per (seed, token); torch: a ``torch.Generator``
per row), so the same seed need not give the same token on both.

The choice between Triton and torch is made in ``backend_for`` alone, logged once, and can be
forced with ``COMPOSE_SERVE_KERNELS=triton|torch`` (triton on CPU tensors needs
``TRITON_INTERPRET=1`` set before the first Triton call, which imports ``mix``/``sample``).
The Triton kernels take at most ``launch.MAX_MEMBERS`` = 8 members; ``backend_for`` sends more
members to the torch reference (logged once), so a composition of any size runs on CUDA.
"""

import sys

if __name__ == "kernels":
    # This folder is ``compose_serve.kernels`` (pyproject's package-dir). Imported as the top-level
    # ``kernels``, it was found because the repository root is on sys.path (``python -m`` run from
    # the root, pytest's rootdir), and that name is Hugging Face's kernel hub, which transformers
    # imports when it is installed: the import is handed over to the installed package. Without
    # one, this module stays empty (no version: transformers takes the hub as absent).
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_module)
else:
    from . import reference
    from .dispatch import backend_for, mix_logits, mix_probs, sample_mix_logits, sample_mix_probs
    from .launch import MAX_MEMBERS

    __all__ = ["MAX_MEMBERS", "backend_for", "mix_logits", "mix_probs", "reference", "sample_mix_logits", "sample_mix_probs"]
