"""The audit record of a registered version (#26): the bundle, ``pneumo audit``, the locked test set."""

from __future__ import annotations

import importlib.metadata
import json
import uuid

import pytest

from pneumo.cli import main
from pneumo.config import Gate
from pneumo.evaluation.holdout import TestSet
from tests.plugins.mlflow_server import brightness_model, labelled_images, log_retraining, threshold_for
from tests.serving.test_integrity import _tampered

SIZE = 32
GATE = Gate(floors_on="point")


def _split(normal_dropped: int = 0, pneumonia_added: int = 0) -> TestSet:
    """Six images per class (one patient each), less the first ``normal_dropped`` NORMAL, plus new PNEUMONIA."""
    images, labels = labelled_images(6, 6)
    images, labels = images[normal_dropped:], labels[normal_dropped:]
    if pneumonia_added:
        extra, extra_labels = labelled_images(0, pneumonia_added, seed=500)
        images, labels = images + extra, labels + extra_labels
    names = [f"chest_xray/test/{'PNEUMONIA' if label else 'NORMAL'}/image-{index}.jpeg"
             for index, label in enumerate(labels)]
    return TestSet(images, labels, [f"p{index}" for index in range(len(images))], names=names)


@pytest.fixture(scope="module")
def champion(mlflow_server, s3_server):
    """Version 1, promoted the normal way (so its audit record exists), and where its files live in S3."""
    from mlflow import MlflowClient

    from pneumo.promotion import registry

    uri, name = mlflow_server.uri, f"audit-{uuid.uuid4().hex[:10]}"
    parent = log_retraining(uri, name, brightness_model(SIZE), {"cnn": (threshold_for(110.0), 0.9)})
    decision = registry.promote(parent, _split(), gate=GATE, model_name=name, tracking_uri=uri)
    assert decision.promoted and decision.version == "1"
    model_id = MlflowClient(uri).get_model_version(name, "1").source.removeprefix("models:/")
    bucket = mlflow_server.artifacts_destination.removeprefix("s3://").split("/")[0]
    return uri, name, bucket, model_id, decision


