#!/usr/bin/env bash
# bench/gpu_compile_check.sh: a short GPU check (about 5 minutes on an H100) of what changed after
# gpu_check.sh's figures: compile=cudagraph+torch (inductor's fused kernels captured in the CUDA
# graph of the whole step) against the default compile=cudagraph (the eager step's kernels).
#
# Needs what gpu_check.sh needs (torch with CUDA, torchvision, numpy, pyyaml); nothing to download.
#   1. the machine;
#   2. resnet32 at batch 64: naive vs wbsweep default, and images/s of fp32 + channels_last with
#      compile=cudagraph and with compile=cudagraph+torch (the first compiles: about a minute);
#   3. train() for 12 epochs (per-epoch validation, final evaluation), extrapolated to 320 epochs,
#      with compile=cudagraph+torch (the default's figure is in gpu_check.sh's results);
#   4. naive vs wbsweep with compile=cudagraph+torch.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here" || exit 1
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-$here/bench-out}"
mkdir -p "$OUT_DIR"
started=$(date +%s)
echo "== 1. machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
echo "== 2. naive vs wbsweep (default), knob timing with cudagraph+torch (limit 200 s)"
timeout 200 "$PY" -m orchestrator.cli bench --device cuda --model resnet32 --batch-size 64 --rounds 2 \
  --knob-timing --with-torch-compile --json-out "$OUT_DIR/compile_a.json" || echo "!! step 2 status $?"
echo "== 3-4. compile=cudagraph+torch: naive vs wbsweep, 12-epoch train() (limit 150 s)"
timeout 150 "$PY" -m orchestrator.cli bench --device cuda --model resnet32 --batch-size 64 --rounds 2 \
  --set compile=cudagraph+torch --full-run 12 --full-run-models resnet32 \
  --json-out "$OUT_DIR/compile_b.json" || echo "!! step 3-4 status $?"
echo "== done in $(( $(date +%s) - started )) s; JSON in $OUT_DIR"
