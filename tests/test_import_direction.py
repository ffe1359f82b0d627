"""Packages import one way: kernels <- memory <- runtime <- server. Read from the source (no imports run), so a
new import against the direction fails here, in CI, whatever the runtime paths."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["semipd_kernels", "semipd_memory", "semipd_runtime", "semipd_server"]
SRC = {pkg: ROOT / "packages" / pkg.replace("_", "-") / "src" / pkg for pkg in ORDER}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(ORDER)


@pytest.mark.parametrize("pkg", ORDER)
def test_package_imports_only_lower_layers(pkg: str) -> None:
    allowed = set(ORDER[: ORDER.index(pkg) + 1])
    files = sorted(SRC[pkg].rglob("*.py"))
    assert files, f"no sources under {SRC[pkg]}"
    bad = {str(f.relative_to(ROOT)): sorted(imported_packages(f) - allowed) for f in files}
    bad = {f: names for f, names in bad.items() if names}
    assert not bad, f"{pkg} may import only {sorted(allowed)}; against the direction: {bad}"


def test_checker_sees_a_violation(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("import os\nfrom semipd_server.app import build_app\nimport semipd_memory.kv_pool\n")
    assert imported_packages(f) == {"semipd_server", "semipd_memory"}
