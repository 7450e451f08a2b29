"""Structural rules: stages import one way, never Prefect; importing the library has no side effects."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pneumo"
# Stage subpackages, lowest first: each imports only the foundation, itself and the stages before it.
STAGES = ("data", "training", "evaluation", "serving", "promotion")
FOUNDATION = {"pneumo", "pneumo.config", "pneumo.errors", "pneumo.mlflow_client"}  # importable by every stage


def test_library_source_never_imports_prefect() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] == "prefect"]
    assert offenders == []


def _module_name(path: Path) -> str:
    """Dotted name of a module under pneumo/ (subpackages included: pneumo/data/storage/s3.py -> pneumo.data.storage.s3)."""
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
    # DESIGN.md: one place talks to boto3; everything else goes through pneumo.data.storage.s3's helpers.
    boto = {"boto3", "botocore"}
    s3_module = PACKAGE / "data" / "storage" / "s3.py"
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


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every ``pneumo`` import in ``path``, module level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "pneumo"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pneumo":
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def _import_graph() -> dict[str, set[str]]:
    """Module -> the pneumo modules it imports (``from pkg import module`` counts as the module)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for module, names in _imports(path):
            targets |= {f"{module}.{n}" for n in names if f"{module}.{n}" in modules} or {module}
        graph[name] = targets - {name}
    return graph


def _stage(module: str) -> str:
    """The stage subpackage a module belongs to, 'foundation', or 'top' (cli, pipeline, params)."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in STAGES):
        return parts[1]
    return "foundation" if module in FOUNDATION else "top"


def _allowed(importer: str) -> set[str]:
    if importer == "top":
        return {"top", "foundation", *STAGES}
    if importer == "foundation":
        return {"foundation"}
    return {"foundation", *STAGES[:STAGES.index(importer) + 1]}


def test_stages_import_only_the_foundation_and_the_stages_below_them() -> None:
    graph = _import_graph()
    assert "pneumo.evaluation.metrics" in graph["pneumo.promotion.gate"]  # the walk sees imports at all
    offenders = sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                       if _stage(target) not in _allowed(_stage(module)))
    assert offenders == []


def test_no_import_cycle_between_modules_or_between_stages() -> None:
    graph = _import_graph()
    stages = {}
    for module, targets in graph.items():
        stages.setdefault(_stage(module), set()).update(_stage(t) for t in targets if _stage(t) != _stage(module))
    for edges in (graph, stages):
        done: set[str] = set()

        def visit(node: str, path: tuple[str, ...]) -> None:
            assert node not in path, f"import cycle: {' -> '.join(path[path.index(node):] + (node,))}"
            if node not in done:
                for target in sorted(edges.get(node, ())):
                    visit(target, path + (node,))
                done.add(node)

        for node in sorted(edges):
            visit(node, ())


def test_the_package_is_a_few_shared_modules_beside_the_stages() -> None:
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    stages = sorted(path.parent.name for path in PACKAGE.glob("*/__init__.py"))
    assert len(top) <= 7, top
    assert stages == sorted(STAGES)
    for stage in STAGES:
        docstring = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
        assert docstring and "Entry points" in docstring, stage


def test_no_module_imports_another_stages_private_names() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        stage = _stage(_module_name(path))
        for module, names in _imports(path):
            if _stage(module) != stage:
                private = [n for n in names if n.startswith("_")] + [p for p in module.split(".") if p.startswith("_")]
                offenders += [f"{_module_name(path)}: {module}.{n}" for n in private]
    assert offenders == []
