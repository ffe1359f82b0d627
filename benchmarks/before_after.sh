#!/usr/bin/env bash
# One device call: the same GPU benchmarks on a baseline tree and on this checkout, interleaved, so a refactor's
# speed is compared on one machine in one run.
#   BASELINE_TAR=scratch/baseline.tar bash benchmarks/before_after.sh decode_step offline
# BASELINE_TAR: `git archive <commit> -o scratch/baseline.tar` (carried; scratch/ is ignored). Each benchmark is
# run from its tree's own benchmarks/ with that tree's packages on PYTHONPATH; logs + JSON go to $OUT/{before,after}.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
OUT=${OUT:-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
BASE=/root/semipd-baseline
rm -rf "$BASE" && mkdir -p "$BASE" && tar -xf "${BASELINE_TAR:-scratch/baseline.tar}" -C "$BASE"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
bench() {  # bench NAME: the same command line in both trees (the scripts' CLIs did not change)
  case $1 in
    decode_step) echo "benchmarks/bench_decode_step.py --shape llama-3.1-8b --batches 1 16 64 128 --contexts 1024 4096 \
      --green-percent 50" ;;
    offline) echo "benchmarks/bench_offline.py --shape llama-3.1-8b --batches 1 16 64 --prompt-len 512 --output-len 128 \
      --skip-hf" ;;
    offline_quick) echo "benchmarks/bench_offline.py --shape llama-3.1-8b --batches 1 64 --prompt-len 512 --output-len 128 \
      --skip-hf --skip-eager --no-overlap-run" ;;
    checks_green) echo "benchmarks/gpu_checks.py --layers 4 --partitions green" ;;
  esac
}
for name in "$@"; do
  for side in before after; do
    dir=$PWD; [ "$side" = before ] && dir=$BASE
    mkdir -p "$OUT/$side"
    echo "##### $name: $side ($(date +%T))"
    (cd "$dir" && PYTHONPATH=$SEMIPD_SRC:${PYTHONPATH:-} \
      timeout -k 10 "${LIMIT_S:-240}" python3 $(bench "$name") --out "$OUT/$side/$name.json" >"$OUT/$side/$name.log" 2>&1)
    echo "rc=$? $(tail -n 12 "$OUT/$side/$name.log")"
  done
done
