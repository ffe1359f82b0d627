#!/usr/bin/env bash
# vLLM vs semipd with the same client, on the same model dir (issue 25); README.md beside this gives the calls.
#   bash benchmarks/peers/compare.sh vllm              # client vs the running vLLM (VLLM_URL, :30001), label vllm
#   bash benchmarks/peers/compare.sh semipd [LABEL..]  # starts semipd-server per config, same client; labels
#                                                      # semipd-unified, semipd-semi-pd-green (default: both)
#   bash benchmarks/peers/compare.sh table             # --compare tables of everything in $PEERS_RES -> $OUT
#   bash benchmarks/peers/compare.sh bg semipd [LABEL..]  # device: the same, detached (setsid) from a tree copy
#   bash benchmarks/peers/compare.sh wait [MAX_S]      # device: wait for the detached run, then pack
# Workloads (PEERS_WORKLOADS, default "w3k short dh decode"):
#   w3k    3072 +-50% in, 256 +-50% out (gpu_suite's SWEEP_BENCH), PEERS_RATES_3K, SLO TTFT 2 s / TPOT 25 ms,
#          re-scored at TPOT 15 by 'table'
#   short  256 +-50% in, 256 +-50% out, PEERS_RATES_SHORT          dh  512 +-50% in, 1024 +-50% out, PEERS_RATES_DH
#   decode fixed 512 in / 256 out, --request-rates inf, --max-concurrency each of PEERS_CONCURRENCY (1 16 64)
# Each workload has a time limit (PEERS_LIMIT_<W>_S) so one engine's part stays under ~9 minutes (one call).
# Results accumulate in PEERS_RES (default /root/peers_res: survives back-to-back calls); every call packs them
# into $OUT/peers_results.tar.gz (+ tables), since a call brings back at most 8 files.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 1
OUT=${OUT:-out/peers}
RES=${PEERS_RES:-/root/peers_res}
mkdir -p "$OUT" "$RES"
PY=${PY:-python3}
. benchmarks/device_env.sh  # the carried wheels in /tmp/site (once per machine), multicast off
export PYTHONPATH=$SEMIPD_SRC:${PYTHONPATH:-}
MODEL_DIR=${MODEL_DIR:-scratch/llama8b}
VLLM_URL=${VLLM_URL:-http://127.0.0.1:30001}
SEMIPD_PORT=${SEMIPD_PORT:-30000}
SERVER_ARGS=${PEERS_SERVER_ARGS:-"--load-format dummy --context-length 8192 --max-running-requests 64"}
SEMIPD_CFGS=("semipd-unified=${PEERS_UNIFIED_ARGS:---chunked-prefill-size 2048}"
  "semipd-semi-pd-green=${PEERS_SEMIPD_ARGS:---enable-semi-pd --sm-partition green --decode-sm-percent 40}")
# PEERS_QUICK=1: the trimmed plan for a session whose device start came late (~18 instead of ~25 minutes from the
# first call): 10 s windows, three rates per workload, two for dh, no step profile. Set it for both halves (the bg
# run inherits it); any PEERS_* set explicitly still wins.
if [ "${PEERS_QUICK:-0}" = 1 ]; then
  : "${PEERS_DURATION_S:=10}" "${PEERS_RATES_3K:=4 6 8}" "${PEERS_RATES_SHORT:=10 16 22}" "${PEERS_RATES_DH:=2 3}"
  : "${PEERS_PROFILE:=0}"
fi
D=${PEERS_DURATION_S:-15}
COMMON="--range-ratio 0.5 --num-prompts 1000 --duration-s $D --slo-ttft-ms 2000 --slo-tpot-ms 25 \
--request-timeout-s ${PEERS_REQUEST_TIMEOUT_S:-60} --no-progress"
W3K="--dataset uniform --input-len ${PEERS_3K_IN:-3072} --output-len ${PEERS_3K_OUT:-256} \
--request-rates ${PEERS_RATES_3K:-4 6 8 10} $COMMON"
WSHORT="--dataset uniform --input-len ${PEERS_SHORT_IN:-256} --output-len ${PEERS_SHORT_OUT:-256} \
--request-rates ${PEERS_RATES_SHORT:-10 14 18 24} $COMMON"
WDH="--dataset uniform --input-len ${PEERS_DH_IN:-512} --output-len ${PEERS_DH_OUT:-1024} \
--request-rates ${PEERS_RATES_DH:-2 3 4} $COMMON"
WORKLOADS=${PEERS_WORKLOADS:-"w3k short dh decode"}

healthy() { python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/health", timeout=5)' \
  "$1" >/dev/null 2>&1; }

step() {  # step NAME LIMIT_S CMD...: log to $RES/NAME.log, print its tail
  local name=$1 limit=$2; shift 2
  echo "--- $name ($(date +%T), limit ${limit}s)"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$RES/$name.log" 2>&1
  local rc=$?
  echo "--- $name rc=$rc in $((SECONDS - t0))s"
  grep -aE "^(== .* @ |SLO|TTFT|TPOT|E2E)|error" "$RES/$name.log" | tail -n "${PEERS_TAIL_N:-12}"
  return $rc
}

client() {  # client URL LABEL: every workload against one server
  local url=$1 label=$2 w c n
  # shellcheck disable=SC2086  # workload strings are flag lists
  for w in $WORKLOADS; do
    case $w in
      w3k) step "$label.w3k" "${PEERS_LIMIT_W3K_S:-170}" $PY benchmarks/bench_serving.py --base-url "$url" \
             --label "$label" --out "$RES/w3k.json" $W3K ;;
      short) step "$label.short" "${PEERS_LIMIT_SHORT_S:-140}" $PY benchmarks/bench_serving.py --base-url "$url" \
             --label "$label" --out "$RES/short.json" $WSHORT ;;
      dh) step "$label.dh" "${PEERS_LIMIT_DH_S:-130}" $PY benchmarks/bench_serving.py --base-url "$url" \
             --label "$label" --out "$RES/dh.json" $WDH ;;
      decode)
        for c in ${PEERS_CONCURRENCY:-1 16 64}; do
          n=$((c * ${PEERS_DECODE_WAVES:-2})); [ "$n" -ge 8 ] || n=8
          step "$label.decode_c$c" "${PEERS_LIMIT_DECODE_S:-60}" $PY benchmarks/bench_serving.py --base-url "$url" \
            --label "$label" --out "$RES/decode_c$c.json" --dataset fixed --input-len "${PEERS_DEC_IN:-512}" \
            --output-len "${PEERS_DEC_OUT:-256}" --num-prompts "$n" --request-rates inf --max-concurrency "$c" \
            --request-timeout-s 120 --slo-ttft-ms 2000 --slo-tpot-ms 25 --no-progress
        done ;;
      *) echo "unknown workload $w" ;;
    esac
  done
}

