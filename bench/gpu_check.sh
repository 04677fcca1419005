#!/usr/bin/env bash
# The builtin engine on CUDA against vLLM on tiny-moe, on a machine with an NVIDIA GPU (issue 13, point 6).
#
# Installs nothing beyond the project and vLLM: the project in .venv (as `make` does: `pip install -e .`, which
# brings PyPI's torch, a CUDA build on Linux) and vLLM in its own venv (`matrixstack engine install vllm`, as
# `make vllm`: `vllm` where `nvidia-smi -L` lists a GPU; both steps are skipped when already done). Then
# bench/engine_vs_vllm.py runs both servers one after the other on workloads A and B, the builtin engine with
# `--device cuda`, each in bfloat16 (DTYPES=bfloat16,float32 adds float32), prints both throughputs and writes the
# JSON to $OUT/engine_vs_vllm_gpu.json when OUT is set, else bench/results/engine_vs_vllm_gpu.json.
# Needs pip's indexes (or PIP_FIND_LINKS with the wheels). About 5-8 minutes on an H200 with the wheels at hand,
# most of it installing and vLLM's start-up. DEVICE=cpu runs the same bench on the CPU (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
device="${DEVICE:-cuda}"
out="${OUT:-bench/results}"
if [[ "$device" == cuda ]]; then
  nvidia-smi -L
fi
if [[ ! -x .venv/bin/matrixstack ]]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e .
fi
.venv/bin/matrixstack engine install vllm
mkdir -p "$out"
.venv/bin/python bench/engine_vs_vllm.py --device "$device" --dtypes "${DTYPES:-bfloat16}" --repeats 2 \
  --out "$out/engine_vs_vllm_gpu.json"
