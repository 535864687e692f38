#!/usr/bin/env bash
# The inference service of two commits side by side on the same model and machine:
# BASE (default dc0d93d, the last commit before the service stopped importing TensorFlow
# and converting models itself) and the working tree, alternated A-B-A-B so drift shows.
# Each side registers a compact CNN @64 px without the rotation ensemble the way its own
# code does, and runs benchmarks/bench_inference.py against its own service.
#
#   benchmarks/inference_ab.sh [BASE] [PAIRS]    # writes benchmarks/results/inference-ab.json
#   BENCH_ARGS="--seconds 1 --levels 1" benchmarks/inference_ab.sh   # a quick try of the script
#   AB_CONFIG=compact_cnn:0:128 AB_MODEL="compact CNN @128 px, the default graph" ...
#       # another model (bench_inference.py --configs syntax), e.g. when the model code changed
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BASE=${1:-dc0d93d}
PAIRS=${2:-2}
CONFIG=${AB_CONFIG:-compact_cnn:0:64:plain}
MODEL=${AB_MODEL:-compact CNN @64 px, untrained, without the rotation ensemble}
read -r -a EXTRA <<< "${BENCH_ARGS:-}"
RESULTS=${AB_RESULTS:-$ROOT/benchmarks/results/inference-ab.json}
DOC=${AB_DOC:-$ROOT/docs/benchmarks-inference-ab.md}
TREE=$(mktemp -d /tmp/leukofed-base.XXXX)
OUT=$(mktemp -d /tmp/leukofed-ab.XXXX)
trap 'git -C "$ROOT" worktree remove --force "$TREE" >/dev/null 2>&1 || true' EXIT
git -C "$ROOT" worktree add --detach "$TREE" "$BASE" >/dev/null
PY="$ROOT/.venv/bin/python"
for i in $(seq 1 "$PAIRS"); do
  echo "pair $i: base $BASE"
  (cd "$TREE" && PYTHONPATH="$TREE" "$PY" benchmarks/bench_inference.py --configs "$CONFIG" "${EXTRA[@]}" \
     --json "$OUT/base-$i.json" --markdown "$OUT/base-$i.md" > "$OUT/base-$i.log" 2>&1)
  echo "pair $i: working tree"
  (cd "$ROOT" && "$PY" benchmarks/bench_inference.py --configs "$CONFIG" "${EXTRA[@]}" \
     --json "$OUT/head-$i.json" --markdown "$OUT/head-$i.md" > "$OUT/head-$i.log" 2>&1)
done
COMMAND="benchmarks/inference_ab.sh $BASE $PAIRS"
[[ -n "${AB_CONFIG:-}" ]] && COMMAND="AB_CONFIG=$AB_CONFIG $COMMAND"
[[ -n "${BENCH_ARGS:-}" ]] && COMMAND="BENCH_ARGS=\"$BENCH_ARGS\" $COMMAND"
"$PY" "$ROOT/benchmarks/compare_inference.py" --base-rev "$BASE" --model "$MODEL" \
  --command "$COMMAND" \
  --head-rev "$(git -C "$ROOT" rev-parse --short HEAD)" "$OUT" \
  --json "$RESULTS" --markdown "$DOC"
