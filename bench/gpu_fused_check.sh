#!/usr/bin/env bash
# bench/gpu_fused_check.sh: fused training of the convolutional models (issue #14) on one NVIDIA GPU,
# in about 3-4 minutes on an H100/H200 (hard limit 290 s; the Python part stops starting
# measurements after 270 s and says what it skipped).
#
# Needs python3 with torch (CUDA), torchvision, numpy and pyyaml; nothing to download (synthetic
# CIFAR100-LT-shaped data). The repository need not be installed. Usage:
#
#     bash bench/gpu_fused_check.sh > fused.json        # JSON on stdout, progress on stderr
#     DEVICE=cpu QUICK=1 bash bench/gpu_fused_check.sh   # toy sizes on a CPU, to try it
#
# Measures resnet32 and resnet34 (paper widths) at batch 64: the single-model trainer (default knobs:
# CUDA graph + channels_last; and eager), and K = 1, 2, 4, 8, 16 models fused (the whole fused step as
# a CUDA graph, and eager; channels_last): per-model images/s, the ratio to fused K=1 and to the single trainer, and the Table 4
# paper-preset estimate in GPU-minutes (30 models x 320 epochs x 10,847 images / best per-model img/s),
# and what `fuse: auto` would choose for each model on this GPU (its probe, 10-20 s per model).
# Extra arguments go to bench/gpu_fused_check.py (e.g. --ks 1,4,16 --images 4096).
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here" || exit 1
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
if [ "${QUICK:-0}" = 1 ]; then
  SIZE=(--models resnet32 --width 4 --ks 1,2 --images 128 --budget-s 120)
else
  SIZE=()
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 2>/dev/null || true
timeout 290 "$PY" bench/gpu_fused_check.py --device "$DEVICE" "${SIZE[@]}" "$@"
