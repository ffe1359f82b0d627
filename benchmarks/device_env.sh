# Sourced by the device scripts (gpu_suite.sh, before_after.sh, peers/compare.sh): the environment every GPU run
# shares. Installs the carried wheels the image lacks (.whl: benchmarks/fetch_device_wheels.sh) into /tmp/site
# once per machine (a marker file), so detached runs and later calls find them, and puts /tmp/site on PYTHONPATH.
# The caller adds its tree's packages (they differ for before_after.sh's two trees).
if [ -d .whl ] && [ ! -f /tmp/site/.semipd_wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.semipd_wheels
fi
if [ -d /tmp/site ]; then
  case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} ;; esac
fi
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton-cache
# the device notes: no NVLink multicast, also for child processes
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
SEMIPD_SRC=packages/semipd-kernels/src:packages/semipd-memory/src:packages/semipd-runtime/src:packages/semipd-server/src:benchmarks
