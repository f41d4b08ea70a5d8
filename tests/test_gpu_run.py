"""The CPU half of the GPU run (``benchmarks/gpu/``), checked here so the one device call works.

- ``run.sh`` parses, and its smoke mode (``SMOKE=1``: no wheels, tiny shapes, decode on the CPU)
  runs every step: the package view, ``pytest -m gpu``, the kernel benchmark and the
  random-weights decode benchmark, whose JSON must hold every row and every ratio;
- the kernel benchmark plans the issue's GPU shapes (K 2/4/8, B 1/8/64, V 49152/151936), takes
  the peak bandwidth from the device name, and its GPU code path runs in the Triton interpreter;
- ``decode_random.py``'s default config is SmolLM2-135M's.
About 25 s on 2 shared cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = ROOT / "benchmarks" / "gpu"
RUN_SH = GPU_DIR / "run.sh"
STEPS = ["setup", "gpu_tests", "kernels", "decode", "cuda_tests"]
DECODE_ROWS = ["engine_one", "engine_mixture_k2", "engine_mixture_k2_unfused", "engine_routed_mixed", "hf_generate"]
RATIOS = ["one_member_vs_generate", "mixture_k2_vs_one_member", "routed_mixed_vs_one_member",
          "mixture_k2_fused_vs_unfused_sampling"]

needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def load(path: Path, name: str):
    """A benchmark script as a module (they are scripts, not package modules)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_kernels():
    return load(ROOT / "benchmarks" / "kernels" / "bench_kernels.py", "bench_kernels")


