"""Benchmark the fusion kernels against their baselines, in the same run, as ratios.

    python benchmarks/kernels/bench_kernels.py                  # this machine, all shapes
    python benchmarks/kernels/bench_kernels.py --quick          # fewer repeats (CPU: ~1-3 min)
    python benchmarks/kernels/bench_kernels.py --list           # the planned shapes, nothing timed
    python benchmarks/kernels/bench_kernels.py --peak-gbps 4800 --ks 2 8 --bs 64 --vs 151936

On a GPU machine (needs a CUDA build of torch and triton; ``--cpu`` adds the CPU part;
``benchmarks/gpu/run.sh`` runs it with the rest of the GPU checks in one device call):

    pip install -e '.[test]' && python benchmarks/kernels/bench_kernels.py --no-compile

What runs where:

- CPU (always when no CUDA device, or with ``--cpu``): ``reference.mix_probs`` (the log-space
  specification) against ``reference.naive_mix_probs`` (K softmaxes, a weighted sum of
  probabilities, a log), float32, wall-clock medians over repeats after a warm-up, ratio
  naive / reference (> 1: the reference is faster). Triton cannot be timed here: in the
  interpreter it runs as Python.
- GPU (when ``torch.cuda.is_available()``): for ``mix_probs`` and ``mix_logits``, Triton vs the
  eager reference vs ``torch.compile`` of the reference, timed with ``triton.testing.do_bench``
  (median and 20/80 % quantiles), in GB/s = (bytes read once + bytes written) / time, i.e.
  ``K*B*V*e + 4*B*V`` with ``e`` bytes per input element, and in % of ``--peak-gbps``. Then
  fused sampling (``sample_mix_probs``/``sample_mix_logits``) against the log-prob path + torch
  sampling (Triton ``mix_*``, then a vectorised Gumbel-max in torch), as a speed-up ratio.
  Targets reported: >= 80 % of peak at B >= 32, V = 151936 (K = 2..4) and fused sampling >= 2x.
  Each Triton result is checked against the reference before it is timed; a shape that fails
  (check or launch) is recorded as an ``error`` row and the others still run.
  ``--peak-gbps`` defaults to the datasheet bandwidth of the device named by CUDA (``PEAK_GBPS``:
  H200 4800, H100 SXM 3350, ...), else 3350; the conditions say which was used and why.
  ``--no-compile`` leaves out the ``torch.compile`` rows (their compilations can take minutes).

Shapes (``--ks/--bs/--vs`` replace them for both parts): CPU K in {2, 3, 4}, B in {1, 8, 32},
V in {32000, 49152, 151936}; GPU K in {2, 4, 8}, B in {1, 8, 64}, V in {49152, 151936}.
Results go to ``benchmarks/results/kernels_<cpu|cuda>.json`` and ``.csv`` (``--out``) with the
conditions (machine, versions, dtype, sizes, date, commit); on the GPU the JSON is rewritten after
every shape (``"complete": false`` until the last), so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from compose_serve.kernels import reference

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {  # part -> the K, B, V it runs by default
    "cpu": {"K": (2, 3, 4), "B": (1, 8, 32), "V": (32000, 49152, 151936)},
    "gpu": {"K": (2, 4, 8), "B": (1, 8, 64), "V": (49152, 151936)},
}
# Datasheet memory bandwidth (GB/s) by a fragment of the CUDA device name; first match wins.
PEAK_GBPS = (("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),
             ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0),
             ("L40S", 864.0), ("L4", 300.0), ("A10G", 600.0))
FALLBACK_PEAK_GBPS = 3350.0  # H100 SXM, the script's old default
DO_BENCH = {"warmup": 25, "rep": 100}  # ms, triton.testing.do_bench's defaults; --quick: 10 / 40
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- conditions -----------------------------------------------------------------------------
def conditions(args: argparse.Namespace, dtype: str) -> dict:
    """Machine, versions, settings and date of this run."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    cuda = torch.cuda.is_available()
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git_commit": commit,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_note": None if cuda else "no CUDA device in this session: GPU part not run",
        "peak_gbps": args.peak_gbps if cuda else None,
        "peak_gbps_source": args.peak_source if cuda else None,
        "torch_compile_rows": not args.no_compile,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "dtype": dtype,
        "shapes": {part: {dim: list(values) for dim, values in dims.items()}
                   for part, dims in args.shapes.items()},
        "repeats": args.repeats,
        "warmup": args.warmup,
        "min_seconds_per_function": args.min_seconds,
        "timing": "CPU: perf_counter, reference and naive alternated, warm-up rounds skipped; "
                  "GPU: triton.testing.do_bench median and 20/80% quantiles",
        "do_bench_ms": dict(DO_BENCH) if cuda else None,
    }


