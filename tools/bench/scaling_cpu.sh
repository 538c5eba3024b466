#!/usr/bin/env bash
# Data-parallel scaling on this machine's CPUs over MPI: stage 1 of the
# scenes compressor (configs/scenes/compressor-l0.64-long.toml's model,
# the built-in teacher), one process with THREADS threads against PROCS
# MPI processes with THREADS / PROCS threads each, at the same global batch,
# alternating over ROUNDS. Prints one JSON line per run and the ratio of
# images/s (the logged images/s of the global batch over the epoch).
# Run from the repository root, on an otherwise idle machine, after
# `. scripts/setup-libtorch.sh` with a binary built with `--features distributed`:
#   tools/bench/scaling_cpu.sh target/release/frankensplit
# Environment: THREADS (2), PROCS (2), IMAGES (1536, one epoch), BATCH (32), ROUNDS (3),
# WORK (/tmp/fs-scaling), MPIRUN_ARGS (extra mpirun flags, e.g. `--bind-to none`).
set -euo pipefail
BIN=$1
THREADS=${THREADS:-2}; PROCS=${PROCS:-2}; IMAGES=${IMAGES:-1536}; BATCH=${BATCH:-32}; ROUNDS=${ROUNDS:-3}
WORK=${WORK:-/tmp/fs-scaling}
rm -rf "$WORK"; mkdir -p "$WORK"
"$BIN" synth-data -o "$WORK/data" --train-per-class 0 --val-per-class 2 > /dev/null
config() {
  sed -n '/^\[teacher.backbone\]/,/^\[\[stages\]\]/p' configs/scenes/compressor-l0.64-long.toml | sed '$d' > "$WORK/model.toml"
  cat <<TOML
output = "$WORK/$1"
seed = 0
workers = 1
checkpoint_every = 0
[data]
val = "$WORK/data/val"
[data.generate]
seed = 2
size = 112
per_epoch = $IMAGES
[teacher]
split_stage = 2
weights = "$PWD/models/demo/backbone.safetensors"
$(cat "$WORK/model.toml")
[[stages]]
kind = "distill"
epochs = 1
batch_size = $BATCH
lr = 1e-3
lmbda = 0.64
augment = "random-crop-flip"
TOML
}
rate() {
  python3 - "$WORK/$1/metrics.jsonl" "$2" "$3" <<'PY'
import json, sys
train = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
print(json.dumps({"processes": int(sys.argv[2]), "threads_each": int(sys.argv[3]),
                  "steps": train[-1]["global_step"], "images_per_s": train[-1]["images_per_s"]}))
PY
}
for round in $(seq "$ROUNDS"); do
  config "one-$round" > "$WORK/one-$round.toml"
  OMP_NUM_THREADS=$THREADS "$BIN" train --config "$WORK/one-$round.toml" --quiet > /dev/null
  one=$(rate "one-$round" 1 "$THREADS")
  config "many-$round" > "$WORK/many-$round.toml"
  mpirun --allow-run-as-root --oversubscribe ${MPIRUN_ARGS:-} -np "$PROCS" -x OMP_NUM_THREADS=$((THREADS / PROCS)) \
    "$BIN" train --config "$WORK/many-$round.toml" --quiet > /dev/null
  many=$(rate "many-$round" "$PROCS" $((THREADS / PROCS)))
  echo "$one"; echo "$many"
  python3 -c "import json,sys; a,b=json.loads(sys.argv[1]),json.loads(sys.argv[2]); print(json.dumps({'round': $round, 'ratio_many_over_one': round(b['images_per_s']/a['images_per_s'], 3)}))" "$one" "$many"
done
