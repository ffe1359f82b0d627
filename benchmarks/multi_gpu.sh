#!/usr/bin/env bash
# Issue 20 on a 2-GPU device kind (nvidia-h200-x2 / nvidia-h100-x2); benchmarks/multi_gpu/README.md gives the calls.
#   bash benchmarks/multi_gpu.sh stash             # device: carried .whl, scratch/{smg-min.tar.xz,mooncake-min.tar.xz,
#                                                  # debs,llama8b} -> /root/stash (what a call carries, later ones reuse)
#   bash benchmarks/multi_gpu.sh STAGE...          # run stages here, in this call (each with its own time limit)
#   bash benchmarks/multi_gpu.sh bg STAGE...       # the same, detached (setsid) from a copy of the tree
#   bash benchmarks/multi_gpu.sh wait [MAX_S]      # until the detached run ends (or MAX_S, default 540); then pack
#   bash benchmarks/multi_gpu.sh pack              # results so far -> $OUT (tarball + summary + compare table)
# Stages (each <= 9 min):
#   checks_tp        gpu_checks.py --tp 2: TP=2 greedy == TP=1, unified + semi-PD (none, green), fp32 + bf16
#   pd_greedy        prefill GPU 0 + decode GPU 1 behind smg == one unified instance (greedy, 5 prompts)
#   bench_single     (a) unified on GPU 0 and (b) semi-PD green static on GPU 1, at once (MG_SERIAL=1: in turn)
#   bench_dp         (c) 2 unified instances behind smg --worker-urls
#   bench_pd         (d) prefill instance GPU 0 + decode GPU 1 behind smg --pd-disaggregation (+ KV GB/s)
#   bench_dp_semipd  (e) 2 semi-PD green instances behind smg
#   bench_tp_semipd  (f) one semi-PD green instance, --tp-size 2
#   compare          --compare table + plots of every run, rate at 90% SLO attainment per GPU (summary.txt)
#   bench            bench_single bench_dp bench_pd bench_dp_semipd bench_tp_semipd compare (one machine for a-f)
#   checks           checks_tp pd_greedy
#   all              bench, then checks
# Same client, workload and rates for every config: uniform 3072 +-50% in / 256 +-50% out (gpu_suite's SWEEP_BENCH
# shape), MG_RATES (default "4 8 12 16") x MG_DURATION_S (12) s of arrivals, SLO TTFT 2 s / TPOT 25 ms,
# request timeout MG_TIMEOUT_S (30). Results accumulate in MG_RES (/root/mg_res), one results file per config.
# MG_CPU=1: a CPU rehearsal (servers on the CPU with the default model, tiny workload, semi-PD without green,
# TP over gloo; PY=.venv/bin/python), for checking launch / bench / teardown / compare without a GPU.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT=${OUT:-out/multi_gpu}
RES=${MG_RES:-/root/mg_res}
STASH=${STASH:-/root/stash}
PY=${PY:-python3}
mkdir -p "$OUT" "$RES"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton-cache
# a PD request whose KV never lands frees its decode pages after 60 s, not 300 (seen once on CPU: see README)
export SEMIPD_DISAGGREGATION_WAITING_TIMEOUT=${SEMIPD_DISAGGREGATION_WAITING_TIMEOUT:-60}
SRC_PATH=packages/semipd-kernels/src:packages/semipd-memory/src:packages/semipd-runtime/src:packages/semipd-server/src
export PYTHONPATH=$SRC_PATH:benchmarks${PYTHONPATH:+:$PYTHONPATH}
CPU=${MG_CPU:-0}

have() { [ -e "$1" ] && echo "$1" || { [ -e "$STASH/$(basename "$1")" ] && echo "$STASH/$(basename "$1")"; }; }

