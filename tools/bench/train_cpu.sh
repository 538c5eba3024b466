#!/usr/bin/env bash
# Stage-1 (and stage-2) training step on the CPU: ours (frankensplit train)
# and the reference's modules in PyTorch (tools/bench/train_torch.py), same
# configuration, same libtorch kernels, same thread count, alternating rounds.
# Run from the repository root after `. scripts/setup-libtorch.sh`:
#   tools/bench/train_cpu.sh target/release/frankensplit target/release/examples/random_bundle TIMM_DIR [PYTHON]
# Environment: THREADS (2), BATCH (4), STEPS (20, a multiple of 5: the first
# 5 are warm-up on both sides), ROUNDS (3), STAGES ("1 2"), WORK (/tmp/fs-cpu).
set -euo pipefail
BIN=$1; RANDOM_BUNDLE=$2; TIMM=$3; PY=${4:-python3}
THREADS=${THREADS:-2}; BATCH=${BATCH:-4}; STEPS=${STEPS:-20}; ROUNDS=${ROUNDS:-3}; STAGES=${STAGES:-"1 2"}
WORK=${WORK:-/tmp/fs-cpu}
WARMUP=5
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
rm -rf "$WORK"; mkdir -p "$WORK"
# One epoch of STEPS steps: 10 classes, STEPS * BATCH / 10 images each.
"$BIN" synth-data -o "$WORK/data" --size 256 --train-per-class $((STEPS * BATCH / 10)) --val-per-class 1 > /dev/null
"$RANDOM_BUNDLE" "$WORK/teacher" > /dev/null
# Stage 2 reads saved maps (random ones: speed only), as a run with [data] saliency does.
"$PY" - "$WORK/data/train" "$WORK/maps" <<'PY'
import pathlib, sys
import numpy as np
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
rng = np.random.default_rng(0)
for image in src.rglob("*.png"):
    out = (dst / image.relative_to(src)).with_suffix(".npy")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, rng.random((28, 28), dtype=np.float32))
PY
ours() {
  local stage=$1 run="$WORK/run-$1-$2" kind=distill maps=""
  if [ "$stage" = 2 ]; then kind=saliency; maps="saliency = \"$WORK/maps\""; fi
  cat > "$run.toml" <<TOML
output = "$run"
workers = 1
checkpoint_every = $WARMUP
[data]
train = "$WORK/data/train"
val = "$WORK/data/val"
$maps
[teacher]
backbone = "swin_s3_base_224"
weights = "$WORK/teacher/weights.safetensors"
[[stages]]
kind = "$kind"
epochs = 1
batch_size = $BATCH
lr = 1e-3
lmbda = 0.064
TOML
  "$BIN" train --config "$run.toml" --quiet > /dev/null
  # Steps after the first stretch (warm-up); images/s over the timed steps only.
  "$PY" - "$run/metrics.jsonl" "$stage" "$BATCH" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
train = [l for l in lines if l["split"] == "train"][1:]
steps = train[-1]["global_step"] - (train[0]["global_step"] - 5)
seconds = sum(5 * int(sys.argv[3]) / l["images_per_s"] for l in train)
print(json.dumps({"framework": "frankensplit", "stage": int(sys.argv[2]), "batch": int(sys.argv[3]),
                  "steps": steps, "images_per_s": steps * int(sys.argv[3]) / seconds}))
PY
  rm -rf "$run"  # its checkpoint and bundle hold the teacher's weights
}
theirs() {
  TIMM_OLD="$TIMM" "$PY" tools/bench/train_torch.py --device cpu --threads "$THREADS" --stage "$1" \
    --batch "$BATCH" --warmup $WARMUP --steps $((STEPS - WARMUP)) 2>/dev/null
}
for round in $(seq "$ROUNDS"); do
  for stage in $STAGES; do
    if [ $((round % 2)) = 1 ]; then ours "$stage" "$round"; theirs "$stage"; else theirs "$stage"; ours "$stage" "$round"; fi
  done
done
