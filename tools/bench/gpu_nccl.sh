#!/usr/bin/env bash
# Training over NCCL on the GPU machine (feature `nccl`): torchrun starts
# one process per GPU (world size 1 on a one-GPU machine, which still runs
# every broadcast and all-reduce through ProcessGroupNCCL), stage 1 of the
# full-size configuration; with two or more GPUs, also two processes at the
# same global batch, whose images/s are printed beside one process's.
# Run from the repository root on the GPU machine, with a binary built here:
#   . scripts/setup-libtorch.sh && . scripts/setup-nccl.sh
#   cargo build --release -p frankensplit-cli --features nccl
#   cargo build --release -p frankensplit-models --example random_bundle
#   tools/bench/gpu_nccl.sh target/release/frankensplit target/release/examples/random_bundle
set -euo pipefail
BIN=$1; RANDOM_BUNDLE=$2
WORK=${WORK:-/tmp/fs-nccl}
rm -rf "$WORK"; mkdir -p "$WORK"
TORCHRUN=${FRANKENSPLIT_TORCHRUN:-torchrun}
GPUS=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$BIN" synth-data -o "$WORK/data" --size 256 --train-per-class 96 --val-per-class 4 > /dev/null
"$RANDOM_BUNDLE" "$WORK/teacher" > /dev/null
for n in 1 $([ "$GPUS" -ge 2 ] && echo 2); do
  cat > "$WORK/run-$n.toml" <<TOML
output = "$WORK/run-$n"
workers = 6
checkpoint_every = 0
[data]
train = "$WORK/data/train"
val = "$WORK/data/val"
[teacher]
backbone = "swin_s3_base_224"
weights = "$WORK/teacher/weights.safetensors"
[[stages]]
kind = "distill"
epochs = 1
batch_size = 32
lr = 1e-3
lmbda = 0.064
TOML
  $TORCHRUN --nproc-per-node "$n" --master-port $((29500 + n)) --no-python \
    "$BIN" train --config "$WORK/run-$n.toml" --device cuda --quiet
  python3 - "$WORK/run-$n/metrics.jsonl" "$n" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
train = [l for l in lines if l["split"] == "train"]
print(json.dumps({"engine": "nccl", "processes": int(sys.argv[2]), "steps": train[-1]["global_step"],
                  "loss": train[-1]["loss"], "images_per_s": train[-1]["images_per_s"]}))
PY
done
