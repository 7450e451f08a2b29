"""Checksums of a registered model's files: recorded at registration, verified before every load.

The served model is code and config in the artifact store (``served_model.py``, ``MLmodel``, the
vendored ``code/pneumo``): anyone who can write there could change what ``@champion`` does. So
the SHA-256 of every file is recorded when a version is registered, in a manifest artifact whose
own digest is a version tag (the tag lives in the tracking database, outside the artifact store),
and pneumo verifies the downloaded files before loading them (the gate, rollback, ``pneumo serve``,
:func:`load_registered` for apps).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from pneumo.errors import ServingError
from pneumo.mlflow_client import MISSING, mlflow_client, unless

log = logging.getLogger(__name__)

CHECKSUMS_TAG = "pneumo.checksums.sha256"  # digest of the manifest (canonical JSON)
CHECKSUMS_RUN_TAG = "pneumo.checksums.run_id"  # the run holding the manifest artifact
CHECKSUMS_FOLDER = "checksums"  # manifests are content-addressed: checksums/<digest>.json
_BLOCK = 1 << 20
# Written by MLflow's client into every ``models:/`` download (the name and version asked for), never
# stored: it differs between downloads of the same files, so it is not part of a model's content.
_DOWNLOAD_METADATA = frozenset({"registered_model_meta"})

Digests = dict[str, str]  # relative POSIX path → SHA-256 hex


class IntegrityError(ServingError):
    """A model's files do not match the checksums recorded at registration (names each file)."""


def file_digests(folder: Path) -> Digests:
    """SHA-256 of every file under ``folder``, by relative POSIX path (sorted)."""
    digests = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        if path.relative_to(folder).as_posix() in _DOWNLOAD_METADATA:
            continue
        digest = hashlib.sha256()
        with path.open("rb") as stream:
            while block := stream.read(_BLOCK):
                digest.update(block)
        digests[path.relative_to(folder).as_posix()] = digest.hexdigest()
    return digests


def manifest_bytes(digests: Digests) -> bytes:
    """The canonical manifest: one JSON object, sorted keys, no spaces (its digest is the tag)."""
    return json.dumps({"sha256": dict(sorted(digests.items()))}, sort_keys=True, separators=(",", ":")).encode()


def manifest_digest(digests: Digests) -> str:
    return hashlib.sha256(manifest_bytes(digests)).hexdigest()


def differences(expected: Digests, actual: Digests) -> list[str]:
    """``changed: f``, ``missing: f``, ``added: f`` for every file that differs (empty when all match)."""
    return ([f"changed: {name}" for name in sorted(expected.keys() & actual.keys()) if expected[name] != actual[name]]
            + [f"missing: {name}" for name in sorted(expected.keys() - actual.keys())]
            + [f"added: {name}" for name in sorted(actual.keys() - expected.keys())])


def verify(folder: Path, expected: Digests, what: str) -> Digests:
    """The digests of ``folder``, after checking them against ``expected``.

    Raises:
        IntegrityError: naming each changed, missing or added file.
    """
    actual = file_digests(folder)
    if problems := differences(expected, actual):
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise IntegrityError(f"{what}: its files do not match the checksums recorded at registration ({shown})")
    return actual


def record_checksums(client: Any, run_id: str, digests: Digests) -> dict[str, str]:
    """Log the manifest to ``run_id`` (content-addressed, so re-registering never rewrites one) and
    return the version tags that anchor it."""
    digest = manifest_digest(digests)
    with tempfile.TemporaryDirectory(prefix="pneumo-checksums-") as tmp:
        path = Path(tmp) / f"{digest}.json"
        path.write_bytes(manifest_bytes(digests))
        client.log_artifact(run_id, str(path), CHECKSUMS_FOLDER)
    return {CHECKSUMS_TAG: digest, CHECKSUMS_RUN_TAG: run_id}


def recorded_checksums(client: Any, version: Any) -> Digests | None:
    """The checksums recorded for a registered version (an MLflow ``ModelVersion``); None when it was
    registered before checksums were recorded.

    Raises:
        IntegrityError: the manifest is missing or does not match its digest tag.
    """
    tags = dict(version.tags or {})
    digest, run_id = tags.get(CHECKSUMS_TAG), tags.get(CHECKSUMS_RUN_TAG)
    what = f"{version.name} version {version.version}"
    if not digest or not run_id:
        return None
    with tempfile.TemporaryDirectory(prefix="pneumo-checksums-") as tmp:
        try:
            path = Path(client.download_artifacts(run_id, f"{CHECKSUMS_FOLDER}/{digest}.json", tmp))
        except Exception as error:  # noqa: BLE001 - the reason is given; a missing manifest verifies nothing
            raise IntegrityError(f"{what}: its checksum manifest {CHECKSUMS_FOLDER}/{digest}.json of run {run_id} "
                                 f"cannot be read ({type(error).__name__})") from None
        data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise IntegrityError(f"{what}: its checksum manifest was changed (its SHA-256 is not the {CHECKSUMS_TAG} tag)")
    return dict(json.loads(data)["sha256"])


def download_verified(model_name: str, version: str, dst: Path, *, tracking_uri: str | None = None) -> Path:
    """Download a registered version into ``dst`` and verify it; returns the local model folder.

    A version registered before checksums were recorded is downloaded with a warning.

    Raises:
        IntegrityError: a file changed, went missing or was added (or the manifest was changed).
    """
    import mlflow.artifacts

    client = mlflow_client(tracking_uri)
    version_record = client.get_model_version(model_name, str(version))
    expected = recorded_checksums(client, version_record)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}/{version}", dst_path=str(dst)))
    if expected is None:
        log.warning("%s version %s has no recorded checksums (registered before they were): not verified",
                    model_name, version)
    else:
        verify(local, expected, f"{model_name} version {version}")
    return local


def load_registered(model_name: str, version_or_alias: str, *, tracking_uri: str | None = None) -> Any:
    """``mlflow.pyfunc.load_model`` of a registered version or alias, after verifying its files.

    What downstream apps should call instead of loading ``models:/NAME@champion`` directly: the
    checked files are the ones loaded (no second download between check and load).
    """
    import mlflow.pyfunc

    version = str(version_or_alias)
    if not version.isdigit():
        alias = unless(MISSING, lambda: mlflow_client(tracking_uri).get_model_version_by_alias(model_name, version))
        if alias is None:
            raise ServingError(f"registered model {model_name!r} has no alias {version!r}")
        version = str(alias.version)
    with tempfile.TemporaryDirectory(prefix="pneumo-model-") as tmp:
        return mlflow.pyfunc.load_model(str(download_verified(model_name, version, Path(tmp),
                                                              tracking_uri=tracking_uri)))
