"""Compile every Triton kernel for an H100 (sm_90) without a GPU, and report its resources.

    python tests/kernels/compile_sm90.py     # one JSON line per kernel variant

Triton compiles to PTX and cubin with its bundled LLVM and ptxas, so no device is needed. Each
kernel gets the specialisation a real launch would see (16-byte aligned pointers, unit vocabulary
stride). Must run without ``TRITON_INTERPRET`` (the interpreter replaces the JIT functions);
``test_kernels_compile.py`` runs it in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from compose_serve.kernels import mix, sample
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

INT64_POINTERS = {"best_col_ptr", "token_ptr", "seed_ptr"}
ALIGNED_INTS = {"stride_zb", "V", "segment_len"}
UNIT = {"stride_zv": 1}  # the common case: contiguous vocabulary

# (kernel, constexprs, num_warps): the launchers' defaults and the widest cases
KERNELS = [
    (mix._probs_single_kernel, {"K": 4, "HAS_T": True, "BLOCK": 8192, **UNIT}, 16),
    (mix._probs_single_kernel, {"K": 1, "HAS_T": False, "BLOCK": 1024}, 4),
    (mix._probs_stats_kernel, {"K": 8, "HAS_T": True, "BLOCK": 4096, **UNIT}, 8),
    (mix._probs_out_kernel, {"K": 4, "HAS_T": True, "BLOCK": 4096, "SEGMENTS_P2": 64, **UNIT}, 8),
    (mix._probs_out_kernel, {"K": 8, "HAS_T": True, "BLOCK": 4096, "SEGMENTS_P2": 64, **UNIT}, 8),
    (mix._logits_single_kernel, {"K": 3, "BLOCK": 4096, **UNIT}, 8),
    (mix._logits_stats_kernel, {"K": 4, "BLOCK": 4096, **UNIT}, 8),
    (mix._logits_out_kernel, {"K": 4, "BLOCK": 4096, "SEGMENTS_P2": 64, **UNIT}, 8),
    (sample._sample_probs_single_kernel, {"K": 2, "HAS_T": True, "BLOCK": 4096, **UNIT}, 8),
    (sample._sample_probs_partial_kernel,
     {"K": 4, "HAS_T": False, "BLOCK": 4096, "SEGMENTS_P2": 64, **UNIT}, 8),
    (sample._sample_logits_single_kernel, {"K": 2, "BLOCK": 2048, **UNIT}, 4),
    (sample._sample_logits_partial_kernel, {"K": 4, "BLOCK": 4096, **UNIT}, 8),
    (sample._combine_kernel, {"HAS_LSE": True, "SEGMENTS_P2": 64}, 4),
]


def _is_pointer(name: str) -> bool:
    return name.endswith("_ptr") or re.fullmatch(r"z\d", name) is not None


def compile_sm90(fn, constexprs: dict, member_dtype: str = "bf16", num_warps: int = 4):
    """``triton.compile`` ``fn`` for cuda:90 with pointer/int arguments typed from their names."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif _is_pointer(name):
            kind = member_dtype if name[0] == "z" else "i64" if name in INT64_POINTERS else "fp32"
            signature[name] = "*" + kind
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i64" if name.startswith("stride") else "i32"
            if name in ALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def resources(compiled) -> dict:
    """Registers and spill (stack) bytes from ``cuobjdump``, and the PTX's vector loads."""
    ptx = compiled.asm["ptx"]
    out = {"sm90": ".target sm_90" in ptx, "v4_loads": len(re.findall(r"ld\.global(\.nc)?\.v4", ptx))}
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(tool):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([tool, "--dump-resource-usage", f.name],
                                   capture_output=True, text=True, check=True).stdout
        out["registers"] = max(int(r) for r in re.findall(r"REG:(\d+)", usage))
        out["spill_bytes"] = sum(int(s) for s in re.findall(r"STACK:(\d+)", usage))
    return out


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter cannot compile", file=sys.stderr)
        return 2
    for fn, constexprs, num_warps in KERNELS:
        row = {"kernel": fn.fn.__name__, "num_warps": num_warps,
               "unit_stride": "stride_zv" in constexprs,
               **{k: v for k, v in constexprs.items() if k != "stride_zv"}}
        row.update(resources(compile_sm90(fn, constexprs, num_warps=num_warps)))
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
