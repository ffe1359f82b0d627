#!/usr/bin/env bash
# One device call: the same GPU stages on a baseline tree and on this checkout, interleaved, so a refactor's
# speed is compared on one machine in one run.
#   BASELINE_TAR=scratch/baseline.tar bash benchmarks/before_after.sh offline decode_step
# BASELINE_TAR: `git archive <commit> -o scratch/baseline.tar` (carried; scratch/ is ignored). Each stage is run
# by that tree's own benchmarks/gpu_suite.sh; logs and JSON go to $OUT/before and $OUT/after.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
BASE=/root/semipd-baseline
rm -rf "$BASE" && mkdir -p "$BASE" && tar -xf "${BASELINE_TAR:-scratch/baseline.tar}" -C "$BASE"
mkdir -p scratch "$BASE/scratch"
for stage in "$@"; do
  for side in before after; do
    dir=$PWD; [ "$side" = before ] && dir=$BASE
    echo "##### $stage: $side ($(date +%T))"
    (cd "$dir" && OUT="$OUT/$side" bash benchmarks/gpu_suite.sh "$stage")
  done
done
