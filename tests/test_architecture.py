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


def test_importing_every_module_loads_no_prefect_and_writes_nothing(tmp_path: Path) -> None:
    workdir, home = tmp_path / "work", tmp_path / "home"  # Keras/matplotlib make dot-dirs in HOME
    workdir.mkdir()
    home.mkdir()
    modules = sorted(f"pneumo.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__")
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
