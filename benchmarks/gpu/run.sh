#!/usr/bin/env bash
# The GPU run (issue 15, item 4): every GPU check and benchmark in ONE device call, about 8 minutes.
#
#   device run:  command "bash benchmarks/gpu/run.sh", carry [".whl"], timeout_s 590
#   CPU smoke:   SMOKE=1 OUT=/tmp/gpu-smoke bash benchmarks/gpu/run.sh     (what tests/test_gpu_run.py runs)
#
# Steps, each under `timeout -s INT` (Python stops with KeyboardInterrupt: pytest still writes its
# XML, the benchmarks keep the JSON they rewrite as they go), and each cut to what is left of
# BUDGET_S, so one failure or hang costs only its own time box and the later steps still run:
#   setup       wheels from .whl/ into $SITE, the compose_serve view, versions, nvidia-smi   ~15 s
#   gpu_tests   pytest -m gpu (files with a gpu mark)             -> pytest_gpu.xml        box 75 s
#   kernels     bench_kernels.py, K 2/4/8 x B 1/8/64 x V 49152/151936, bf16, GB/s vs peak
#                                                                 -> kernels_cuda.json/.csv box 170 s
#   decode      decode_random.py: SmolLM2-135M architecture, random weights, bf16, B 1/8/64,
#               one member vs K=2 mixture (fused sampling on / off) vs routed (and generate)
#                                                                 -> decode_cuda.json    box 170 s
#   cuda_tests  tests/kernels + tests/test_sampling.py on CUDA, with what is left (<= 150 s)
#                                                                 -> pytest_cuda.xml
# Everything lands in $OUT (the device tool returns at most 8 files; this writes 7):
#   run.log summary.json pytest_gpu.xml kernels_cuda.json kernels_cuda.csv decode_cuda.json pytest_cuda.xml
# summary.json is rewritten after every step (status, exit code, seconds, junit counts, versions).
#
# Environment: OUT (default benchmarks/results), PYTHON (python3), SITE (/tmp/site), BUDGET_S (480),
# SMOKE=1 (CPU smoke run: no wheels, tiny shapes, decode on the CPU, no cuda_tests),
# KERNEL_ARGS / DECODE_ARGS (replace the benchmarks' arguments).

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
ROOT=$PWD
START=$(date +%s)
SMOKE=${SMOKE:-0}
OUT=${OUT:-$ROOT/benchmarks/results}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
BUDGET_S=${BUDGET_S:-480}
STATE=$(mktemp -d /tmp/gpu-run.XXXXXX)  # step records: kept out of $OUT (8 files at most)
mkdir -p "$OUT" "$SITE"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/run.log
: >"$LOG"

if [ "$SMOKE" = 1 ]; then
  KERNEL_ARGS=${KERNEL_ARGS:---quick --threads 1 --ks 2 --bs 1 --vs 64}
  DECODE_ARGS=${DECODE_ARGS:---tiny --device cpu --dtype float32 --batches 1 2 --tokens 2 --repeats 1 --threads 1}
else
  KERNEL_ARGS=${KERNEL_ARGS:---quick --no-compile}
  DECODE_ARGS=${DECODE_ARGS:-}
fi

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HUB_DISABLE_PROGRESS_BARS=1 COMPOSE_SERVE_CACHE=/tmp/compose-serve-cache

log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# summary.json from the step records and the environment probe; rewritten after every step.
write_summary() {
  "$PY" - "$STATE" "$OUT" "$BUDGET_S" "$SMOKE" <<'EOF' || log "could not write summary.json"
import json, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path

state, out, budget, smoke = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
steps = []
for line in (state / "steps.tsv").read_text().splitlines() if (state / "steps.tsv").exists() else []:
    name, status, rc, seconds, box, command = line.split("\t", 5)
    steps.append({"name": name, "status": status, "rc": int(rc), "seconds": int(seconds),
                  "time_box_s": int(box), "command": command})
junit = {}
for xml in sorted(out.glob("pytest_*.xml")):
    try:
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        junit[xml.name] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    except (ET.ParseError, AttributeError, ValueError) as exc:
        junit[xml.name] = {"unreadable": str(exc)}
env = state / "env.json"
summary = {"written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "smoke": smoke,
           "budget_s": budget, "steps": steps, "junit": junit,
           "environment": json.loads(env.read_text()) if env.exists() else None,
           "files": sorted(p.name for p in out.iterdir() if p.is_file())}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
EOF
}

