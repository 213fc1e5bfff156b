#!/usr/bin/env bash
# One timed GPU training leg of the 3D cascade (issue 22) and GPU inference times, run by hand on a GPU machine
# with brainmech importable (pip install -e . or PYTHONPATH=src):
#
#     MINUTES=6 bash benchmarks/gpu_leg.sh runs/gpu-leg
#
# Trains the second stage of a 2-stage mni-3d cascade (stage 1: the shipped mni-3d, frozen) for MINUTES,
# a quarter of its maps sharp (SHARP_FRACTION), with DataLoader workers drawing MNI pseudo-subjects; then
# times mni-3d and the cascade at 2 mm and 1 mm. Writes OUT/run (checkpoints, CSV logs, model.pt and
# model.json), OUT/train.log and OUT/speed.md. ACCELERATOR=cpu DEVICE=cpu MINUTES=1 tries it on a CPU.
# On 2026-11-27 (H200, 15 workers, batch 2: 7.7 steps/s) a leg at LEARNING_RATE=2e-3 diverged at step ~195
# (relative loss 0.52 -> 141 -> 1e11, never recovered); at the default 5e-4 a 2.5-minute leg trained mni-3d-cascade.
set -euo pipefail
out=${1:?usage: gpu_leg.sh OUT_DIR}
mkdir -p "$out"
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
python3 -c "from brainmech.cli import app; app(prog_name='brainmech')" train --dimension 3d --init-from mni-3d --stages 2 \
    --max-steps "${STEPS:-100000}" --max-minutes "${MINUTES:-6}" --batch-size "${BATCH:-2}" \
    --learning-rate "${LEARNING_RATE:-5e-4}" --sharp-fraction "${SHARP_FRACTION:-0.25}" --validation-cases 2 \
    --validate-every "${VALIDATE_EVERY:-500}" --accelerator "${ACCELERATOR:-gpu}" \
    --workers "${WORKERS:-$(( $(nproc) - 1 ))}" --seed 2 --out "$out/run" > "$out/train.log" 2>&1 \
    || { tail -c 3000 "$out/train.log"; exit 1; }
tr '\r' '\n' < "$out/train.log" | grep -v -i warn | tail -5
if [ "${SPEED:-1}" = 1 ]; then  # SPEED=0: training alone
    python3 benchmarks/network_speed.py --device "${DEVICE:-cuda}" --models "mni-3d,$out/run/model.pt" | tee "$out/speed.md"
fi
