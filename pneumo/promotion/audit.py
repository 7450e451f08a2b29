"""The audit record of a registered version: what it was trained on, with what, how it was judged, and its files.

At registration (:func:`record_registration`) three content-addressed JSON artifacts go to the
candidate run, each anchored by a version tag holding its SHA-256 (the tags live in the tracking
database, outside the artifact store, so rewriting an artifact is detected):

- ``checksums/<sha>.json``: the SHA-256 of every model file (:mod:`pneumo.serving.integrity`);
- ``test_sets/<sha>.json``: the locked test set, one path, class and content hash per image;
- ``audit/<sha>.json``: the bundle: data, code, environment, seeds, parameters, gate, decision, approval.

:func:`verify_version` checks all three and the model files (``pneumo audit``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumo.evaluation.holdout import TestSet, manifest_digest
from pneumo.promotion.gate import TAG_TEST_SET, Decision
from pneumo.promotion.tracking import TAG_CODE_DIRTY, TAG_CODE_VERSION, TAG_FINGERPRINT, TAG_SOURCE
from pneumo.serving.integrity import (
    CHECKSUMS_TAG, IntegrityError, download_verified, manifest_digest as files_digest, record_checksums,
    recorded_checksums
)

AUDIT_TAG = "pneumo.audit.sha256"
APPROVAL_TAG = "pneumo.approval"  # "not required", or "approved by NAME at TIME"
SCHEMA = "pneumo.audit/1"
TEST_SETS_FOLDER, AUDIT_FOLDER = "test_sets", "audit"
# Candidates train with seeded Keras (keras.utils.set_random_seed) but without TensorFlow's op
# determinism, which costs speed: reruns agree closely, not bit for bit.
DETERMINISM = "seeded (keras.utils.set_random_seed per candidate process); TensorFlow op determinism off"


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()


def _log_addressed(client: Any, run_id: str, folder: str, data: bytes, digest: str | None = None) -> str:
    """Log ``data`` as ``folder/<digest>.json`` (its SHA-256 unless given: never overwrites different
    content); returns the digest."""
    digest = digest or hashlib.sha256(data).hexdigest()
    with tempfile.TemporaryDirectory(prefix="pneumo-audit-") as tmp:
        path = Path(tmp) / f"{digest}.json"
        path.write_bytes(data)
        client.log_artifact(run_id, str(path), folder)
    return digest


def _read_addressed(client: Any, run_id: str, folder: str, digest: str, what: str) -> bytes:
    """The artifact ``folder/<digest>.json`` of ``run_id``, checked against its digest.

    Raises:
        IntegrityError: it cannot be read or its content is not the digest's.
    """
    with tempfile.TemporaryDirectory(prefix="pneumo-audit-") as tmp:
        try:
            data = Path(client.download_artifacts(run_id, f"{folder}/{digest}.json", tmp)).read_bytes()
        except Exception as error:  # noqa: BLE001 - the reason is named; nothing is verified without it
            raise IntegrityError(f"{what} ({folder}/{digest}.json of run {run_id}) cannot be read: "
                                 f"{type(error).__name__}") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise IntegrityError(f"{what} was changed after registration (its SHA-256 is not the recorded one)")
    return data


def installed_packages() -> list[str]:
    """``name==version`` of every distribution installed in this environment, sorted by name."""
    found = {dist.metadata["Name"].lower(): f"{dist.metadata['Name']}=={dist.version}"
             for dist in importlib.metadata.distributions() if dist.metadata["Name"]}
    return [found[name] for name in sorted(found)]


# ----------------------------------------------------------------------------- the locked test set
def log_test_set(client: Any, run_id: str, test: TestSet) -> str:
    """Log the test manifest to ``run_id`` as ``test_sets/<digest>.json``; returns the digest (:meth:`TestSet.digest`)."""
    rows = sorted(test.manifest(), key=lambda row: (row["path"], row["sha256"]))
    return _log_addressed(client, run_id, TEST_SETS_FOLDER, _canonical(rows), test.digest())


def recorded_test_set(client: Any, version: Any) -> list[dict[str, Any]] | None:
    """The test manifest a registered version was promoted on; None when it was not recorded.

    Raises:
        IntegrityError: the manifest is missing or was changed.
    """
    digest = dict(version.tags or {}).get(TAG_TEST_SET)
    if not digest:
        return None
    what = f"the test set of {version.name} version {version.version}"
    with tempfile.TemporaryDirectory(prefix="pneumo-audit-") as tmp:
        try:
            path = Path(client.download_artifacts(version.run_id, f"{TEST_SETS_FOLDER}/{digest}.json", tmp))
            rows = json.loads(path.read_bytes())
        except Exception as error:  # noqa: BLE001 - the reason is named; nothing is compared without it
            raise IntegrityError(f"{what} ({TEST_SETS_FOLDER}/{digest}.json of run {version.run_id}) cannot be "
                                 f"read: {type(error).__name__}") from None
    if manifest_digest(rows) != digest:
        raise IntegrityError(f"{what} was changed after registration (its digest is not the {TAG_TEST_SET} tag)")
    return rows


# ----------------------------------------------------------------------------- the bundle
def bundle(decision: Decision, best: Any, parent: Any, test: TestSet, checksums: dict[str, str],
           approval: dict[str, Any] | None) -> dict[str, Any]:
    """The audit bundle of the version ``decision`` registers (JSON-ready)."""
    params = dict(best.data.params)
    counts: dict[str, int] = {}
    for row in test.manifest():
        counts[row["class"]] = counts.get(row["class"], 0) + 1
    record = decision.record()
    record.pop("aliases", None)  # where aliases point changes later; the registry holds that
    return {
        "schema": SCHEMA,
        "model": {"name": decision.model_name, "candidate": decision.candidate, "run_id": decision.run_id,
                  "retraining_run_id": decision.parent_run_id, "logged_model": decision.evaluation.model_uri},
        "dataset": {"source": best.data.tags.get(TAG_SOURCE), "fingerprint": best.data.tags.get(TAG_FINGERPRINT)},
        "test_set": {"sha256": decision.test_set_digest, "images": len(test.labels), "per_class": counts,
                     "patients": len(set(test.patients)), "manifest": f"{TEST_SETS_FOLDER}/ of run {decision.run_id}"},
        "code": {"version": parent.data.tags.get(TAG_CODE_VERSION), "dirty": parent.data.tags.get(TAG_CODE_DIRTY)},
        "environment": {"python": platform.python_version(), "platform": platform.platform(),
                        "packages": installed_packages(),
                        "note": "the process that registered the version; the model's own pins are in its "
                                "requirements.txt"},
        "training": {"seed": params.get("seed"), "determinism": DETERMINISM, "params": params,
                     "retraining_params": dict(parent.data.params)},
        "gate": decision.gate.model_dump(mode="json"),
        "decision": record,
        "approval": approval or {"required": False, "status": "not required"},
        "model_files": {"sha256": files_digest(checksums), "files": dict(sorted(checksums.items()))},
    }


def record_registration(client: Any, decision: Decision, best: Any, test: TestSet,
                        approval: dict[str, Any] | None = None) -> dict[str, str]:
    """Log checksums, test set and bundle to the candidate run; returns the version tags anchoring them."""
    checksums = decision.evaluation.checksums
    tags = record_checksums(client, decision.run_id, checksums)
    tags[TAG_TEST_SET] = log_test_set(client, decision.run_id, test)
    parent = client.get_run(decision.parent_run_id)
    data = _canonical(bundle(decision, best, parent, test, checksums, approval))
    tags[AUDIT_TAG] = _log_addressed(client, decision.run_id, AUDIT_FOLDER, data)
    tags[APPROVAL_TAG] = approval_summary(approval)
    return tags


def approval_summary(approval: dict[str, Any] | None) -> str:
    """One line for the version tag and the card."""
    if not approval or not approval.get("required"):
        return "not required"
    if approval.get("status") == "not asked":  # the gate did not pass: nobody was asked
        return f"not asked: {approval.get('reason', '')}"
    return f"{approval.get('status')} by {approval.get('approver')} at {approval.get('at')}: {approval.get('reason', '')}"


# ----------------------------------------------------------------------------- verification
@dataclass
class AuditReport:
    """What ``pneumo audit`` prints: the bundle and whether everything matches what was recorded."""

    model: str
    version: str
    bundle: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)
    files_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def state(self) -> str:
        """One line: ``verified: N files match`` or what failed."""
        if self.ok:
            return f"verified: {self.files_checked} model files match their recorded checksums"
        return "FAILED: " + "; ".join(self.problems)


def verify_version(model_name: str, version: str, *, tracking_uri: str | None = None) -> AuditReport:
    """Read the bundle and verify it, the test set and every model file against the version's tags."""
    from pneumo.mlflow_client import mlflow_client

    client = mlflow_client(tracking_uri)
    record = client.get_model_version(model_name, str(version))
    tags = dict(record.tags or {})
    report = AuditReport(model_name, str(version), None)
    if not tags.get(AUDIT_TAG) or not tags.get(CHECKSUMS_TAG):
        report.problems.append("no audit record: the version was registered before audit bundles were recorded")
        return report
    try:
        data = _read_addressed(client, record.run_id, AUDIT_FOLDER, tags[AUDIT_TAG], "the audit bundle")
        report.bundle = json.loads(data)
    except IntegrityError as error:
        report.problems.append(str(error))
    try:
        recorded_test_set(client, record)
    except IntegrityError as error:
        report.problems.append(str(error))
    try:
        expected = recorded_checksums(client, record) or {}
        if report.bundle is not None and report.bundle["model_files"]["files"] != expected:
            report.problems.append("the audit bundle's file checksums differ from the version's checksum manifest")
        with tempfile.TemporaryDirectory(prefix="pneumo-audit-") as tmp:
            download_verified(model_name, str(version), Path(tmp), tracking_uri=tracking_uri)
        report.files_checked = len(expected)
    except IntegrityError as error:
        report.problems.append(str(error))
    return report
