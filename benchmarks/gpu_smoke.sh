#!/usr/bin/env bash
# The GPU smoke run: one command for a GPU owner on a node with >= 1 GPU (from the repo root or anywhere):
#   1. the GPU tests (tests/test_gpu.py: CUDA == CPU tokens, CUDA graph replay == eager, tp=2 on NCCL
#      when there are 2 GPUs, VQ decode in bf16 on the GPU), then
#   2. benchmarks/gpu_smoke.py: GPT-B and GPT-XL, full vs LineAR 1/6, batch 64/256, bf16 -> one table.
# Arguments go to gpu_smoke.py (e.g. --quick). Without a GPU it says so and exits 0.
# PYTHON picks the interpreter (default: the repo's .venv, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_smoke: needs a CUDA GPU (torch.cuda.is_available() is False here); nothing to do."
    exit 0
fi
"$PYTHON" -c 'import torch; print("GPUs:", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))'

"$PYTHON" -m pytest -q -rs tests/test_gpu.py
tests=$?
"$PYTHON" benchmarks/gpu_smoke.py "$@"
bench=$?
echo "gpu_smoke: GPU tests $([ $tests = 0 ] && echo passed || echo FAILED), benchmark $([ $bench = 0 ] && echo done || echo FAILED)"
exit $(( tests || bench ))