def make_inputs(K: int, B: int, V: int, dtype: torch.dtype, device: str) -> dict:  # noqa: N803
    g = torch.Generator().manual_seed(K * 1000 + B)
    z = (torch.randn(K, B, V, generator=g) * 3).to(dtype).to(device)
    return {
        "z": z,
        "weights": torch.softmax(torch.randn(B, K, generator=g), -1).to(device),
        "temperatures": (0.7 + 0.6 * torch.rand(K, generator=g)).to(device),
        "coeffs": torch.randn(B, K, generator=g).to(device),
        "temperature": torch.ones(B, device=device),
        "seeds": torch.arange(B, device=device),
    }


# --- CPU: the reference against the naive form -----------------------------------------------
def summarise(times: list[float]) -> dict:
    """Median, quartiles, min and max of wall-clock times in ms."""
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"ms_median": statistics.median(times), "ms_p25": q[0], "ms_p75": q[2],
            "ms_min": min(times), "ms_max": max(times), "runs": len(times)}


def time_interleaved(fns: dict[str, Callable[[], object]], args: argparse.Namespace) -> dict:
    """Time several functions in alternation (so load from other processes hits them alike):
    ``warmup`` untimed rounds, then at least ``repeats`` rounds and until each has run for
    ``min_seconds`` (at most 50 rounds)."""
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    while True:
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
        rounds = len(times[next(iter(fns))])
        done = all(sum(t) >= 1e3 * args.min_seconds for t in times.values())
        if rounds >= 50 or (rounds >= args.repeats and done):
            return {name: summarise(t) for name, t in times.items()}


def shape_grid(dims: dict) -> list[tuple[int, int, int]]:
    """Every (K, B, V) of one part, K slowest."""
    return list(itertools.product(dims["K"], dims["B"], dims["V"]))


def bench_cpu(args: argparse.Namespace) -> list[dict]:
    rows = []
    for K, B, V in shape_grid(args.shapes["cpu"]):
        x = make_inputs(K, B, V, torch.float32, "cpu")
        z, w, t = x["z"], x["weights"], x["temperatures"]
        timed = time_interleaved({"reference": lambda: reference.mix_probs(z, w, t),  # noqa: B023
                                  "naive": lambda: reference.naive_mix_probs(z, w, t)}, args)  # noqa: B023
        ratio = timed["naive"]["ms_median"] / timed["reference"]["ms_median"]
        for impl, stats in timed.items():
            rows.append({"part": "cpu", "op": "mix_probs", "impl": impl, "K": K, "B": B, "V": V,
                         "dtype": "float32", **{k: round(v, 3) for k, v in stats.items()},
                         "ratio_naive_over_reference": round(ratio, 3)})
        print(f"cpu K={K} B={B:>2} V={V:>6}: reference {timed['reference']['ms_median']:8.2f} ms  "
              f"naive {timed['naive']['ms_median']:8.2f} ms  naive/reference {ratio:.2f}", flush=True)
    return rows


