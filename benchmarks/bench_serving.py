"""Thin wrapper: the serving benchmark lives in the server package (`semipd_server.bench.serving`) and is
installed as the console script `semipd-bench-serving`; this file runs the same main where there is no
console script (a GPU box with packages/*/src on PYTHONPATH, or a plain checkout).

    uv run semipd-bench-serving --base-url http://127.0.0.1:30000 --request-rates 2 4 8
    python benchmarks/bench_serving.py --base-url http://127.0.0.1:30000 --request-rates 2 4 8
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from semipd_server.bench.serving import main
except ModuleNotFoundError as e:  # a plain checkout: use the package source beside us
    if not (e.name or "").startswith("semipd_server"):
        raise
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "semipd-server" / "src"))
    from semipd_server.bench.serving import main

if __name__ == "__main__":
    sys.exit(main())