# step NAME BOX COMMAND...: run COMMAND under min(BOX, what is left of the budget), log it, record
# it. A shell function (setup) cannot run under `timeout`: it runs as is and times its own parts.
step() {
  local name=$1 box=$2; shift 2
  local avail; avail=$(left)
  (( box > avail )) && box=$avail
  if (( box < 20 )) && ! declare -F "$1" >/dev/null; then
    log "== $name: skipped (${avail}s left of the ${BUDGET_S}s budget)"
    printf '%s\tskipped\t0\t0\t%s\t%s\n' "$name" "$box" "$*" >>"$STATE/steps.tsv"
    write_summary
    return
  fi
  log "== $name (time box ${box}s): $*"
  local started=$SECONDS rc status
  if declare -F "$1" >/dev/null; then
    "$@" 2>&1 | tee -a "$LOG"
  else
    timeout -s INT -k 15 "$box" "$@" 2>&1 | tee -a "$LOG"
  fi
  rc=${PIPESTATUS[0]}
  case $rc in 0) status=ok ;; 124|130|137) status=timeout ;; *) status=failed ;; esac
  log "== $name: $status (rc $rc, $((SECONDS - started))s)"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - started))" "$box" "$*" >>"$STATE/steps.tsv"
  write_summary
}

skip() {  # skip NAME WHY
  log "== $1: skipped ($2)"
  printf '%s\tskipped\t0\t0\t0\t%s\n' "$1" "$2" >>"$STATE/steps.tsv"
  write_summary
}

# --- setup: wheels, the package view, what is on this machine ----------------------------------
setup() {
  if [ "$SMOKE" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
    timeout 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl || return 1
  fi
  timeout 30 "$PY" benchmarks/gpu/package_view.py "$SITE" || return 1
  if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  fi
  timeout 60 "$PY" -P - "$STATE/env.json" <<'EOF'
import importlib, json, platform, sys
from importlib import metadata

import torch

versions = {}
for name in ("torch", "triton", "transformers", "peft", "tokenizers", "pydantic", "pytest"):
    try:
        versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        versions[name] = None
imports = {}
for module in ("compose_serve.kernels", "compose_serve.config", "compose_serve.engine"):
    try:  # compose_serve.config needs pydantic, which travels as wheels
        imports[module] = importlib.import_module(module).__file__
    except Exception as exc:
        imports[module] = f"FAILED {type(exc).__name__}: {exc}"
cuda = torch.cuda.is_available()
env = {"python": platform.python_version(), "versions": versions, "cuda": cuda,
       "gpu": torch.cuda.get_device_name() if cuda else None, "imports": imports}
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env))
EOF
}

export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
log "gpu run: OUT=$OUT SITE=$SITE BUDGET_S=$BUDGET_S SMOKE=$SMOKE"
step setup 120 setup
CUDA=$("$PY" -c 'import json, sys; print(int(json.load(open(sys.argv[1]))["cuda"]))' "$STATE/env.json" 2>/dev/null || echo 0)

# pytest: -P and --import-mode=append keep the repository root (whose compose_serve/ lacks the
# mapped kernels/ and deployments/) behind the view on sys.path; see package_view.py.
PYTEST=("$PY" -P -m pytest -p no:cacheprovider --import-mode=append -q -rfEs)
mapfile -t GPU_FILES < <(grep -rlE --include='test_*.py' 'mark\.gpu' tests | sort)
step gpu_tests 75 "${PYTEST[@]}" -m gpu --timeout 60 --junitxml="$OUT/pytest_gpu.xml" "${GPU_FILES[@]}"

if [ "$CUDA" = 1 ] || [ "$SMOKE" = 1 ]; then
  # shellcheck disable=SC2086  # the argument strings are meant to split
  step kernels 170 "$PY" benchmarks/kernels/bench_kernels.py --out "$OUT/kernels_cuda.json" $KERNEL_ARGS
  # shellcheck disable=SC2086
  step decode 170 "$PY" benchmarks/gpu/decode_random.py --out "$OUT/decode_cuda.json" $DECODE_ARGS
else
  skip kernels "no CUDA device (see setup in run.log)"
  skip decode "no CUDA device (see setup in run.log)"
fi

if [ "$CUDA" = 1 ]; then
  # The kernel and sampler tests run on CUDA when it is present (tests/kernels/conftest.py); the
  # sm_90 compile test is left out (it compiles without a GPU and runs in CI already).
  step cuda_tests 150 "${PYTEST[@]}" --timeout 60 --junitxml="$OUT/pytest_cuda.xml" \
    --ignore=tests/kernels/test_kernels_compile.py tests/kernels tests/test_sampling.py
else
  skip cuda_tests "no CUDA device: these tests run in the Triton interpreter in CI"
fi

log "done in $(( $(date +%s) - START ))s; files in $OUT:"
ls -l "$OUT" | tee -a "$LOG"
write_summary
rm -rf "$STATE"
