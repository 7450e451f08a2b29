"""Where a retraining's result comes from: the code version and a digest of its parameters.

A retraining whose dataset fingerprint, parameter digest and code version all equal the last
finished one's would train the same models again, so the flow skips it (``RetrainParams.force``).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pneumo

# What decides what a retraining produces; a change elsewhere (docs, deployments) trains nothing new.
CODE_PATHS = ("pneumo", "flows", "pyproject.toml")


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):  # no git here
        return None
    return done.stdout.decode("utf-8", "surrogateescape") if done.returncode == 0 else None


def code_version() -> dict[str, Any]:
    """``{"version", "commit", "dirty"}`` of the running code.

    From a git checkout (the repository that holds this package), ``version`` is the commit, plus
    ``+dirty.<digest>`` when :data:`CODE_PATHS` have uncommitted changes or new files: the digest
    covers their content, so the same edits give the same version and any other edit a new one.
    Elsewhere (an installed wheel, an image without ``.git``) it is the package version.
    """
    root = Path(pneumo.__file__).resolve().parents[1]
    top = _git(root, "rev-parse", "--show-toplevel")
    commit = _git(root, "rev-parse", "HEAD") if top and Path(top.strip()).resolve() == root else None
    if commit is None:
        return {"version": pneumo.__version__, "commit": None, "dirty": False}
    commit = commit.strip()
    changes = (_git(root, "diff", "HEAD", "--", *CODE_PATHS) or "").encode("utf-8", "surrogateescape")
    untracked = (_git(root, "ls-files", "--others", "--exclude-standard", "--", *CODE_PATHS) or "").split()
    if not changes and not untracked:
        return {"version": commit, "commit": commit, "dirty": False}
    digest = hashlib.sha256(changes)
    for name in sorted(untracked):
        digest.update(name.encode("utf-8", "surrogateescape") + b"\0" + (root / name).read_bytes())
    return {"version": f"{commit}+dirty.{digest.hexdigest()[:12]}", "commit": commit, "dirty": True}


def params_digest(params: Any) -> str:
    """SHA-256 of a retraining's parameters as JSON with sorted keys. Left out: ``force`` (whether to
    train, not what training produces) and ``tracking_uri`` (one store has many spellings: relative or
    absolute paths, a proxy's address)."""
    exclude = {"force", "tracking_uri"}
    data = params.model_dump(mode="json", exclude=exclude) if hasattr(params, "model_dump") else {
        key: value for key, value in dict(params).items() if key not in exclude}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
