#!/usr/bin/env bash
# The wheels a device call carries as .whl: the shared script's list (server, IPC, model formats) plus what our
# packages import that the GPU image lacks (llguidance: semipd_runtime.grammar imports it at start-up).
# Run from the project root, with ../shared beside it; gpu_suite.sh and peers/compare.sh install .whl on the device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ../shared/device/fetch-wheels.sh llguidance "$@"
