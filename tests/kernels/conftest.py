"""Kernel tests run on CUDA when present, else in the Triton interpreter on this CPU.

``TRITON_INTERPRET=1`` must be set before ``compose_serve.kernels.mix`` / ``.sample`` (the modules
defining ``@triton.jit`` functions) are imported, so it is set here, at the top, when no GPU is
present. Tests marked ``gpu`` are skipped without CUDA.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import inspect  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

HERE = Path(__file__).parent


def _speed_up_interpreter() -> None:
    """Skip the interpreter's redundant re-patching of ``triton.language`` on every call of a
    ``@triton.jit`` helper inside a kernel (about 1 ms per call, most of a program's time here).

    The grid executor patches the language modules once per launch; a helper call patches them
    again (a full ``inspect.getmembers`` scan) although nothing changed. This remembers which
    module sets were patched during the current launch and forgets them when the launch
    restores the modules. Behaviour is unchanged; only the repeated scans are skipped. If the
    interpreter's internals differ (another Triton version), nothing is patched.
    """
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_lang = getattr(interpreter, "_patch_lang", None)
    scope_cls = getattr(interpreter, "_LangPatchScope", None)
    if patch_lang is None or scope_cls is None or getattr(patch_lang, "_once", False):
        return
    patched: set[frozenset[int]] = set()
    restore = scope_cls.restore

    class _Unchanged:
        def restore(self) -> None:
            pass

    def patch_lang_once(fn):
        key = frozenset(id(v) for v in fn.__globals__.values()
                        if inspect.ismodule(v) and v in (tl, tl.core))
        if key in patched:
            return _Unchanged()
        patched.add(key)
        return patch_lang(fn)

    def restore_and_forget(self) -> None:
        patched.clear()
        restore(self)

    patch_lang_once._once = True
    interpreter._patch_lang = patch_lang_once
    scope_cls.restore = restore_and_forget


if os.environ.get("TRITON_INTERPRET") == "1":
    _speed_up_interpreter()


def pytest_collection_modifyitems(config, items) -> None:
    # The interpreter evaluates log(0) = -inf with numpy, which warns; -inf is the intended value.
    quiet = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(quiet)


def pytest_runtest_setup(item) -> None:
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where kernels run: the GPU when present, else the CPU (Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
