#!/usr/bin/env bash
# Stage-1 training throughput on a GPU: ours (frankensplit train, built with
# --features cuda) and the reference's modules in PyTorch, same GPU, same run.
# Run from the repository root on the GPU machine:
#   tools/bench/gpu_train.sh target/release/frankensplit target/release/examples/random_bundle [TIMM_DIR]
set -euo pipefail
BIN=$1; RANDOM_BUNDLE=$2; TIMM=${3:-}
WORK=${WORK:-/tmp/fs-gpu}
rm -rf "$WORK"; mkdir -p "$WORK"
TORCH_LIB=$(python3 -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
export LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$BIN" synth-data -o "$WORK/data" --size 256 --train-per-class 96 --val-per-class 4 > /dev/null
"$RANDOM_BUNDLE" "$WORK/teacher" > /dev/null
for amp in false true; do
  cat > "$WORK/run-$amp.toml" <<TOML
output = "$WORK/run-$amp"
workers = 12
checkpoint_every = 0
mixed_precision = $amp
[data]
train = "$WORK/data/train"
val = "$WORK/data/val"
[teacher]
backbone = "swin_s3_base_224"
weights = "$WORK/teacher/weights.safetensors"
[[stages]]
kind = "distill"
epochs = 1
batch_size = 16
lr = 1e-3
lmbda = 0.064
TOML
  start=$(date +%s.%N)
  "$BIN" train --config "$WORK/run-$amp.toml" --device cuda --quiet > /dev/null
  end=$(date +%s.%N)
  python3 - "$WORK/run-$amp/metrics.jsonl" "$amp" "$start" "$end" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
train = [l for l in lines if l["split"] == "train"]
print(json.dumps({"framework": "frankensplit", "amp": sys.argv[2] == "true",
                  "steps": train[-1]["global_step"], "images_per_s_in_steps": train[-1]["images_per_s"],
                  "wall_s_incl_setup_and_validation": float(sys.argv[4]) - float(sys.argv[3])}))
PY
done
if [ -n "$TIMM" ]; then
  for amp in "" "--amp"; do
    TIMM_OLD="$TIMM" python3 tools/bench/train_torch.py --steps 60 --batch 16 $amp || echo "pytorch run failed"
  done
fi