pack() {  # everything in $RES -> $OUT (at most 8 files come back from a call)
  tar -czf "$OUT/peers_results.tar.gz" -C "$RES" . && ls -la "$OUT/peers_results.tar.gz"
}

table() {  # one --compare per workload (the 3k one at TPOT 25 and 15) + decode TPOT p50 + prompt-token parity
  local f
  {
    for f in "$RES"/w3k.json "$RES"/short.json "$RES"/dh.json "$RES"/decode_c*.json; do
      [ -f "$f" ] || continue
      echo "=== $(basename "$f") (TTFT 2000 ms, TPOT 25 ms)"
      $PY benchmarks/bench_serving.py --compare "$f" --slo-ttft-ms 2000 --slo-tpot-ms 25 \
        ${PEERS_PLOTS:+--plot-dir "$RES/plots_$(basename "${f%.json}")"}
      if [ "$(basename "$f")" = w3k.json ]; then
        echo "=== w3k.json re-scored at TPOT 15 ms"
        $PY benchmarks/bench_serving.py --compare "$f" --slo-ttft-ms 2000 --slo-tpot-ms 15
      fi
    done
    $PY - "$RES" <<'EOF'
import glob, json, os, sys
res = sys.argv[1]
def runs(path):
    return json.load(open(path))["runs"] if os.path.exists(path) else []
print("=== decode speed: fixed 512 in / 256 out, --request-rates inf; TPOT ms p50 (p90), output tok/s")
rows = {}
for path in sorted(glob.glob(os.path.join(res, "decode_c*.json")), key=lambda p: int(p.rsplit("_c", 1)[1][:-5])):
    c = int(path.rsplit("_c", 1)[1][:-5])
    for run in runs(path):
        s = run["rates"][0]["summary"]
        t = s["tpot_ms"]
        cell = "-" if t["p50"] is None else f"{t['p50']:.2f} ({t['p90']:.2f}), {s['output_throughput']:.0f}"
        rows.setdefault(run["label"], {})[c] = cell
cs = sorted({c for r in rows.values() for c in r})
print("| engine | " + " | ".join(f"c={c}" for c in cs) + " |")
print("|---|" + "---|" * len(cs))
for label, r in rows.items():
    print(f"| {label} | " + " | ".join(r.get(c, "-") for c in cs) + " |")
print("=== token-count parity: mean prompt / output tokens per request (server usage), first rate of each run")
for name in ("w3k", "short", "dh", "decode_c1"):
    for run in runs(os.path.join(res, f"{name}.json")):
        s = run["rates"][0]["summary"]
        n = max(s["completed"], 1)
        print(f"{name:10s} {run['label']:24s} prompt {s['total_input_tokens'] / n:8.1f} "
              f"output {s['total_output_tokens'] / n:7.1f} ({s['completed']} done, {s['failed']} failed)")
EOF
    for f in "$RES"/semipd.decode_step.log "$RES"/semipd.step_profile.log; do
      [ -f "$f" ] && { echo "=== $(basename "$f")"; tail -n 80 "$f"; }
    done
  } 2>&1 | tee "$RES/compare_table.txt"
  cp "$RES/compare_table.txt" "$OUT/"
}