def _audit(capsys, uri: str, name: str, *extra: str) -> tuple[int, dict]:
    code = main(["audit", "--model", name, "--tracking-uri", uri, "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def test_an_untouched_version_audits_clean_with_everything_an_auditor_asks_for(champion, capsys):
    from mlflow import MlflowClient

    from pneumo.promotion.audit import APPROVAL_TAG, AUDIT_TAG
    from pneumo.promotion.gate import TAG_TEST_SET

    uri, name, *_, decision = champion
    code, report = _audit(capsys, uri, name, "--version", "1")
    assert code == 0 and report["ok"] and report["problems"] == [] and report["files_checked"] > 3
    bundle = report["bundle"]
    tags = MlflowClient(uri).get_model_version(name, "1").tags
    assert bundle["test_set"]["sha256"] == tags[TAG_TEST_SET] == _split().digest()
    assert bundle["test_set"]["per_class"] == {"NORMAL": 6, "PNEUMONIA": 6} and len(tags[AUDIT_TAG]) == 64
    assert bundle["dataset"] == {"source": "s3://bucket/chest_xray", "fingerprint": "f" * 64}
    assert f"mlflow=={importlib.metadata.version('mlflow')}" in bundle["environment"]["packages"]
    assert bundle["training"]["params"]["image_size"] == str(SIZE) and "seed" in bundle["training"]
    assert bundle["gate"]["floors_on"] == "point" and bundle["decision"]["outcome"] == "promoted"
    assert bundle["decision"]["score"] == pytest.approx(decision.evaluation.score)
    assert bundle["approval"]["status"] == "not required" and tags[APPROVAL_TAG] == "not required"
    assert {"MLmodel", "served_model.py", "artifacts/model.keras"} <= set(bundle["model_files"]["files"])
    # The champion's default: the same report; `pneumo champion` shows the state.
    assert _audit(capsys, uri, name)[1]["version"] == "1"
    assert main(["champion", "--model", name, "--tracking-uri", uri]) == 0
    assert "audit: verified: " in capsys.readouterr().out
    assert main(["audit", "--model", name, "--tracking-uri", uri, "--version", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"test set: sha256 {_split().digest()}, 12 images of 12 patients (6 NORMAL, 6 PNEUMONIA)" in printed
    assert "decision: promoted: " in printed and "approval: not required" in printed


def test_a_flipped_byte_fails_the_audit_naming_the_file_and_serving_refuses_it(champion, s3_server, capsys):
    from pneumo.serving.follower import load_version
    from pneumo.serving.smoke import ModelRefused

    uri, name, bucket, model_id, _ = champion

    def flip(data: bytes) -> bytes:
        return data[:100] + bytes([data[100] ^ 0x01]) + data[101:]

    with _tampered(s3_server, bucket, f"{model_id}/artifacts/artifacts/model.keras", flip):
        code, report = _audit(capsys, uri, name, "--version", "1")
        assert code == 1 and not report["ok"]
        assert any("changed: artifacts/model.keras" in problem for problem in report["problems"]), report
        assert main(["audit", "--model", name, "--tracking-uri", uri]) == 1
        assert "FAILED: " in capsys.readouterr().out
        assert main(["champion", "--model", name, "--tracking-uri", uri]) == 0
        assert "audit: FAILED: " in capsys.readouterr().out
        assert main(["champion", "--model", name, "--tracking-uri", uri, "--no-audit"]) == 0  # cheap: no download
        assert "audit: not checked (--no-audit)" in capsys.readouterr().out
        with pytest.raises(ModelRefused, match="checksum check failed: .*changed: artifacts/model.keras"):
            load_version(name, "1")
    assert _audit(capsys, uri, name, "--version", "1")[0] == 0  # restored: clean again


def test_a_rewritten_audit_bundle_is_detected(champion, s3_server, capsys):
    from mlflow import MlflowClient

    from pneumo.promotion.audit import AUDIT_TAG

    uri, name, bucket, *_ = champion
    digest = MlflowClient(uri).get_model_version(name, "1").tags[AUDIT_TAG]
    forged = b'"approval": {"status": "approved by the attacker"}'
    with _tampered(s3_server, bucket, f"audit/{digest}.json", lambda data: data[:-1] + b", " + forged + b"}"):
        code, report = _audit(capsys, uri, name, "--version", "1")
    assert code == 1 and any("audit bundle was changed after registration" in p for p in report["problems"])


def test_a_changed_test_split_is_named_and_compared_on_the_images_both_share(champion):
    from pneumo.promotion import registry

    uri, name, *_ = champion
    parent = log_retraining(uri, name, brightness_model(SIZE), {"dense": (threshold_for(128.0), 0.95)})
    same = registry.promote(parent, _split(), gate=GATE, model_name=name, tracking_uri=uri, dry_run=True)
    assert same.test_change is None and "same locked test set as version 1" in same.reason
    assert same.comparison.n_images == 12

    changed = registry.promote(parent, _split(normal_dropped=2, pneumonia_added=3), gate=GATE, model_name=name,
                               tracking_uri=uri, dry_run=True)
    assert changed.test_change.added == {"NORMAL": 0, "PNEUMONIA": 3}
    assert changed.test_change.removed == {"NORMAL": 2, "PNEUMONIA": 0}
    assert changed.compared_on_shared and changed.comparison.n_images == 10 == len(changed.test_change.shared)
    assert ("the test split changed since version 1 was promoted (added 0 NORMAL, 3 PNEUMONIA; removed 2 NORMAL, "
            "0 PNEUMONIA; 10 images are in both): compared on the 10 images both share") in changed.reason
    record = changed.record()["test_set"]
    assert record["same"] is False and record["change"]["shared"] == 10
    assert record["champion_sha256"] == _split().digest() != record["sha256"]