# --- run.sh ---------------------------------------------------------------------------------
@needs_bash
def test_run_sh_parses():
    subprocess.run(["bash", "-n", str(RUN_SH)], check=True)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """``SMOKE=1 bash run.sh`` into a temporary OUT (its SITE beside it); returns OUT."""
    out = tmp_path_factory.mktemp("gpu-out")
    site = out.parent / f"{out.name}-site"
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "SITE": str(site), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "BUDGET_S": "170"}
    run = subprocess.run(["bash", str(RUN_SH)], env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


@needs_bash
def test_smoke_run_does_every_step_and_stays_under_eight_files(smoke):
    summary = json.loads((smoke / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == STEPS
    assert all(steps[name]["status"] == "ok" for name in STEPS[:-1]), summary["steps"]
    assert steps["cuda_tests"]["status"] == "skipped"  # no CUDA here
    files = [p for p in smoke.rglob("*") if p.is_file()]
    assert len(files) <= 8, files  # the device tool returns at most 8 files
    assert {p.name for p in files} >= {"run.log", "summary.json", "pytest_gpu.xml", "kernels_cuda.json",
                                       "kernels_cuda.csv", "decode_cuda.json"}
    # the gpu-marked tests were collected (and skipped here), not lost to a collection error
    junit = summary["junit"]["pytest_gpu.xml"]
    assert junit["tests"] >= 2 and junit["errors"] == junit["failures"] == 0
    # compose_serve came from the view run.sh built (SITE), mapped subpackages included
    site = smoke.parent / f"{smoke.name}-site"
    imports = summary["environment"]["imports"]
    assert imports["compose_serve.kernels"] == str(site / "compose_serve" / "kernels" / "__init__.py")
    assert all(value.startswith(str(site)) for value in imports.values()), imports


@needs_bash
def test_decode_json_has_every_row_and_ratio(smoke):
    result = json.loads((smoke / "decode_cuda.json").read_text())
    assert result["complete"] and result["errors"] == {}
    for row in DECODE_ROWS:
        assert set(result["rows"][row]) == {"1", "2"}, row
        assert all(stats["median"] > 0 and stats["n"] == 1 for stats in result["rows"][row].values())
    for batch in ("1", "2"):
        assert set(result["ratios"][batch]) == set(RATIOS)
    cond = result["conditions"]
    assert "RANDOM" in cond["model"] and "init_lora_weights=False" in cond["weights"]
    assert cond["dtype"] == "float32" and cond["device"] == "cpu" and cond["tiny"]
    assert cond["versions"]["torch"] and cond["date"] and cond["architecture"]["num_hidden_layers"] == 2


@needs_bash
def test_kernel_json_from_the_smoke_run(smoke):
    result = json.loads((smoke / "kernels_cuda.json").read_text())
    assert result["complete"] and result["conditions"]["shapes"]["gpu"] == {"K": [2], "B": [1], "V": [64]}
    assert {row["impl"] for row in result["cpu"]} == {"reference", "naive"}


# --- the kernel benchmark -------------------------------------------------------------------
def plan_of(bench_kernels, argv: list[str], capsys) -> dict:
    assert bench_kernels.main(["--list", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_kernel_bench_plans_the_issue_shapes(bench_kernels, capsys):
    gpu = plan_of(bench_kernels, [], capsys)["parts"]["gpu"]
    assert (gpu["K"], gpu["B"], gpu["V"], gpu["shapes"]) == ([2, 4, 8], [1, 8, 64], [49152, 151936], 18)
    cpu = plan_of(bench_kernels, [], capsys)["parts"]["cpu"]  # the CPU part as before
    assert (cpu["K"], cpu["B"], cpu["V"]) == ([2, 3, 4], [1, 8, 32], [32000, 49152, 151936])
    both = plan_of(bench_kernels, ["--ks", "8", "--bs", "64", "--vs", "151936", "--no-compile"], capsys)
    assert both["parts"]["gpu"]["shapes"] == both["parts"]["cpu"]["shapes"] == 1
    assert both["torch_compile_rows"] is False
    with pytest.raises(SystemExit):
        bench_kernels.parse_args(["--ks", "9"])  # the kernels take at most 8 members


def test_kernel_bench_peak_comes_from_the_device_name(bench_kernels):
    assert bench_kernels.peak_for("NVIDIA H200") == 4800
    assert bench_kernels.peak_for("NVIDIA H100 80GB HBM3") == 3350
    assert bench_kernels.peak_for("NVIDIA H100 PCIe") == 2000
    assert bench_kernels.peak_for("Some Future GPU") is None
    args = bench_kernels.parse_args([])
    bench_kernels.resolve_peak(args, "NVIDIA H200")
    assert args.peak_gbps == 4800 and "H200" in args.peak_source
    args = bench_kernels.parse_args(["--peak-gbps", "1000"])
    bench_kernels.resolve_peak(args, "NVIDIA H200")
    assert args.peak_gbps == 1000 and args.peak_source == "--peak-gbps"


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # the interpreter's log(0)
def test_kernel_bench_gpu_path_runs_in_the_interpreter(bench_kernels, monkeypatch):
    """``bench_gpu`` on CPU tensors (Triton interpreter; conftest set TRITON_INTERPRET): every op
    and impl gets a row, a single-block and a chunked vocabulary, K up to 8, partial saves."""
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()

    def timed(fn):
        started = time.perf_counter()
        fn()
        ms = (time.perf_counter() - started) * 1e3
        return {"ms_median": ms, "ms_p20": ms, "ms_p80": ms}

    monkeypatch.setattr(bench_kernels, "_timed", timed)
    args = bench_kernels.parse_args(["--ks", "2", "8", "--bs", "2", "--vs", "300", "9000", "--no-compile"])
    bench_kernels.resolve_peak(args, "NVIDIA H200")
    saves = []
    rows = bench_kernels.bench_gpu(args, torch.float32, saves.append, device="cpu")
    assert [r for r in rows if r["op"] == "error"] == []
    assert len(saves) == 4  # one partial save per shape
    ops = {(r["op"], r["impl"]) for r in rows}
    assert ops == {("mix_probs", "triton"), ("mix_probs", "reference"), ("mix_logits", "triton"),
                   ("mix_logits", "reference"), ("sample_mix_probs", "fused"),
                   ("sample_mix_probs", "logprobs+torch_sample"), ("sample_mix_logits", "fused"),
                   ("sample_mix_logits", "logprobs+torch_sample")}
    paths = {(r["V"], r["path"]) for r in rows if r["impl"] == "triton"}
    assert paths == {(300, "single"), (9000, "chunked")}
    assert {r["K"] for r in rows} == {2, 8} and all(r["pct_peak"] >= 0 for r in rows if "pct_peak" in r)


# --- the decode benchmark's config ------------------------------------------------------------
def test_decode_default_config_is_smollm2_135m():
    decode = load(GPU_DIR / "decode_random.py", "decode_random")
    args = decode.parse_args(["--device", "cpu"])
    config = decode.model_config(args)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (576, 1536, 30)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert config.max_position_embeddings == 8192 and config.tie_word_embeddings
    assert config.rope_parameters["rope_theta"] == 100000.0 and config.rms_norm_eps == 1e-5
    assert args.batches == [1, 8, 64] and args.dtype == "bfloat16" and args.lora_rank == 8
    assert args.out.name == "decode_random_cpu.json"  # never the real-weights decode_cpu.json
    tiny = decode.model_config(decode.parse_args(["--tiny", "--layers", "3"]))
    assert (tiny.num_hidden_layers, tiny.hidden_size) == (3, 64)
