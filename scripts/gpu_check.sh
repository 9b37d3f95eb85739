#!/usr/bin/env bash
# The GPU check, unattended, in under five minutes: on a host with NVIDIA GPUs and Docker (with the NVIDIA
# Container Toolkit and NVIDIA's Triton image pulled) or the local runtime's tritonserver, it runs the infer
# phase of the demo with servers="auto" (one server per GPU) and the heavy model beside one server, and
# prints rows/s, the GPUs' mean utilisation during infer (nvidia-smi) and each server's batch fill (average
# batch from Triton's statistics). RUNTIME=docker|local, ROWS and TASKS override what it picks.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi > /dev/null; then
  echo "gpu_check: no nvidia-smi here; run it on a host with NVIDIA GPUs." >&2
  exit 2
fi
nvidia-smi -L
gpus=$(nvidia-smi -L | grep -c '^GPU ')
if [ -z "${RUNTIME:-}" ]; then
  if docker info --format '{{json .Runtimes}}' 2> /dev/null | grep -q nvidia; then RUNTIME=docker; else RUNTIME=local; fi
fi
export BATCH_INFER_HOME="${BATCH_INFER_HOME:-$PWD/.data}"
export BATCH_INFER_TRITON_ENV="${BATCH_INFER_TRITON_ENV:-$BATCH_INFER_HOME/triton-server-env}"
timeout 120 make setup > /tmp/gpu_check_setup.log 2>&1 || { tail -20 /tmp/gpu_check_setup.log; exit 1; }
echo "gpu_check: $gpus GPU(s), runtime $RUNTIME, model risk_scorer_heavy"
timeout 170 .venv/bin/python benchmarks/servers.py --servers auto --runtime "$RUNTIME" \
  --model risk_scorer_heavy --rows "${ROWS:-10000000}" --tasks "${TASKS:-$((gpus * 2))}"
