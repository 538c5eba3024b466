#!/usr/bin/env bash
# Times tract-onnx against ONNX Runtime on the edge encoder g_a, in one run:
# for each repeat, tools/bench/edge_reference.py (random-weight reference g_a
# at 224², PyTorch eager, ONNX Runtime and CompressAI at 1 and 2 threads; it
# exports the graph with torch.onnx and keeps it) immediately followed by
# tract-bench on that same graph and input; then, for each --ours ONNX BUNDLE
# (graphs written by `frankensplit export-onnx --part encoder`),
# ort_reference.py (ONNX Runtime, 1 thread) immediately followed by tract-bench.
# --extra-tract BIN times a second tract-bench build (e.g. one built with
# RUSTFLAGS="-C target-cpu=native") on the 224² reference graph right after the
# first. Prints a summary table at the end; all JSON goes to OUT_DIR.
#
#   cargo build --release --manifest-path tools/bench/tract/Cargo.toml
#   PYTHON=/path/to/venv/bin/python tools/bench/tract/compare.sh [--repeats N] [--iterations N] \
#       [--out OUT_DIR] [--extra-tract BIN] [--ours ONNX BUNDLE]...
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
BIN=${TRACT_BENCH:-$here/target/release/tract-bench}
out=/tmp/tract-bench
repeats=2
iterations=50
ours=()
extra=
while [ $# -gt 0 ]; do
  case $1 in
    --repeats) repeats=$2; shift 2 ;;
    --iterations) iterations=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --ours) ours+=("$2" "$3"); shift 3 ;;
    --extra-tract) extra=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$BIN" ] || { echo "build tract-bench first: cargo build --release --manifest-path $here/Cargo.toml" >&2; exit 1; }
mkdir -p "$out"
for rep in $(seq 1 "$repeats"); do
  echo "== repeat $rep: reference g_a 224², edge_reference.py then tract"
  "$PY" "$here/../edge_reference.py" --threads 1,2 --iterations "$iterations" \
    --save-onnx "$out/ga224.onnx" --json "$out/ref-$rep.json" 2> >(grep -v -e DeprecationWarning -e 'torch.onnx.export(' >&2)
  "$BIN" "$out/ga224.onnx" --input "$out/ga224.input.npy" --reference "$out/ga224.ort.npy" \
    --iterations "$iterations" --json "$out/tract-ga224-$rep.json" > /dev/null
  if [ -n "$extra" ]; then
    "$extra" "$out/ga224.onnx" --input "$out/ga224.input.npy" --reference "$out/ga224.ort.npy" \
      --iterations "$iterations" --json "$out/tract-extra-ga224-$rep.json" > /dev/null
  fi
  i=0
  while [ $i -lt ${#ours[@]} ]; do
    onnx=${ours[$i]}; bundle=${ours[$((i + 1))]}; name=$(basename "$onnx" .onnx)
    echo "== repeat $rep: $onnx, ONNX Runtime 1 thread then tract"
    "$PY" "$here/ort_reference.py" "$onnx" --model "$bundle" --stem "$out/$name" \
      --iterations "$iterations" --json "$out/ort-$name-$rep.json" > /dev/null
    "$BIN" "$onnx" --input "$out/$name.input.npy" --reference "$out/$name.ort.npy" \
      --iterations "$iterations" --json "$out/tract-$name-$rep.json" > /dev/null
    i=$((i + 2))
  done
done
"$PY" - "$out" "$repeats" "${ours[@]}" <<'PYEOF'
import json, os, sys
out, repeats, ours = sys.argv[1], int(sys.argv[2]), sys.argv[3::2]
def load(name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)
print("| graph | repeat | input | ONNX Runtime 1 thread ms | ORT 2 threads ms | tract ms (min) | tract / ORT 1 thread | max abs diff tract vs ORT (output max abs) | tract |")
print("|---|---|---|---|---|---|---|---|---|")
for rep in range(1, repeats + 1):
    ref, tr = load(f"ref-{rep}.json"), load(f"tract-ga224-{rep}.json")
    ort1 = next(r for r in ref["runs"] if r["threads"] == 1)["onnxruntime_ms"]
    ort2 = next((r["onnxruntime_ms"] for r in ref["runs"] if r["threads"] == 2), float("nan"))
    print(f"| reference g_a (torch.onnx) | {rep} | {tr['input_shape']} | {ort1:.2f} | {ort2:.2f} | {tr['median_ms']:.2f} ({tr['min_ms']:.2f}) "
          f"| {tr['median_ms'] / ort1:.2f}× | {tr['max_abs_difference']:.1e} ({tr['reference_max_abs']:.2f}) | {tr['tract_version']} |")
    if os.path.exists(os.path.join(out, f"tract-extra-ga224-{rep}.json")):
        tx = load(f"tract-extra-ga224-{rep}.json")
        print(f"| same, --extra-tract build | {rep} | {tx['input_shape']} | {ort1:.2f} | {ort2:.2f} | {tx['median_ms']:.2f} ({tx['min_ms']:.2f}) "
              f"| {tx['median_ms'] / ort1:.2f}× | {tx['max_abs_difference']:.1e} ({tx['reference_max_abs']:.2f}) | {tx['tract_version']} |")
    for onnx in ours:
        name = os.path.splitext(os.path.basename(onnx))[0]
        o, t = load(f"ort-{name}-{rep}.json"), load(f"tract-{name}-{rep}.json")
        print(f"| {name} (export-onnx) | {rep} | {t['input_shape']} | {o['median_ms']:.2f} | – | {t['median_ms']:.2f} ({t['min_ms']:.2f}) "
              f"| {t['median_ms'] / o['median_ms']:.2f}× | {t['max_abs_difference']:.1e} ({t['reference_max_abs']:.2f}) | {t['tract_version']} |")
PYEOF