start_semipd() {  # start_semipd LABEL FLAGS...: setsid (own process group, so stop ends all of it), wait for health
  local label=$1; shift
  local url="http://127.0.0.1:$SEMIPD_PORT" t0=$SECONDS
  # shellcheck disable=SC2086  # SERVER_ARGS is a flag list
  setsid $PY -m semipd_server.cli --host 127.0.0.1 --port "$SEMIPD_PORT" --model-path "$MODEL_DIR" $SERVER_ARGS \
    "$@" >"$RES/$label.server.log" 2>&1 </dev/null &
  SEMIPD_PID=$!
  echo "semipd $label: pid $SEMIPD_PID, $*"
  until healthy "$url"; do
    if ! kill -0 "$SEMIPD_PID" 2>/dev/null || [ $((SECONDS - t0)) -ge "${PEERS_STARTUP_S:-240}" ]; then
      echo "semipd $label did not start; log tail:"; tail -n 40 "$RES/$label.server.log"; stop_semipd; return 1
    fi
    sleep 2
  done
  echo "semipd $label healthy after $((SECONDS - t0))s"
}

stop_semipd() {
  [ -n "${SEMIPD_PID:-}" ] || return 0
  kill -TERM -- "-$SEMIPD_PID" 2>/dev/null || kill -TERM "$SEMIPD_PID" 2>/dev/null
  for _ in $(seq 30); do kill -0 "$SEMIPD_PID" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$SEMIPD_PID" 2>/dev/null
  SEMIPD_PID=
}

