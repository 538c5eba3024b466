#!/usr/bin/env bash
# The workspace's never-rules (README, "Architecture"), checked from the
# dependency graph cargo resolves (normal dependencies only):
#   - the device side and the contracts never reach libtorch (torch-sys):
#     codec, preprocess, checkpoint, imagecodecs, bundle, api, links, and edge with
#     its HTTP client;
#   - the server never depends on training code, nor does `frankensplit eval`.
# Run by scripts/test.sh; exits non-zero naming every rule broken.
set -euo pipefail
cd "$(dirname "$0")/.."
broken=0
torch_free=(codec preprocess checkpoint imagecodecs bundle api links "edge --features client")
for spec in "${torch_free[@]}"; do
  read -r crate flags <<<"$spec"
  # shellcheck disable=SC2086 # flags are meant to split
  if ! tree=$(cargo tree -q -p "frankensplit-$crate" $flags -e normal --prefix none); then
    echo "never-rule check failed: cannot resolve frankensplit-$crate" >&2
    broken=1
  elif grep -q '^torch-sys ' <<<"$tree"; then
    echo "never-rule broken: frankensplit-$crate ${flags:+($flags) }reaches libtorch through:" >&2
    # shellcheck disable=SC2086
    cargo tree -q -p "frankensplit-$crate" $flags -e normal -i torch-sys | head -n 20 >&2
    broken=1
  fi
done
if ! serve_tree=$(cargo tree -q -p frankensplit-serve -e normal --prefix none); then
  echo "never-rule check failed: cannot resolve frankensplit-serve" >&2
  broken=1
elif grep -q '^frankensplit-train ' <<<"$serve_tree"; then
  echo "never-rule broken: frankensplit-serve depends on frankensplit-train" >&2
  broken=1
fi
eval_sources=$(find crates/cli/src -name 'eval.rs')
if [[ -z "$eval_sources" ]]; then
  echo "never-rule check is stale: no eval.rs under crates/cli/src" >&2
  broken=1
elif grep -n 'frankensplit_train' $eval_sources >&2; then
  echo "never-rule broken: the eval command uses frankensplit_train" >&2
  broken=1
fi
if [[ $broken -ne 0 ]]; then
  exit 1
fi
echo "never-rules hold: ${#torch_free[@]} crates free of libtorch, serve and eval free of train"
