#!/usr/bin/env bash
# vLLM 0.26.0 beside semipd on the device (issue 25); benchmarks/peers/README.md gives the call sequence.
#   bash benchmarks/peers/vllm.sh build     # HERE: bundle (../shared/device/vllm/build.sh), cut to fit one call
#   bash benchmarks/peers/vllm.sh stash K   # device: .vllm/part_K + install.sh + BUNDLE_SHA256 -> /root/stash
#   bash benchmarks/peers/vllm.sh install   # device: bash /root/stash/install.sh (-> /tmp/vsite)
#   bash benchmarks/peers/vllm.sh start     # device: MODEL_DIR -> /root/stash/llama8b, serve.sh under setsid on
#                                           # :30001, wait for /health (START_TIMEOUT_S), log tail on failure
#   bash benchmarks/peers/vllm.sh stop | status
# Extra vLLM flags: VLLM_ARGS="--max-num-batched-tokens 2048" (appended to serve.sh's own).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 1
STASH=${STASH:-/root/stash}
PORT=${PORT:-30001}
URL="http://127.0.0.1:$PORT"
LOG=${VLLM_LOG:-/root/vllm.log}
PIDFILE=${VLLM_PIDFILE:-/root/vllm.pid}
SHARED_RECIPE=${SHARED_RECIPE:-$ROOT/../shared/device/vllm}
MIB=$((1024 * 1024))

healthy() { python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/health", timeout=5)' \
  "$URL" >/dev/null 2>&1; }
save_log() { if [ -n "${OUT:-}" ] && [ -f "$LOG" ]; then mkdir -p "$OUT" && cp "$LOG" "$OUT/vllm_start.log"; fi; }
running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

cmd=${1:-}; shift || true
case $cmd in
  build)  # needs PyPI; the pieces are cut so that piece + this checkout's tree + scratch/llama8b fit 64 MiB
    [ -f "$SHARED_RECIPE/build.sh" ] || { echo "no $SHARED_RECIPE/build.sh (set SHARED_RECIPE)" >&2; exit 1; }
    tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
    tree=$((tree + $(git ls-files -z --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)))
    model=$(du -sb scratch/llama8b 2>/dev/null | cut -f1); model=${model:-3600000}
    # 2 MiB for stash scripts, new files and slack; PIECE_MIB overrides
    piece=${PIECE_MIB:-$(( (64 * MIB - tree - model - 2 * MIB) / MIB ))}
    echo "tree $((tree / 1024)) KiB + scratch/llama8b $((model / 1024)) KiB -> pieces of $piece MiB"
    [ "$piece" -ge 8 ] || { echo "tree too large for a useful piece size" >&2; exit 1; }
    # build.sh appends to .git/info/exclude, which a git worktree lacks (.git is a file): build in a temp dir
    W=$(mktemp -d); mkdir -p "$W/.git/info"
    (cd "$W" && bash "$SHARED_RECIPE/build.sh") || { rm -rf "$W"; exit 1; }
    cat $(ls "$W"/.vllm/part_* | sort) > "$W/bundle.tar"
    [ "$(sha256sum "$W/bundle.tar" | cut -d' ' -f1)" = "$(cat "$W/.vllm/BUNDLE_SHA256")" ] || { echo "sha" >&2; exit 1; }
    rm -rf .vllm; mkdir -p .vllm
    split -b "${piece}M" -d "$W/bundle.tar" .vllm/part_
    cp "$W/.vllm/BUNDLE_SHA256" "$W/.vllm/install.sh" .vllm/
    rm -rf "$W"
    git check-ignore -q .vllm/part_00 || echo "WARNING: .vllm/ is not git-ignored: it would travel with every call"
    ls -la .vllm; echo "$(ls .vllm/part_* | wc -l) pieces of ${piece} MiB" ;;
  stash)  # stash K: one piece per call, back to back (the machine keeps /root/stash ~30 s after a call)
    [ $# -ge 1 ] || { echo "usage: vllm.sh stash K" >&2; exit 2; }
    k=$(printf %02d "$((10#$1))")
    [ -f ".vllm/part_$k" ] || { echo "no .vllm/part_$k here: carry it" >&2; exit 1; }
    mkdir -p "$STASH"
    cp ".vllm/part_$k" .vllm/install.sh .vllm/BUNDLE_SHA256 "$STASH"/ || exit 1
    # scratch/llama8b, when carried, goes to the stash too (the tree copy there is re-synced each call)
    if [ -f scratch/llama8b/config.json ] && [ ! -f "$STASH/llama8b/config.json" ]; then
      cp -r scratch/llama8b "$STASH/llama8b"
    fi
    ls -la "$STASH"; echo "stash: $(ls "$STASH"/part_* | wc -l) pieces, $(du -sm "$STASH" | cut -f1) MiB" ;;
  install)
    t0=$SECONDS; bash "$STASH/install.sh"; rc=$?
    echo "install rc=$rc in $((SECONDS - t0))s"; exit $rc ;;
  start)
    if running; then
      echo "vLLM already running (pid $(cat "$PIDFILE"))"; healthy && exit 0
      echo "... but not healthy yet: wait, or 'vllm.sh stop' first"; tail -n 20 "$LOG"; exit 1
    fi
    [ -f "$STASH/serve.sh" ] || { echo "no $STASH/serve.sh: run 'vllm.sh install' first" >&2; exit 1; }
    src=${MODEL_DIR:-scratch/llama8b}; dst=$STASH/llama8b
    if [ -f "$src/config.json" ] && [ "$(cd "$src" && pwd)" != "$dst" ]; then rm -rf "$dst"; cp -r "$src" "$dst"; fi
    [ -f "$dst/config.json" ] || { echo "no model dir: carry scratch/llama8b (model_shapes.py)" >&2; exit 1; }
    # transformers needs model_type (older model_shapes.py dirs lack it); semipd ignores the key
    python3 - "$dst/config.json" <<'EOF'
