"""The code version a retraining records: the commit of a checkout, a digest of its edits, else the package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pneumo.params import RetrainParams
from pneumo.promotion.provenance import params_digest

REPO = Path(__file__).resolve().parents[2]
CODE = "import json; from pneumo.promotion.provenance import code_version; print(json.dumps(code_version()))"


def _version_in(root: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", CODE], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A git repository holding a copy of the package, committed once."""
    if shutil.which("git") is None:
        pytest.skip("no git on this machine")
    root = tmp_path / "checkout"
    shutil.copytree(REPO / "pneumo", root / "pneumo", ignore=shutil.ignore_patterns("__pycache__"))
    (root / ".gitignore").write_text("__pycache__/\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    return root


def test_a_clean_checkout_is_its_commit_and_every_edit_a_new_version(checkout: Path) -> None:
    clean = _version_in(checkout)
    assert clean == {"version": _git(checkout, "rev-parse", "HEAD"), "commit": _git(checkout, "rev-parse", "HEAD"),
                     "dirty": False}

    module = checkout / "pneumo" / "errors.py"
    module.write_text(module.read_text() + "\n# an edit\n")
    edited = _version_in(checkout)
    assert edited["dirty"] and edited["commit"] == clean["commit"]
    assert edited["version"].startswith(clean["commit"] + "+dirty.")
    assert _version_in(checkout) == edited  # the same edits, the same version

    (checkout / "pneumo" / "new_module.py").write_text("X = 1\n")  # an untracked file changes it too
    assert _version_in(checkout)["version"] not in (edited["version"], clean["version"])

    _git(checkout, "add", ".")
    _git(checkout, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "second")
    assert _version_in(checkout) == {"version": _git(checkout, "rev-parse", "HEAD"),
                                     "commit": _git(checkout, "rev-parse", "HEAD"), "dirty": False}


def test_outside_a_checkout_it_is_the_package_version(tmp_path: Path) -> None:
    import pneumo

    shutil.copytree(REPO / "pneumo", tmp_path / "pneumo", ignore=shutil.ignore_patterns("__pycache__"))
    assert _version_in(tmp_path) == {"version": pneumo.__version__, "commit": None, "dirty": False}


def test_the_parameter_digest_ignores_force_and_the_tracking_uri_and_nothing_else() -> None:
    base = RetrainParams(source="data", candidates=["dense"], tracking_uri="sqlite:///.pneumo/mlflow.db")
    assert params_digest(base) == params_digest(base.model_copy(update={"force": True}))
    # The demo writes the same store as an absolute path: found in the same experiment, the same retraining.
    absolute = base.model_copy(update={"tracking_uri": "sqlite:////w/.pneumo/mlflow.db"})
    assert params_digest(base) == params_digest(absolute)
    assert params_digest(base) != params_digest(base.model_copy(update={"registered_model": "other"}))
    assert params_digest(base) != params_digest(RetrainParams(source="data", candidates=["dense"], train={"epochs": 2}))
    assert params_digest(base) != params_digest(RetrainParams(source="other", candidates=["dense"]))
