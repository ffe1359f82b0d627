#!/usr/bin/env bash
# One device-tool call: install the carried wheels (.whl: benchmarks/fetch_device_wheels.sh), start MPS, run the named GPU stages, logs + JSON into $OUT.
#   bash benchmarks/gpu_suite.sh checks ipc offline interference decode_step step_profile sweep8b_unified compare prefix_cache
#   (also: sampling_overhead grammar_overhead pd_transfer soak slo_phased slo_light decode_breakdown prefill_cublas carveout skinny_gemm decode_skinny)
# Each stage has its own time limit so one hang cannot eat the whole call; a failed stage does not stop the rest.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
. "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
export PYTHONPATH=$SEMIPD_SRC:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

start_mps() { nvidia-cuda-mps-control -d 2>/dev/null && echo "MPS daemon started"; }
stop_mps() { echo quit | nvidia-cuda-mps-control 2>/dev/null; sleep 1; }
# Mooncake (PD stages): the non-CUDA build's transfer engine, trimmed to fit a carry (scratch/mooncake-min.tar.xz:
# mooncake/*.py, engine.so and its libraries from the wheel), and the Debian libraries it links (scratch/debs);
# both built here by benchmarks/pack_pd_libs.sh
pd_setup() {
  [ -f scratch/mooncake-min.tar.xz ] && mkdir -p /tmp/site && tar -xJf scratch/mooncake-min.tar.xz -C /tmp/site \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
  if [ -d scratch/debs ]; then  # only the libraries this image lacks (Debian 12 packages, with their dependencies)
    mkdir -p /tmp/pdall /tmp/pdlibs
    for f in scratch/debs/*.deb; do dpkg -x "$f" /tmp/pdall; done
    for so in $(find /tmp/pdall -name "*.so.*" \( -type f -o -type l \)); do
      ldconfig -p | grep -q "$(basename "$so") " || cp -a "$so" /tmp/pdlibs/
    done
    echo "carried libraries used: $(ls /tmp/pdlibs | tr '\n' ' ')"
    export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/tmp/pdlibs
  fi
  python3 -c "import mooncake.engine; print('mooncake', mooncake.engine.__file__)"
}

stage() {  # stage NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s"
  tail -n 25 "$OUT/$name.log"
}

# goodput sweep: one long-prompt workload, rates swept, several server configs appended to one results file
# 30 s of arrivals per rate (not a fixed count): the slo policy needs several decision windows at one rate
# SLO_TTFT_MS / SLO_TPOT_MS set both what the bench scores and what the SLO policy aims at
SLO_FLAGS="--slo-ttft-ms ${SLO_TTFT_MS:-2000} --slo-tpot-ms ${SLO_TPOT_MS:-25}"
# SWEEP_INPUT_LEN / SWEEP_OUTPUT_LEN shape the workload (e.g. 256 in for short prompts, where semi-PD should lose);
# SWEEP_DURATION_S is the arrival window per rate (20 s: ~160 requests at 8 req/s, noisy near the knee)
SWEEP_RATES=${SWEEP_RATES:-"4 6 8 10 12"}
SWEEP_BENCH=${SWEEP_BENCH:-"--dataset uniform --input-len ${SWEEP_INPUT_LEN:-3072} --output-len ${SWEEP_OUTPUT_LEN:-256} \
  --range-ratio 0.5 --num-prompts 1000 --duration-s ${SWEEP_DURATION_S:-20} --request-rates $SWEEP_RATES $SLO_FLAGS \
  --request-timeout-s 60"}
UNIFIED_CFGS=(unified-512="--chunked-prefill-size 512" unified-2048="--chunked-prefill-size 2048")
SEMIPD_CFGS=(semi-pd-green-static="--enable-semi-pd --sm-partition green --decode-sm-percent 40"
  semi-pd-green-slo${SLO_LABEL:-}="--enable-semi-pd --sm-partition green --decode-sm-percent 40 --partition-policy slo $SLO_FLAGS")
# the SLO policy starts from the static split (decode 40%) and moves from there
# one call per shape: the strongest unified chunk size (2048 beat 512 on the H200) against both semi-PD policies
MAIN_CFGS=("${SEMIPD_CFGS[1]}" "${SEMIPD_CFGS[0]}" "${UNIFIED_CFGS[1]}")  # slo first: a cut-off call keeps it
sweep() {  # sweep SHAPE LIMIT_S LABEL=FLAGS...: model dir scratch/<shape> made by model_shapes.py (SWEEP_BENCH above)
  local shape=$1 limit=$2; shift 2
  local cfgs=()
  for c in "$@"; do cfgs+=(--config "$c"); done
  stage "sweep_${shape}_${1%%=*}" "$limit" python3 benchmarks/serving_sweep.py --model-path "scratch/$shape" \
    --server-args "--load-format dummy --context-length 8192 --max-running-requests 64" "${cfgs[@]}" \
    --bench-args "$SWEEP_BENCH" --startup-timeout-s 180 --out "$OUT/sweep_$shape.json"
}

# issue 21: the SLO policy where the load changes. slo_phased runs long prompts (prefill-bound), then short prompts
# with long outputs (decode-bound), twice, against the static oracle (the best of static splits at ORACLE_SHARES);
# 3 configs x (100 s of arrivals + ~60 s start + drain) fits one 10-minute call. PHASE_SCALES > 1 value: a sweep
# (one run per scale, longer). slo_light: the two lowest rates of the long-prompt workload, slo vs unified-2048,
# for TTFT p50 at light load. Both on scratch/llama8b (model_shapes.py, as the sweeps).
PHASES=${SLO_PHASES:-"long:25:6.5:3072:256,short:25:4:1024:1024"}
PHASED_BENCH="--phases $PHASES --phase-repeats 2 --range-ratio 0.5 --request-rates ${PHASE_SCALES:-1} \
  --slo-ttft-ms 2000 --slo-tpot-ms ${SLO_TPOT_MS:-15} --request-timeout-s 60"
SLO_CFG="semi-pd-green-slo=--enable-semi-pd --sm-partition green --decode-sm-percent 40 --partition-policy slo \
  --slo-ttft-ms 2000 --slo-tpot-ms ${SLO_TPOT_MS:-15}"
SERVER_8B="--load-format dummy --context-length 8192 --max-running-requests 64"

for s in "$@"; do
  case $s in
    checks_green)  # no MPS: parity, graphs, overlap, semi-PD on green contexts
      stage checks_green 150 python3 benchmarks/gpu_checks.py --layers 4 --partitions green --out "$OUT/gpu_checks.json" ;;
    checks)
      start_mps
      stage checks 240 python3 benchmarks/gpu_checks.py --layers 4 --out "$OUT/gpu_checks.json"
      stop_mps ;;
    ipc)
      stage ipc 150 python3 benchmarks/bench_ipc.py --out "$OUT/bench_ipc.json" ;;
    offline)
      stage offline 300 python3 benchmarks/bench_offline.py --shape llama-3.1-8b --batches 1 16 64 \
        --prompt-len 512 --output-len 128 --out "$OUT/bench_offline.json" ;;
    decode_step)
      stage decode_step 300 python3 benchmarks/bench_decode_step.py --shape llama-3.1-8b --batches 1 16 64 128 \
        --contexts 1024 4096 --green-percent 50 --out "$OUT/decode_step.json" ;;
    decode_breakdown)  # issue 22: kernel groups inside the decode graph, bandwidth vs SM count
      stage decode_breakdown 300 python3 benchmarks/bench_decode_breakdown.py --shape llama-3.1-8b --batches 1 64 \
        --ctx 2048 --green-percent 50 --out "$OUT/decode_breakdown.json" ;;
    skinny_gemm)  # issue 22: the GEMV-shaped Triton kernel beside cuBLAS per weight shape at decode rows 1-16
      stage skinny_gemm 150 python3 benchmarks/bench_decode_breakdown.py --only-gemms --gemm-rows 1 4 16 \
        --green-percent 0 --out "$OUT/skinny_gemm.json" ;;
    decode_skinny)  # issue 22: the decode step at B=1/16 with cuBLAS, then with SEMIPD_SKINNY_GEMM=1 (per-shape pick)
      stage decode_cublas 240 python3 benchmarks/bench_decode_breakdown.py --shape llama-3.1-8b --batches 1 16 \
        --ctx 2048 --green-percent 50 --gemm-rows 1 16 --sm-sweep --out "$OUT/decode_cublas.json"
      SEMIPD_SKINNY_GEMM=1 stage decode_skinny 240 python3 benchmarks/bench_decode_breakdown.py --shape llama-3.1-8b \
        --batches 1 16 --ctx 2048 --green-percent 50 --gemm-rows 1 16 --sm-sweep --out "$OUT/decode_skinny.json" ;;
    carveout)  # issue 22: decode GEMMs inside a partition with cuBLASLt told the partition's SM count
      stage carveout 150 python3 benchmarks/bench_decode_breakdown.py --only-sweep --carveout --green-percent 0 \
        --sm-sweep 56 72 88 104 120 --sweep-batches 64 --out "$OUT/carveout.json" ;;
    prefill_cublas)  # issue 22: the whole 8B forward at 4k / 8k tokens against cuBLAS on its GEMM shapes
      stage prefill_cublas 240 python3 benchmarks/bench_step_profile.py --shape llama-3.1-8b --cases prefill:4096@0 \
        prefill:8192@0 --green-percent --out "$OUT/prefill_cublas.json" ;;
    grammar_overhead)  # json-schema masks on every row of the decode step at batch 64 (issue 24: < 5%)
      stage grammar_overhead 240 python3 benchmarks/bench_grammar_overhead.py --shape llama-3.1-8b --batch 64 \
        --ctx 1024 --tokenizer-dir scratch/llama8b --out "$OUT/grammar_overhead.json" ;;
    sampling_overhead)  # penalties / logit_bias / min_tokens on the decode step at batch 64 (issue 24: < 5%)
      stage sampling_overhead 240 python3 benchmarks/bench_sampling_overhead.py --shape llama-3.1-8b --batches 64 \
        --contexts 1024 --out "$OUT/sampling_overhead.json" ;;
    interference)
      start_mps
      stage interference 330 python3 benchmarks/bench_interference.py --shape llama-3.1-8b \
        --configs unified green:50 green:30 mps:50 --decode-steps 150 --child-timeout-s 120 \
        --out "$OUT/interference.json"
      stop_mps ;;
    interference_long)
      start_mps
      stage interference_long 185 python3 benchmarks/bench_interference.py --shape llama-3.1-8b \
        --configs green:50 mps:50 green:30 unified --decode-steps 500 --child-timeout-s 60 \
        --out "$OUT/interference_long.json"
      stop_mps ;;
    repartition)
      stage repartition_green 50 python3 benchmarks/bench_repartition.py --backend green --out "$OUT/repartition_green.json"
      start_mps
      stage repartition_mps 110 python3 benchmarks/bench_repartition.py --backend mps --splits 70 30 60 \
        --out "$OUT/repartition_mps.json"
      stop_mps ;;
    sweep8b)  # all four in one call only with a short SWEEP_BENCH; else the two stages below, one call each
      sweep llama8b 580 "${UNIFIED_CFGS[@]}" "${SEMIPD_CFGS[@]}" ;;
    sweep8b_main | sweep3b_main)
      sweep "llama${s:5:2}" 580 "${MAIN_CFGS[@]}" ;;
    sweep8b_slo | sweep3b_slo)  # the SLO policy alone (SLO_LABEL tells runs apart; merge files via --compare)
      sweep "llama${s:5:2}" "${SWEEP_LIMIT_S:-300}" "${SEMIPD_CFGS[1]}" ;;
    sweep8b_static | sweep3b_static)
      sweep "llama${s:5:2}" "${SWEEP_LIMIT_S:-300}" "${SEMIPD_CFGS[0]}" ;;
    sweep8b_unified2048 | sweep3b_unified2048)
      sweep "llama${s:5:2}" "${SWEEP_LIMIT_S:-300}" "${UNIFIED_CFGS[1]}" ;;
    sweep8b_unified | sweep3b_unified)
      sweep "llama${s:5:2}" 580 "${UNIFIED_CFGS[@]}" ;;
    sweep8b_semipd | sweep3b_semipd)
      sweep "llama${s:5:2}" 580 "${SEMIPD_CFGS[@]}" ;;
    sweep8b_mps)
      start_mps
      sweep llama8b 200 semi-pd-mps-static="--enable-semi-pd --sm-partition mps --decode-sm-percent 40"
      stop_mps ;;
    pd_transfer)  # PD instances on this GPU: KV transfer GB/s and the TTFT the hand-off adds (8B shape)
      pd_setup
      stage pd_transfer "${PD_LIMIT_S:-300}" python3 benchmarks/bench_pd_transfer.py --model-path scratch/llama8b \
        --server-args "--load-format dummy --num-pages 2048 --max-running-requests 16" \
        --prompt-lens 1024 4096 8192 --out "$OUT/pd_transfer.json" ;;
    soak)  # semi-PD on MPS (the prefill worker is a process: killed every SOAK_KILL_S); 30 min: SOAK_S=1800
      start_mps
      stage soak "$(( ${SOAK_S:-1800} + 240 ))" python3 benchmarks/soak.py --model-path scratch/llama8b \
        --server-args "--load-format dummy --enable-semi-pd --sm-partition mps --decode-sm-percent 40 \
        --context-length 4096 --max-running-requests 64" --duration-s "${SOAK_S:-1800}" \
        --kill-every-s "${SOAK_KILL_S:-300}" --concurrency 32 --out "$OUT/soak.json"
      stop_mps ;;
    slo_phased)
      # shellcheck disable=SC2086  # ORACLE_SHARES is a list of numbers
      stage slo_phased 540 python3 benchmarks/serving_sweep.py --model-path scratch/llama8b --server-args "$SERVER_8B" \
        --config "$SLO_CFG" --static-oracle ${ORACLE_SHARES:-40 50} --oracle-slos "2000:${SLO_TPOT_MS:-15}" 2000:25 \
        --bench-args "$PHASED_BENCH" --startup-timeout-s 180 --out "$OUT/slo_phased.json" \
        --plot-dir "$OUT/slo_phased_plots" ;;
    slo_light)
      stage slo_light 420 python3 benchmarks/serving_sweep.py --model-path scratch/llama8b --server-args "$SERVER_8B" \
        --config "$SLO_CFG" --config "${UNIFIED_CFGS[1]}" --startup-timeout-s 180 --out "$OUT/slo_light.json" \
        --bench-args "--dataset uniform --input-len 3072 --output-len 256 --range-ratio 0.5 --num-prompts 1000 \
          --duration-s 40 --request-rates ${LIGHT_RATES:-1 2} --slo-ttft-ms 2000 --slo-tpot-ms ${SLO_TPOT_MS:-15}" ;;
    compare)
      for f in "$OUT"/sweep_*.json; do python3 benchmarks/bench_serving.py --compare "$f" --plot-dir "${f%.json}_plots"; done ;;
    *) echo "unknown stage $s" ;;
  esac
done