setup() {  # wheels, Mooncake (+ the Debian libraries it links), smg: from the carried paths or /root/stash
  [ "$CPU" = 1 ] && return 0
  local w m d s
  w=$(have .whl); m=$(have scratch/mooncake-min.tar.xz); d=$(have scratch/debs); s=$(have scratch/smg-min.tar.xz)
  mkdir -p /tmp/site
  if [ -n "$w" ] && [ ! -f /tmp/site/.whl_done ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$w"/*.whl && touch /tmp/site/.whl_done
  fi
  if [ -n "$m" ] && [ ! -d /tmp/site/mooncake ]; then tar -xJf "$m" -C /tmp/site; fi
  export PYTHONPATH=$PYTHONPATH:/tmp/site
  if [ -n "$d" ]; then
    if [ ! -d /tmp/pdlibs ]; then
      mkdir -p /tmp/pdall /tmp/pdlibs
      for f in "$d"/*.deb; do dpkg -x "$f" /tmp/pdall; done
      for so in $(find /tmp/pdall -name "*.so.*" \( -type f -o -type l \)); do
        ldconfig -p | grep -q "$(basename "$so") " || cp -a "$so" /tmp/pdlibs/
      done
    fi
    export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/tmp/pdlibs
  fi
  if [ -n "$s" ] && [ ! -x /tmp/smg/bin/smg ]; then mkdir -p /tmp/smg && tar -xJf "$s" -C /tmp/smg; fi
  export SMG=/tmp/smg/bin/smg
  python3 -c "import mooncake.engine" 2>/dev/null && echo "mooncake OK" || echo "WARNING: no mooncake (pd stages fail)"
  [ -x "$SMG" ] && python3 "$SMG" --version || echo "WARNING: no smg (dp/pd stages fail)"
}

if [ "$CPU" = 1 ]; then
  MODEL_ARGS=""
  SERVER=${MG_SERVER_ARGS:-"--num-pages 512 --max-running-requests 16"}
  UNIFIED=${MG_UNIFIED_ARGS:-""}
  SEMIPD=${MG_SEMIPD_ARGS:-"--enable-semi-pd"}
  BENCH=${MG_BENCH:-"--dataset uniform --input-len 64 --output-len 8 --range-ratio 0.5 --num-prompts 100 \
--duration-s 3 --request-rates ${MG_RATES:-1 2} --slo-ttft-ms 2000 --slo-tpot-ms 200 --request-timeout-s 60"}
  LAUNCH_FLAGS="--cpu"
  CHECKS="--shape tiny --layers 2 --device cpu --partitions none"
  GREEDY="--prompt-lens 7 100 --max-tokens 8"
else
  MODEL=${MODEL_DIR:-$(have scratch/llama8b)}
  [ -n "$MODEL" ] || MODEL=scratch/llama8b
  MODEL_ARGS="--model-path $MODEL"
  SERVER=${MG_SERVER_ARGS:-"--load-format dummy --context-length 8192 --max-running-requests 64"}
  UNIFIED=${MG_UNIFIED_ARGS:-"--chunked-prefill-size 2048"}
  SEMIPD=${MG_SEMIPD_ARGS:-"--enable-semi-pd --sm-partition green --decode-sm-percent 40"}
  BENCH=${MG_BENCH:-"--dataset uniform --input-len 3072 --output-len 256 --range-ratio 0.5 --num-prompts 1000 \
--duration-s ${MG_DURATION_S:-12} --request-rates ${MG_RATES:-4 8 12 16} --slo-ttft-ms 2000 --slo-tpot-ms 25 \
--request-timeout-s ${MG_TIMEOUT_S:-30}"}
  LAUNCH_FLAGS=""
  CHECKS="--layers 4 --partitions none green"
  GREEDY=""
fi

stage() {  # stage NAME LIMIT_S CMD...: log to $RES/NAME.log, print its tail; leftovers ended by pid
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s)"
  local t0=$SECONDS pidf="$RES/$name.pids"
  rm -f "$pidf"
  timeout -k 20 "$limit" "$@" >"$RES/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s"
  if [ -f "$pidf" ]; then  # what launch.py started and did not stop (killed hard): end those, by id
    for p in $(cat "$pidf"); do kill -0 "$p" 2>/dev/null && { echo "ending leftover pid $p"; kill -TERM "$p"; }; done
    sleep 3; for p in $(cat "$pidf"); do kill -0 "$p" 2>/dev/null && kill -KILL "$p"; done
  fi
  grep -aE "^(===|== .* @ |SLO|TTFT|TPOT|  KV|\{\"check|ALL OK|FAILED|error|Error|Traceback)" "$RES/$name.log" \
    | tail -n "${MG_TAIL_N:-30}"
  return $rc
}

launch() {  # launch STAGE LIMIT TOPOLOGY LABEL EXTRA_FLAGS...: one config -> $RES/mg_LABEL.json
  local name=$1 limit=$2 topo=$3 label=$4 extra=$5
  # shellcheck disable=SC2086  # LAUNCH_FLAGS is a list of flags
  stage "$name" "$limit" "$PY" benchmarks/multi_gpu/launch.py bench --topology "$topo" --label "$label" $LAUNCH_FLAGS \
    --server-args="$MODEL_ARGS $SERVER" --extra-args="$extra" --bench-args="$BENCH" \
    --pid-file "$RES/$name.pids" --out "$RES/mg_$label.json"
}

run_stage() {
  case $1 in
    checks_tp)
      # shellcheck disable=SC2086
      stage checks_tp 400 "$PY" benchmarks/gpu_checks.py --tp 2 $CHECKS --out "$RES/gpu_checks_tp.json" ;;
    pd_greedy)
      # shellcheck disable=SC2086
      stage pd_greedy 420 "$PY" benchmarks/multi_gpu/launch.py pd-greedy $LAUNCH_FLAGS $GREEDY \
        --server-args="$MODEL_ARGS $SERVER" --extra-args="$UNIFIED" --pid-file "$RES/pd_greedy.pids" \
        --out "$RES/pd_greedy.json" ;;
    bench_single)
      if [ "${MG_SERIAL:-0}" = 1 ] || [ "$CPU" = 1 ]; then
        launch bench_a 400 single a-unified-1gpu "$UNIFIED"
        launch bench_b 400 single b-semipd-green-1gpu "$SEMIPD"
      else  # two independent 1-GPU runs at once, one per GPU (own client each; the host has 32 cores)
        ( launch bench_a 500 single a-unified-1gpu "$UNIFIED" ) &
        local pa=$!
        LAUNCH_FLAGS="$LAUNCH_FLAGS --gpus 1" launch bench_b 500 single b-semipd-green-1gpu "$SEMIPD"
        wait "$pa"
      fi ;;
    bench_dp) launch bench_dp 500 dp c-dp-unified-2gpu "$UNIFIED" ;;
    bench_pd) launch bench_pd 500 pd d-pd-unified-2gpu "$UNIFIED" ;;
    bench_dp_semipd) launch bench_dp_semipd 500 dp e-dp-semipd-green-2gpu "$SEMIPD" ;;
    bench_tp_semipd) launch bench_tp_semipd 500 tp f-tp-semipd-green-2gpu "$SEMIPD" ;;
    compare)
      local files
      files=$(ls "$RES"/mg_*.json 2>/dev/null | grep -v '\.kv\.json$' | sort)
      [ -n "$files" ] || { echo "no results in $RES"; return 1; }
      # shellcheck disable=SC2086  # a list of files
      "$PY" -m semipd_server.bench.serving --compare $files --plot-dir "$RES/plots" >"$RES/compare.txt" 2>&1
      # shellcheck disable=SC2086
      "$PY" benchmarks/multi_gpu/launch.py summary $files --out "$RES/summary.txt"
      tail -n 12 "$RES/compare.txt" ;;
    bench) for s in bench_single bench_dp bench_pd bench_dp_semipd bench_tp_semipd compare; do run_stage "$s"; done ;;
    checks) for s in checks_tp pd_greedy; do run_stage "$s"; done ;;
    all) run_stage bench; run_stage checks ;;
    *) echo "unknown stage $1"; return 2 ;;
  esac
}

pack() {
  tar -czf "$OUT/multi_gpu_results.tar.gz" -C "$RES" --exclude='*.pids' . 2>/dev/null
  for f in summary.txt compare.txt gpu_checks_tp.json pd_greedy.json; do [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT/"; done
  ls -la "$OUT"
}

cmd=${1:-}
case $cmd in
  stash)
    mkdir -p "$STASH"
    for p in .whl scratch/smg-min.tar.xz scratch/mooncake-min.tar.xz scratch/debs scratch/llama8b; do
      [ -e "$p" ] && { rm -rf "${STASH:?}/$(basename "$p")"; cp -r "$p" "$STASH/"; echo "stashed $p"; }
    done
    du -sh "$STASH"/* ;;
  bg)  # detach from a copy of the tree (the tree is re-synced each call); the next calls 'wait'
    shift
    tree=/root/mg_tree; rm -rf "$tree"; mkdir -p "$tree"
    cp -r packages benchmarks "$tree"/ || exit 1
    OUT="$RES/bg_out" setsid nohup bash "$tree/benchmarks/multi_gpu.sh" "$@" >"$RES/bg.log" 2>&1 </dev/null &
    echo $! >"$RES/bg.pid"
    echo "detached: pid $(cat "$RES/bg.pid"), log $RES/bg.log ('multi_gpu.sh wait' collects)" ;;
  wait)
    t0=$SECONDS; pid=$(cat "$RES/bg.pid" 2>/dev/null || echo 0)
    while [ "$pid" -gt 0 ] && kill -0 "$pid" 2>/dev/null && [ $((SECONDS - t0)) -lt "${2:-540}" ]; do sleep 5; done
    if [ "$pid" -gt 0 ] && kill -0 "$pid" 2>/dev/null; then echo "still running after $((SECONDS - t0))s"
    else echo "detached run finished (waited $((SECONDS - t0))s)"; fi
    tail -n 60 "$RES/bg.log" 2>/dev/null
    pack ;;
  pack) pack ;;
  "" | -h | --help) sed -n 2,25p "$0" ;;
  *)
    setup
    [ "$CPU" = 1 ] || nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$RES/gpu.txt"
    for s in "$@"; do run_stage "$s"; done
    pack ;;
esac
