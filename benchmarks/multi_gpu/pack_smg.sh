#!/usr/bin/env bash
# Trim the smg gateway (PyPI wheel `smg`, installed in .venv by `uv sync`) to what `smg launch` needs, for a
# device carry: scratch/smg-min.tar.xz (git-ignored, ~20 MiB).
#   bash benchmarks/multi_gpu/pack_smg.sh            # build scratch/smg-min.tar.xz from .venv's smg
#   bash benchmarks/multi_gpu/pack_smg.sh --check    # also unpack it to a temp dir and run `smg launch --help`
#                                                    # with /usr/bin/python3 (not the venv's), PYTHONPATH empty
# What `smg launch` needs (smg 1.13.0): smg/{__init__,version,cli,launch_router,router,router_args}.py and the
# Rust extension smg_rs.abi3.so (cp38-abi3: loads in any CPython >= 3.8, the device's 3.12 too; links only libc,
# libm, libgcc_s, libpthread, libdl, librt). The wheel ships it unstripped (101 MiB, debug info): stripped it is
# 72 MiB, xz 20 MiB. Python dependencies: only setproctitle (launch_router sets the process title); `serve`,
# `rl` and `servicer` (grpcio, yaml) are left out. bin/smg is a launcher that puts the unpacked dir first on
# sys.path and stands in a no-op setproctitle where the interpreter lacks it (the device image may).
# Unpacked on the device: tar -xJf scratch/smg-min.tar.xz -C /tmp/smg  ->  /tmp/smg/bin/smg launch ...
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
SRC=${SMG_SRC:-$(ls -d .venv/lib/python3*/site-packages/smg | head -n 1)}
[ -f "$SRC/smg_rs.abi3.so" ] || { echo "no smg in .venv (uv sync --locked)" >&2; exit 1; }
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
mkdir -p "$W/smg-min/smg" "$W/smg-min/bin"
for f in __init__.py version.py cli.py launch_router.py router.py router_args.py; do cp "$SRC/$f" "$W/smg-min/smg/"; done
strip --strip-unneeded -o "$W/smg-min/smg/smg_rs.abi3.so" "$SRC/smg_rs.abi3.so"
cat >"$W/smg-min/bin/smg" <<'PY'
#!/usr/bin/env python3
"""smg (trimmed: `smg launch` only; benchmarks/multi_gpu/pack_smg.sh)."""
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
try:
    import setproctitle  # noqa: F401
except ImportError:  # only the process title is lost
    shim = types.ModuleType("setproctitle")
    shim.setproctitle = lambda title: None  # type: ignore[attr-defined]
    sys.modules["setproctitle"] = shim
from smg.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
PY
chmod +x "$W/smg-min/bin/smg"
echo "smg $(cat "$SRC/version.py" | tr -d '\n') from $SRC"
mkdir -p scratch
tar -C "$W/smg-min" -cf - . | xz -T2 -6 > scratch/smg-min.tar.xz
ls -la scratch/smg-min.tar.xz
git check-ignore -q scratch/smg-min.tar.xz || echo "WARNING: scratch/ is not git-ignored"
if [ "${1:-}" = --check ]; then
  C=$(mktemp -d); mkdir -p "$C/smg"; tar -xJf scratch/smg-min.tar.xz -C "$C/smg"
  PY=${CHECK_PY:-/usr/bin/python3}
  echo "check with $($PY --version) ($PY), PYTHONPATH unset"
  env -u PYTHONPATH -u VIRTUAL_ENV "$PY" "$C/smg/bin/smg" --version
  env -u PYTHONPATH -u VIRTUAL_ENV "$PY" "$C/smg/bin/smg" launch --help | head -n 5
  rm -rf "$C"
fi
