#!/usr/bin/env bash
# bench/gpu_check.sh: wbsweep's speed figures on one NVIDIA GPU, in about 4 minutes on an H100
# (each step has a time limit: at most 6.5 minutes in all).
#
# Needs python3 with torch (CUDA), torchvision, numpy and pyyaml; not Ray, Optuna or MLflow, and
# nothing to download: the data are synthetic, of the real shapes (10,457 CIFAR100-LT-shaped
# training images per epoch). The repository need not be installed. Run it from anywhere:
#
#     bash bench/gpu_check.sh          # figures on stdout; JSON files in $OUT (or ./bench-out)
#
# What it measures, in order:
#   1. the machine: GPU, driver, compute mode, torch / CUDA / cuDNN versions;
#   2. resnet32 at batch 64: the naive trainer (DataLoader, per-sample torchvision transforms,
#      fp32, .item() per step) against wbsweep's trainer (default knobs: fp32, channels_last, the
#      whole step as a CUDA graph), alternating epochs after a warm-up; target >= 20x;
#   3. knob check: do the knobs keep the numbers? (TF32 off, deterministic cuDNN)
#        A. one batch's gradient with channels_last / bf16 against float64;
#        B. the CUDA-graph trainer against the eager one, 2 epochs on the same batches (warm-up,
#           capture, replays, the eager last batch, the next epoch's learning rate): bit-identical
#           expected;
#        C. the epoch loss of each setting against eager fp32;
#        D. host synchronisations inside one epoch of the default trainer: 0 expected;
#   4. images/s of wbsweep's trainer for each knob combination (fp32/bf16, channels_last, graph);
#   5. train() itself (per-epoch validation, final FDR + LA evaluation, artifacts) for 12 epochs,
#      extrapolated to the paper's 320 epochs: resnet32 (target <= 60 s) and resnet34 (the paper
#      preset's model);
#   6. the naive trainer again with 4 DataLoader worker processes (a faster baseline than the
#      paper-style single-process loader of step 2), against wbsweep;
#   7. 4 packed trials (4 processes sharing the GPU, which is what Ray's fractional GPUs do) against
#      one alone, each an epoch loop with validation: aggregate images/s; target >= 2.5x. With the
#      CUDA-graph step (the default) and with eager steps;
#   8. a summary of the figures against the targets.
#
# DEVICE=cpu QUICK=1 bash bench/gpu_check.sh runs the same steps at toy sizes on a CPU (to try it).
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here" || exit 1
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
OUT_DIR="${OUT:-$here/bench-out}"
mkdir -p "$OUT_DIR"
if [ "${QUICK:-0}" = 1 ]; then
  SIZE=(--images 192 --rounds 1)
  FULL=(--full-run 2 --full-run-models resnet32)
  WORKERS=(--images 192 --rounds 1)
  PACK=(--images 192 --packed 2 --packed-seconds 2)
else
  SIZE=(--rounds 2)
  FULL=(--full-run 12 --full-run-models resnet32,resnet34)
  WORKERS=(--rounds 1)
  PACK=(--packed 4 --packed-seconds 10)
fi
started=$(date +%s)

echo "== 1. machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_mode --format=csv,noheader 2>/dev/null \
  || echo "(nvidia-smi not available)"
"$PY" -c "
import sys, torch, torchvision
print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| cuDNN', torch.backends.cudnn.version(), '| torchvision', torchvision.__version__)
print('GPU:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible to torch')
"

echo
echo "== 2-5. naive vs wbsweep, knob check, knob timing, whole runs (limit 200 s)"
timeout 200 "$PY" -m orchestrator.cli bench --device "$DEVICE" --model resnet32 --batch-size 64 "${SIZE[@]}" \
  --check-knobs --knob-timing "${FULL[@]}" --json-out "$OUT_DIR/gpu_check.json"
status=$?
[ $status -eq 0 ] || echo "!! step 2-5 ended with status $status (124: time limit); the JSON keeps what finished"

echo
echo "== 6. naive trainer with 4 DataLoader workers (limit 60 s)"
timeout 60 "$PY" -m orchestrator.cli bench --device "$DEVICE" --model resnet32 --batch-size 64 "${WORKERS[@]}" \
  --naive-workers 4 --json-out "$OUT_DIR/gpu_check_workers.json"
status=$?
[ $status -eq 0 ] || echo "!! step 6 ended with status $status (124: time limit)"

echo
echo "== 7. packed trials (limit 130 s)"
timeout 130 "$PY" -m orchestrator.cli bench --device "$DEVICE" --model resnet32 --batch-size 64 --skip-compare \
  "${PACK[@]}" --packed-compile auto,off --json-out "$OUT_DIR/gpu_check_packed.json"
status=$?
[ $status -eq 0 ] || echo "!! step 7 ended with status $status (124: time limit)"

echo
echo "== 8. summary ($(( $(date +%s) - started )) s)"
"$PY" - "$OUT_DIR" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return {}
main, packed, workers = load("gpu_check.json"), load("gpu_check_packed.json"), load("gpu_check_workers.json")
def verdict(ok):
    return "MET" if ok else "NOT MET"
if "speedup" in main:
    print(f"resnet32 batch 64: naive {main['naive_img_per_s']:,.0f} img/s, wbsweep {main['wbsweep_img_per_s']:,.0f} "
          f"img/s ({main['precision']}, channels_last {main['channels_last']}, compile {main['compile']}): "
          f"{main['speedup']:.1f}x  [target >= 20x: {verdict(main['speedup'] >= 20)}]")
else:
    print("naive vs wbsweep: not measured", main.get("error", ""))
if "speedup" in workers:
    print(f"  with 4 DataLoader workers: naive {workers['naive_img_per_s']:,.0f} img/s, wbsweep "
          f"{workers['wbsweep_img_per_s']:,.0f} img/s: {workers['speedup']:.1f}x")
kc = main.get("knob_check", {})
if "ok" in kc:
    print(f"knob check: {'PASS' if kc['ok'] else 'FAIL'} (host syncs inside an epoch: {kc.get('host_syncs_in_epoch')})")
for row in main.get("knob_timing", []) if isinstance(main.get("knob_timing"), list) else []:
    print(f"  {row['precision']} channels_last={row['channels_last']!s:<5} compile={row['compile']:<9} "
          f"{row['img_per_s']:>10,.0f} img/s")
for key, value in main.items():
    if key.startswith("full_run_") and "estimate_320_epochs_s" in value:
        target = f"  [target <= 60 s: {verdict(value['estimate_320_epochs_s'] <= 60)}]" if value["model"] == "resnet32" else ""
        print(f"320-epoch CIFAR100-LT run, {value['model']}: ~{value['estimate_320_epochs_s']:.0f} s "
              f"({value['epoch_s'] * 1000:.0f} ms/epoch incl. validation){target}")
for key, value in packed.items():
    if key.startswith("packed_") and isinstance(value, dict) and "packed_speedup" in value:
        mode = key.removeprefix("packed_")
        print(f"{value['packed_trials']} packed trials, compile={mode}: {value['packed_img_per_s']:,.0f} img/s vs "
              f"{value['single_img_per_s']:,.0f} alone = {value['packed_speedup']:.2f}x  "
              f"[target >= 2.5x: {verdict(value['packed_speedup'] >= 2.5)}]")
for f in main.get("failures", []) + packed.get("failures", []) + workers.get("failures", []):
    print("FAILED:", f)
print(f"JSON: {out}/gpu_check.json, gpu_check_workers.json, gpu_check_packed.json")
EOF
