"""Stands in for the server in test_runtime_process_cleanup: starts a semi-PD ProcessCoreClient (prefill worker
in its own process) on the model at argv[1], prints the core's pid, then waits to be killed."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from runtime_fixtures import core_config

from semipd_runtime.core_client import ProcessCoreClient


def main() -> None:
    cfg = core_config(Path(sys.argv[1]), max_model_len=128, num_pages=64, mode="semi-pd",
                      prefill_placement="process", chunked_prefill_size=16, max_prefill_tokens=32)
    client = ProcessCoreClient(cfg, on_output=lambda msg: None, startup_timeout_s=300)
    print(client.proc.pid, flush=True)
    sys.stdin.read()  # until the test kills us (or closes our stdin)
    client.close()


if __name__ == "__main__":
    main()
