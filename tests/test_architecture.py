"""Structural rules: the library never imports Prefect; importing it has no side effects."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pneumo"


def test_library_source_never_imports_prefect() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] == "prefect"]
    assert offenders == []


def _module_name(path: Path) -> str:
    """Dotted name of a module under pneumo/ (subpackages included: pneumo/storage/s3.py -> pneumo.storage.s3)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_roots(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at module level or inside functions."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_only_storage_s3_imports_boto() -> None:
    # DESIGN.md: one place talks to boto3; everything else goes through pneumo.storage.s3's helpers.
    boto = {"boto3", "botocore"}
    s3_module = PACKAGE / "storage" / "s3.py"
    assert boto <= _imported_roots(s3_module)  # the rule below would pass vacuously if s3.py moved
    offenders = sorted(_module_name(path) for path in PACKAGE.rglob("*.py")
                       if path != s3_module and _imported_roots(path) & boto)
    assert offenders == []


def test_importing_every_module_loads_no_prefect_and_writes_nothing(tmp_path: Path) -> None:
    workdir, home = tmp_path / "work", tmp_path / "home"  # Keras/matplotlib make dot-dirs in HOME
    workdir.mkdir()
    home.mkdir()
    modules = sorted(_module_name(p) for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True,
                            env={"PATH": "", "HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert [p.name for p in workdir.iterdir()] == []  # no folders, databases or caches at import


def test_cli_start_up_does_not_import_tensorflow() -> None:
    code = "import sys, pneumo.cli; print('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False"
