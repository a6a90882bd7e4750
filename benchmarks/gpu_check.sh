#!/usr/bin/env bash
# One short check of a CUDA machine (<= 5 min): SSL step MFU at the official size in bf16, a DDP step on NCCL, a
# finetune smoke run; JSON to --out (benchmarks/gpu_check.py). --dry-run: the same at toy sizes on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
exec timeout 600 "$PY" benchmarks/gpu_check.py "$@"