cmd=${1:-}; shift || true
case $cmd in
  vllm)
    healthy "$VLLM_URL" || { echo "no server at $VLLM_URL: 'vllm.sh start' first" >&2; exit 1; }
    t0=$SECONDS
    client "$VLLM_URL" vllm
    [ -f /root/vllm.log ] && cp /root/vllm.log "$RES/vllm.server.log"
    [ -f /root/vllm_config.txt ] && cp /root/vllm_config.txt "$RES/"
    echo "vllm part: $((SECONDS - t0))s"
    pack ;;
  semipd)
    if [ -f /root/vllm.pid ] && kill -0 "$(cat /root/vllm.pid)" 2>/dev/null && [ -z "${PEERS_FORCE:-}" ]; then
      echo "vLLM is running (it holds most of the GPU memory): 'vllm.sh stop' first, or PEERS_FORCE=1" >&2; exit 1
    fi
    trap stop_semipd EXIT
    labels=("$@"); [ ${#labels[@]} -gt 0 ] || labels=(semipd-unified semipd-semi-pd-green)
    for want in "${labels[@]}"; do
      found=
      for cfg in "${SEMIPD_CFGS[@]}"; do
        [ "${cfg%%=*}" = "$want" ] || continue
        found=1; t0=$SECONDS
        # shellcheck disable=SC2086  # config flags are a list
        start_semipd "$want" ${cfg#*=} && client "http://127.0.0.1:$SEMIPD_PORT" "$want"
        stop_semipd
        echo "$want part: $((SECONDS - t0))s"
      done
      [ -n "$found" ] || echo "unknown config $want (have: ${SEMIPD_CFGS[*]%%=*})"
    done
    # where semipd's decode time goes, at the decode workload's mean context (512 in + ~128 out): the
    # CUDA-graph step (bench_decode_step) and its kernels (bench_step_profile, eager) beside vLLM's TPOT
    if [ "${PEERS_PROFILE:-1}" != 0 ]; then
      step semipd.decode_step 150 $PY benchmarks/bench_decode_step.py --shape llama-3.1-8b --batches 1 16 64 \
        --contexts 640 --green-percent 40 --out "$RES/decode_step.json"
      step semipd.step_profile 180 $PY benchmarks/bench_step_profile.py --shape llama-3.1-8b --cases \
        decode:1@640 decode:16@640 decode:64@640 --green-percent --iters 10 --top 10 --out "$RES/step_profile.json"
    fi
    pack ;;
  table)
    table; pack ;;
  bg)  # device: detach (setsid) from a copy of the tree, so the next calls (shipping vLLM pieces) can run
    tree=/root/peers_tree; rm -rf "$tree"; mkdir -p "$tree/scratch"
    cp -r packages benchmarks "$tree"/ && cp -r "$MODEL_DIR" "$tree/scratch/model" || exit 1
    # shellcheck disable=SC2094
    OUT="$RES/bg_out" MODEL_DIR=scratch/model setsid nohup bash "$tree/benchmarks/peers/compare.sh" "$@" \
      >"$RES/bg.log" 2>&1 </dev/null &
    echo $! >/root/peers_bg.pid
    echo "detached: pid $(cat /root/peers_bg.pid), log $RES/bg.log ('compare.sh wait' collects)" ;;
  wait)  # wait [MAX_S]: until the detached run ends (or MAX_S, default 540), then pack what there is
    t0=$SECONDS; pid=$(cat /root/peers_bg.pid 2>/dev/null || echo 0)
    while [ "$pid" -gt 0 ] && kill -0 "$pid" 2>/dev/null && [ $((SECONDS - t0)) -lt "${1:-540}" ]; do sleep 5; done
    if [ "$pid" -gt 0 ] && kill -0 "$pid" 2>/dev/null; then echo "still running after $((SECONDS - t0))s"
    else echo "detached run finished (waited $((SECONDS - t0))s)"; fi
    tail -n 60 "$RES/bg.log" 2>/dev/null
    pack ;;
  *) sed -n 2,16p "$0"; [ -z "$cmd" ] || [ "$cmd" = -h ] || [ "$cmd" = --help ] || exit 2 ;;
esac