# --- GPU: Triton against the reference and torch.compile --------------------------------------
def torch_sample(logprobs: torch.Tensor, temperature: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused sampler: vectorised Gumbel-max over ``logprobs [B, V]`` in torch."""
    noise = torch.empty_like(logprobs).exponential_(generator=generator)
    tokens = (logprobs / temperature[:, None] - noise.log()).argmax(-1)
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]


def _timed(fn: Callable[[], object]) -> dict:
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], **DO_BENCH)
    return {"ms_median": median, "ms_p20": p20, "ms_p80": p80}


def _gpu_fusion_rows(x: dict, shape: dict, peak_gbps: float, compiled: dict) -> list[dict]:
    """Triton, eager reference and torch.compile for ``mix_probs`` and ``mix_logits``."""
    from compose_serve.kernels import mix

    z, w, t, c = x["z"], x["weights"], x["temperatures"], x["coeffs"]
    torch.testing.assert_close(mix.mix_probs(z, w, t), reference.mix_probs(z, w, t), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(mix.mix_logits(z, c), reference.mix_logits(z, c), rtol=2e-5, atol=2e-5)
    moved = z.numel() * z.element_size() + 4 * z.shape[1] * z.shape[2]  # read once, write once
    candidates = {
        ("mix_probs", "triton"): lambda: mix.mix_probs(z, w, t),
        ("mix_probs", "reference"): lambda: reference.mix_probs(z, w, t),
        ("mix_probs", "torch.compile"): lambda: compiled["mix_probs"](z, w, t),
        ("mix_logits", "triton"): lambda: mix.mix_logits(z, c),
        ("mix_logits", "reference"): lambda: reference.mix_logits(z, c),
        ("mix_logits", "torch.compile"): lambda: compiled["mix_logits"](z, c),
    }
    if not compiled:  # --no-compile
        candidates = {key: fn for key, fn in candidates.items() if key[1] != "torch.compile"}
    rows = []
    for (op, impl), fn in candidates.items():
        t_ms = _timed(fn)
        gbps = moved / (t_ms["ms_median"] * 1e-3) / 1e9
        plan = mix.LAST_PLAN if impl == "triton" else None  # the launch just timed
        at_target_shape = impl == "triton" and shape["B"] >= 32 and shape["V"] == 151936
        rows.append({"part": "gpu", "op": op, "impl": impl, **shape, **t_ms, "gbps": round(gbps, 1),
                     "pct_peak": round(100 * gbps / peak_gbps, 1),
                     "path": plan.path if plan else None, "segments": plan.segments if plan else None,
                     "target_80pct": gbps >= 0.8 * peak_gbps if at_target_shape else None})
        print(f"gpu {op:10s} {impl:13s} {_label(shape)}: {t_ms['ms_median'] * 1e3:8.1f} us "
              f"{gbps:7.0f} GB/s ({100 * gbps / peak_gbps:4.1f}% of peak)", flush=True)
    return rows


def _gpu_sampling_rows(x: dict, shape: dict, generator: torch.Generator) -> list[dict]:
    """Fused sampling against the log-prob path (Triton ``mix_*``) + torch Gumbel-max."""
    from compose_serve.kernels import mix, sample

    z, w, t, c = x["z"], x["weights"], x["temperatures"], x["coeffs"]
    temp, seeds = x["temperature"], x["seeds"]
    pairs = {
        "mix_probs": (lambda: sample.sample_mix_probs(z, w, t, temp, seeds),
                      lambda: torch_sample(mix.mix_probs(z, w, t), temp, generator)),
        "mix_logits": (lambda: sample.sample_mix_logits(z, c, temp, seeds),
                       lambda: torch_sample(mix.mix_logits(z, c), temp, generator)),
    }
    rows = []
    for op, (fused_fn, unfused_fn) in pairs.items():
        fused, unfused = _timed(fused_fn), _timed(unfused_fn)
        speedup = unfused["ms_median"] / fused["ms_median"]
        for impl, t_ms in (("fused", fused), ("logprobs+torch_sample", unfused)):
            gbps = z.numel() * z.element_size() / (t_ms["ms_median"] * 1e-3) / 1e9
            rows.append({"part": "gpu", "op": f"sample_{op}", "impl": impl, **shape, **t_ms,
                         "gbps": round(gbps, 1), "speedup_fused": round(speedup, 2),
                         "target_2x": speedup >= 2.0})
        print(f"gpu sample_{op:10s} {_label(shape)}: fused {fused['ms_median'] * 1e3:7.1f} us, "
              f"unfused {unfused['ms_median'] * 1e3:7.1f} us, speed-up {speedup:.2f}x", flush=True)
    return rows


def _label(shape: dict) -> str:
    return f"K={shape['K']} B={shape['B']:>2} V={shape['V']:>6}"


def bench_gpu(args: argparse.Namespace, dtype: torch.dtype,
              on_shape: Callable[[list[dict]], None] = lambda rows: None, device: str = "cuda") -> list[dict]:
    """Every GPU shape in turn; ``on_shape(rows so far)`` after each (the partial save). A shape
    whose check or launch fails becomes one ``error`` row and the next shape still runs.
    (``device="cpu"`` runs the same code in the Triton interpreter: the tests' smoke run.)"""
    compiled = {} if args.no_compile else {"mix_probs": torch.compile(reference.mix_probs),
                                           "mix_logits": torch.compile(reference.mix_logits)}
    generator = torch.Generator(device=device).manual_seed(0)
    rows: list[dict] = []
    for K, B, V in shape_grid(args.shapes["gpu"]):
        shape = {"K": K, "B": B, "V": V, "dtype": str(dtype).removeprefix("torch.")}
        try:
            x = make_inputs(K, B, V, dtype, device)
            rows += _gpu_fusion_rows(x, shape, args.peak_gbps, compiled)
            rows += _gpu_sampling_rows(x, shape, generator)
        except Exception as exc:  # one bad shape must not cost the others
            rows.append({"part": "gpu", "op": "error", **shape, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            print(f"gpu {_label(shape)}: FAILED {type(exc).__name__}: {exc}", flush=True)
        on_shape(rows)
    return rows


# --- output ---------------------------------------------------------------------------------
def write(results: dict, rows: list[dict], json_path: Path) -> tuple[Path, Path]:
    """The JSON at ``json_path`` and the rows as CSV beside it (same stem)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path = json_path.with_suffix(".csv")
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    fields = list(dict.fromkeys(k for row in rows for k in row))  # first-seen order
    cond = results["conditions"]
    stamp = {"date_utc": cond["date_utc"], "machine": cond["gpu"] or cond["processor"],
             "cpu_count": cond["cpu_count"], "torch_threads": cond["torch_threads"],
             "torch": cond["torch"], "triton": cond["triton"], "python": cond["python"]}
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*stamp, *fields])
        writer.writeheader()
        for row in rows:
            writer.writerow({**stamp, **row})
    return json_path, csv_path


def peak_for(device_name: str) -> float | None:
    """Datasheet memory bandwidth (GB/s) of a CUDA device name, None when unknown."""
    return next((gbps for fragment, gbps in PEAK_GBPS if fragment.lower() in device_name.lower()), None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats (CPU: >= 3 rounds and 0.1 s per function, not 7 and 0.5 s; "
                             "GPU: do_bench warm-up 10 ms and 40 ms of repeats, not 25 and 100)")
    parser.add_argument("--cpu", action="store_true", help="run the CPU part even with a GPU")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="the GPU's peak memory bandwidth (default: from the device name, "
                             f"else {FALLBACK_PEAK_GBPS:g}; H100 SXM: 3350, H200: 4800)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a shared machine")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="member logits dtype on the GPU (the CPU part uses float32)")
    parser.add_argument("--ks", type=int, nargs="+", help="members K (replaces both parts' defaults)")
    parser.add_argument("--bs", type=int, nargs="+", help="batch sizes B (replaces both parts' defaults)")
    parser.add_argument("--vs", type=int, nargs="+", help="vocabulary sizes V (replaces both parts' defaults)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows (GPU)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path, the CSV goes beside it (default: benchmarks/results/kernels_<cpu|cuda>.json)")
    parser.add_argument("--list", action="store_true",
                        help="print the planned parts, shapes and peak as JSON and exit (nothing timed)")
    args = parser.parse_args(argv)
    bad = [k for k in args.ks or () if not 1 <= k <= 8]
    if bad:
        parser.error(f"--ks: the Triton kernels take 1 to 8 members, got {bad}")
    for flag, values in (("--bs", args.bs), ("--vs", args.vs)):
        if any(v < 1 for v in values or ()):
            parser.error(f"{flag}: sizes must be >= 1, got {values}")
    args.repeats, args.warmup, args.min_seconds = (3, 1, 0.1) if args.quick else (7, 2, 0.5)
    given = {"K": args.ks, "B": args.bs, "V": args.vs}
    args.shapes = {part: {dim: tuple(given[dim] or default) for dim, default in dims.items()}
                   for part, dims in SHAPES.items()}
    return args


def resolve_peak(args: argparse.Namespace, device_name: str | None) -> None:
    """Set ``args.peak_gbps`` and ``args.peak_source``: the flag, else the device's datasheet value."""
    if args.peak_gbps is not None:
        args.peak_source = "--peak-gbps"
        return
    known = peak_for(device_name) if device_name else None
    args.peak_gbps = known or FALLBACK_PEAK_GBPS
    why = f"device {device_name!r} not in PEAK_GBPS" if device_name else "no CUDA device here"
    args.peak_source = (f"datasheet value for {device_name!r}" if known else
                        f"fallback ({FALLBACK_PEAK_GBPS:g}, H100 SXM): {why}")


def plan(args: argparse.Namespace, cuda: bool) -> dict:
    """What a run would do here: which parts run, their shapes, the peak used for % of peak."""
    parts = {"cpu": not cuda or args.cpu, "gpu": cuda}
    return {"cuda": cuda, "peak_gbps": args.peak_gbps, "peak_gbps_source": args.peak_source,
            "torch_compile_rows": not args.no_compile, "dtype_gpu": args.dtype,
            "parts": {part: {"runs": runs, **{dim: list(v) for dim, v in args.shapes[part].items()},
                             "shapes": len(shape_grid(args.shapes[part]))}
                      for part, runs in parts.items()}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        DO_BENCH.update(warmup=10, rep=40)
    cuda = torch.cuda.is_available()
    resolve_peak(args, torch.cuda.get_device_name() if cuda else None)
    if args.list:
        print(json.dumps(plan(args, cuda), indent=2))
        return 0
    json_path = args.out or RESULTS / f"kernels_{'cuda' if cuda else 'cpu'}.json"
    results = {"conditions": conditions(args, args.dtype if cuda else "float32"), "complete": False}
    rows: list[dict] = []
    if not cuda or args.cpu:
        rows += bench_cpu(args)
        results["cpu"] = [r for r in rows if r["part"] == "cpu"]
    if cuda:
        def save_partial(gpu_rows: list[dict]) -> None:
            write({**results, "gpu": gpu_rows}, rows + gpu_rows, json_path)

        gpu_rows = bench_gpu(args, DTYPES[args.dtype], save_partial)
        rows += gpu_rows
        results["gpu"] = gpu_rows
    else:
        results["gpu"] = {"run": False, "reason": "no CUDA device in this session; rerun this "
                          "script on a GPU machine (see the docstring) for Triton GB/s"}
    results["complete"] = True
    json_path, csv_path = write(results, rows, json_path)
    print(f"wrote {json_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