import json, sys
p = sys.argv[1]; c = json.load(open(p))
if "model_type" not in c:
    c["model_type"] = "llama"; json.dump(c, open(p, "w"), indent=2); print("added model_type=llama to", p)
EOF
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
    # setsid: a new session (pgid = this pid), so the server outlives the call and 'stop' can end its group
    # shellcheck disable=SC2086  # VLLM_ARGS is a list of flags
    MODEL_DIR=$dst PORT=$PORT setsid nohup bash "$STASH/serve.sh" ${VLLM_ARGS:-} >"$LOG" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    echo "vLLM pid $(cat "$PIDFILE"), log $LOG, model $dst"
    deadline=$((SECONDS + ${START_TIMEOUT_S:-420})); t0=$SECONDS; last=0
    until healthy; do
      if ! running; then echo "vLLM exited during start-up; log tail:"; tail -n "${TAIL_N:-120}" "$LOG"; save_log; exit 1; fi
      if [ $SECONDS -ge $deadline ]; then
        echo "vLLM not healthy after $((SECONDS - t0))s (still running: 'vllm.sh stop' ends it); log tail:"
        tail -n "${TAIL_N:-120}" "$LOG"; save_log; exit 1
      fi
      if [ $((SECONDS - last)) -ge 30 ]; then last=$SECONDS; echo "  $((SECONDS - t0))s: $(tail -n 1 "$LOG" | cut -c1-160)"; fi
      sleep 3
    done
    echo "vLLM healthy after $((SECONDS - t0))s"
    # the effective configuration, for RESULTS.md (max_num_batched_tokens, cudagraph sizes, backend, compile)
    grep -aiE "non-default args|max_num_batched_tokens|cudagraph|attention backend|compilation|torch.compile|\
graph capturing|KV cache|maximum concurrency|Using .*backend" "$LOG" | cut -c1-600 | head -n 40 \
      | tee /root/vllm_config.txt
    if [ "${SMOKE:-1}" = 1 ]; then python3 "$STASH/smoke_client.py" "$URL" 32; fi
    save_log; if [ -n "${OUT:-}" ]; then cp /root/vllm_config.txt "$OUT/"; fi ;;
  stop)
    if running; then
      pid=$(cat "$PIDFILE"); kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
      for _ in $(seq 30); do running || break; sleep 1; done
      running && { kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"; }
      echo "vLLM (pid $pid) stopped"
    else echo "vLLM not running"; fi
    rm -f "$PIDFILE" ;;
  status)
    if running; then echo "vLLM pid $(cat "$PIDFILE") running"; else echo "vLLM not running (no live pidfile)"; fi
    if healthy; then echo "$URL/health OK"; python3 -c 'import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1] + "/v1/models", timeout=5).read().decode()[:400])' "$URL"
    else echo "$URL/health not answering"; fi
    echo "stash: $(ls "$STASH"/part_* 2>/dev/null | wc -l) pieces"
    [ -f "$LOG" ] && { echo "--- $LOG (last 5 lines)"; tail -n 5 "$LOG"; } ;;
  *) sed -n 2,8p "$0"; [ -z "$cmd" ] || [ "$cmd" = -h ] || [ "$cmd" = --help ] || exit 2 ;;
esac
