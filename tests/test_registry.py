"""Promotion against a real mlflow server: selection, gate, aliases, rollback, concurrency, clean failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pneumo import lock, registry, tracking
from pneumo.config import Gate
from pneumo.errors import PromotionError
from pneumo.pipeline import read_test_set
from pneumo.runs import candidate_runs
from tests.plugins.mlflow_server import brightness_model, labelled_images, log_retraining, threshold_for

FINGERPRINT = "f" * 64
# Gray levels of the NORMAL test images run 40..120 and PNEUMONIA 136..216 (10 each), so a
# brightness model's test quality is set by the gray level its threshold sits at:
MID = 100.0  # 3 normals flagged: recall 1, specificity 0.7, score 0.9
WORSE = 60.0  # 7 normals flagged: specificity 0.3, score 0.767 (still passes the recall floor)
BEST = 128.0  # perfect: score 1.0
GOOD = 110.0  # 2 normals flagged: specificity 0.8, score 0.933
LOW_RECALL = 185.0  # 6 of 10 pneumonias missed: recall 0.4


@pytest.fixture(scope="module")
def model():
    return brightness_model(32)


@pytest.fixture(scope="module")
def test_set() -> tuple[list[bytes], list[int]]:
    return labelled_images(10, 10)


def retraining(uri: str, experiment: str, model, candidates: dict[str, tuple[float, float]],
               source: str = "s3://bucket/chest_xray") -> str:
    """A parent run with one child per ``name: (threshold gray level, validation score)``."""
    return log_retraining(uri, experiment, model, {name: (threshold_for(level), score)
                                                   for name, (level, score) in candidates.items()}, source, FINGERPRINT)


def aliases(uri: str, name: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return {alias: version for alias, version in MlflowClient(uri).get_registered_model(name).aliases.items()}


def versions(uri: str, name: str) -> list[str]:
    from mlflow import MlflowClient

    return sorted(v.version for v in MlflowClient(uri).search_model_versions(f"name = '{name}'"))


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    """Run ``pneumo <argv> --json`` in-process; (exit code, parsed stdout)."""
    from pneumo.cli import main

    capsys.readouterr()
    code = main(list(argv))
    return code, json.loads(capsys.readouterr().out or "null")


def test_successive_retrainings_promote_reject_promote_and_roll_back(mlflow_uri, unique_name, model, test_set,
                                                                      tmp_path, capsys, monkeypatch):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    name, experiment = unique_name("model"), unique_name("exp")
    images, labels = test_set

    # 1. First retraining: the best on validation is registered and, with no champion, promoted.
    first = retraining(mlflow_uri, experiment, model, {"cnn": (MID, 0.9), "dense": (BEST, 0.5)})
    decision = registry.promote(first, images, labels, gate=Gate(), tracking_uri=mlflow_uri,
                                model_name=name)
    assert decision.promoted and decision.candidate == "cnn" and decision.version == "1"
    assert decision.evaluation.metrics["specificity"] == pytest.approx(0.7)
    assert decision.outcome == "promoted" and "no champion yet" in decision.reason
    assert aliases(mlflow_uri, name) == {"champion": "1"}
    tags = client.get_model_version(name, "1").tags
    assert tags["pneumo.candidate"] == "cnn" and tags["pneumo.dataset.fingerprint"] == FINGERPRINT
    assert float(tags["pneumo.selection_score"]) == 0.9 and float(tags["pneumo.threshold"]) == pytest.approx(threshold_for(MID))
    assert tags["pneumo.parent_run_id"] == first and tags["pneumo.run_id"] == decision.run_id
    assert client.get_model_version(name, "1").run_id == decision.run_id
    assert "cnn" in client.get_model_version(name, "1").description

    # 2. A worse model passes the floors but not the champion: registered as challenger, with why.
    second = retraining(mlflow_uri, experiment, model, {"cnn": (WORSE, 0.95)})
    decision = registry.promote(second, images, labels, gate=Gate(), tracking_uri=mlflow_uri,
                                model_name=name)
    assert not decision.promoted and decision.version == "2" and decision.champion.version == "1"
    assert aliases(mlflow_uri, name) == {"champion": "1", "challenger": "2"}
    reason = client.get_model_version(name, "2").tags[registry.REASON_TAG]
    assert reason == "test score 0.7667 does not reach champion version 1's 0.9000 + margin 0.0000 on the same test set"
    parent = client.get_run(second)
    assert parent.data.tags["pneumo.promotion.decision"] == "challenger"
    assert parent.data.tags["pneumo.promotion.reason"] == reason
    assert parent.data.metrics["promotion.champion_test_score"] == pytest.approx(0.9)
    logged = json.loads(Path(client.download_artifacts(second, "promotion/decision.json", str(tmp_path))).read_text())
    assert logged["outcome"] == "challenger" and logged["champion_version"] == "1"

    # 3. Dry run of a better model: the decision, and nothing changes. The retraining's dataset
    # is a local folder this time, so the command line can find its test split by itself.
    data = tmp_path / "data"
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = data / "chest_xray" / "test" / ("PNEUMONIA" if label else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / (f"person{index}_bacteria_1.jpeg" if label else f"IM-{index:04d}-0001.jpeg")).write_bytes(image)
    third = retraining(mlflow_uri, experiment, model, {"cnn_deep": (BEST, 0.97)}, source=str(data))
    dry = registry.promote(third, images, labels, gate=Gate(), tracking_uri=mlflow_uri,
                           model_name=name, dry_run=True)
    assert dry.outcome == "dry-run: would be promoted" and dry.version is None and dry.champion.version == "1"
    assert versions(mlflow_uri, name) == ["1", "2"] and aliases(mlflow_uri, name) == {"champion": "1", "challenger": "2"}
    assert "pneumo.promotion.decision" not in client.get_run(third).data.tags
    monkeypatch.setenv("PNEUMO_HOME", str(tmp_path / "home"))
    code, out = cli(capsys, "promote", third, "--dry-run", "--model", name, "--tracking-uri", mlflow_uri, "--json")
    assert code == 0 and out["outcome"] == "dry-run: would be promoted" and out["champion_version"] == "1"
    assert out["metrics"]["recall"] == 1.0 and out["champion_metrics"]["specificity"] == pytest.approx(0.7)
    assert versions(mlflow_uri, name) == ["1", "2"]

    # 4. The better model promotes; the old champion becomes previous-champion.
    decision = registry.promote(third, images, labels, gate=Gate(), tracking_uri=mlflow_uri,
                                model_name=name)
    assert decision.promoted and decision.version == "3" and decision.record()["previous_champion"] == "1"
    assert aliases(mlflow_uri, name) == {"champion": "3", "previous-champion": "1", "challenger": "2"}
    info = registry.champion_info(name, tracking_uri=mlflow_uri)
    assert info["version"] == "3" and info["candidate"] == "cnn_deep" and info["metrics"]["test_score"] == 1.0
    assert info["threshold"] == pytest.approx(threshold_for(BEST)) and info["run_id"] == decision.run_id
    assert info["aliases"] == ["champion"] and info["uri"] == f"models:/{name}@champion"

    code, shown = cli(capsys, "champion", "--model", name, "--tracking-uri", mlflow_uri, "--json")
    assert code == 0 and shown["version"] == "3" and shown["run_id"] == decision.run_id

    # 5. Rollback (from the command line) restores the previous champion; a second one has
    # nothing to go back to.
    code, restored = cli(capsys, "rollback", "--model", name, "--tracking-uri", mlflow_uri, "--json")
    assert code == 0 and restored["version"] == "1" and restored["rolled_back"] == "3"
    assert aliases(mlflow_uri, name) == {"champion": "1", "challenger": "2"}
    assert "pneumo.rolled_back" in client.get_model_version(name, "3").tags
    with pytest.raises(PromotionError, match="no previous-champion"):
        registry.rollback(name, tracking_uri=mlflow_uri)


def test_floors_reject_even_without_a_champion(mlflow_uri, unique_name, model, test_set, capsys, tmp_path):
    import pandas as pd

    name = unique_name("model")
    parent = retraining(mlflow_uri, unique_name("exp"), model, {"cnn": (LOW_RECALL, 0.9)})
    # Called the way the flow calls it: survivor records, and the test split as files + manifest rows.
    images, labels = test_set
    rows = []
    for index, (image, label) in enumerate(zip(images, labels)):
        path = f"chest_xray/test/{'PNEUMONIA' if label else 'NORMAL'}/{index}.jpeg"
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(image)
        rows.append({"path": path, "label": label, "subset": "test"})
    run_ids = [run.info.run_id for run in candidate_runs(parent, tracking_uri=mlflow_uri)]
    images, labels = read_test_set(tmp_path, pd.DataFrame(rows))
    decision = registry.promote(parent, images, labels, gate=Gate(min_recall=0.95, min_specificity=0.5),
                                model_name=name, run_ids=run_ids, tracking_uri=mlflow_uri)
    assert not decision.promoted and decision.champion is None
    assert decision.reasons == ["test recall 0.4000 is below the floor 0.9500"]
    assert decision.outcome == "challenger" and decision.version == "1"
    assert aliases(mlflow_uri, name) == {"challenger": "1"}
    assert registry.champion_info(name, tracking_uri=mlflow_uri) is None
    assert cli(capsys, "champion", "--model", name, "--tracking-uri", mlflow_uri, "--json") == (1, None)


def test_gate_lists_every_reason():
    def evaluation(recall: float, specificity: float, version: str | None = None) -> registry.Evaluation:
        metrics = {"recall": recall, "specificity": specificity}
        return registry.Evaluation("models:/x", 0.5, metrics, (2 * recall + specificity) / 3, version)

    gate = Gate(min_recall=0.95, min_specificity=0.6, margin=0.01)
    assert registry.gate_reasons(gate, evaluation(0.9, 0.5), evaluation(1.0, 1.0, "7")) == [
        "test recall 0.9000 is below the floor 0.9500",
        "test specificity 0.5000 is below the floor 0.6000",
        "test score 0.7667 does not reach champion version 7's 1.0000 + margin 0.0100 on the same test set",
    ]
    assert registry.gate_reasons(gate, evaluation(0.96, 0.7), evaluation(0.96, 0.67, "7")) == []  # 0.8733 ≥ 0.8633 + 0.01
    assert registry.gate_reasons(Gate(), evaluation(0.95, 0.0), None) == []  # floors are inclusive


def test_concurrent_promotions_never_decide_on_a_stale_champion(mlflow_uri, unique_name, model, test_set):
    from mlflow import MlflowClient

    name, experiment = unique_name("model"), unique_name("exp")
    images, labels = test_set
    best = retraining(mlflow_uri, experiment, model, {"cnn": (BEST, 0.9)})
    good = retraining(mlflow_uri, experiment, model, {"cnn": (GOOD, 0.9)})
    barrier = threading.Barrier(2)
    decisions: dict[str, registry.Decision] = {}
    errors: list[BaseException] = []

    def run(label: str, parent: str) -> None:
        try:
            barrier.wait(timeout=60)  # both reach the registry at the same moment
            decisions[label] = registry.promote(parent, images, labels, gate=Gate(),
                                                tracking_uri=mlflow_uri, model_name=name)
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)

    threads = [threading.Thread(target=run, args=item) for item in (("best", best), ("good", good))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    first, second = sorted(decisions.values(), key=lambda d: int(d.version))
    # Whoever registered second must have been judged against the first's fresh promotion.
    assert first.promoted and first.champion is None
    assert second.champion is not None and second.champion.version == first.version
    # And whatever the order, the better model ends up champion.
    assert aliases(mlflow_uri, name)["champion"] == decisions["best"].version
    assert decisions["good"].promoted == (decisions["good"] is first)
    # The lock is gone.
    assert not MlflowClient(mlflow_uri).search_registered_models(f"name = '{name}{lock.LOCK_SUFFIX}'")


def test_promotion_lock_excludes_and_times_out(mlflow_uri, unique_name):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    name = unique_name("model")
    with lock.promotion_lock(client, name) as token:
        assert client.get_registered_model(name + lock.LOCK_SUFFIX).tags[lock.LOCK_OWNER_TAG] == token
        with pytest.raises(PromotionError, match=f"another promotion of {name} holds the registry lock"):
            with lock.promotion_lock(client, name, timeout=1, poll=0.2):
                pass
    # Released: taken again at once; and an abandoned lock (expired) is taken over.
    with lock.promotion_lock(client, name, ttl=0):
        pass
    client.create_registered_model(name + lock.LOCK_SUFFIX, tags={lock.LOCK_OWNER_TAG: "crashed",
                                                                      lock.LOCK_EXPIRES_TAG: "0"})
    with lock.promotion_lock(client, name, timeout=5) as token:
        assert client.get_registered_model(name + lock.LOCK_SUFFIX).tags[lock.LOCK_OWNER_TAG] == token


@pytest.mark.skipif(lock._process_id(os.getpid()) is None, reason="needs Linux /proc to tell a live holder")
def test_a_lock_whose_holder_died_on_this_machine_is_taken_over_at_once(mlflow_uri, unique_name):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    name = unique_name("model")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        process = lock._process_id(holder.pid)
        assert process is not None
        # Held by a live process, far from expiry: others wait and give up.
        client.create_registered_model(name + lock.LOCK_SUFFIX, tags={
            lock.LOCK_OWNER_TAG: "the-holder", lock.LOCK_EXPIRES_TAG: str(time.time() + 3600),
            lock.LOCK_PROCESS_TAG: process})
        with pytest.raises(PromotionError, match="the-holder"):
            with lock.promotion_lock(client, name, timeout=1, poll=0.2):
                pass
    finally:
        holder.kill()
        holder.wait()
    # The holder is dead (and reaped): the next promotion takes the lock without waiting for the hour.
    started = time.monotonic()
    with lock.promotion_lock(client, name, timeout=30) as token:
        assert client.get_registered_model(name + lock.LOCK_SUFFIX).tags[lock.LOCK_OWNER_TAG] == token
    assert time.monotonic() - started < 10


def test_a_failure_midway_leaves_no_version_and_no_alias(mlflow_uri, unique_name, model, test_set):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    name = unique_name("model")
    parent = retraining(mlflow_uri, unique_name("exp"), model, {"cnn": (BEST, 0.9)})
    # Deleting the parent run makes the last step (logging the decision on it) fail after the
    # version was registered and the champion alias moved.
    client.delete_run(parent)
    images, labels = test_set
    with pytest.raises(PromotionError, match="rolled back"):
        registry.promote(parent, images, labels, gate=Gate(), tracking_uri=mlflow_uri,
                         model_name=name)
    assert versions(mlflow_uri, name) == [] and aliases(mlflow_uri, name) == {}
    assert not client.search_registered_models(f"name = '{name}{lock.LOCK_SUFFIX}'")


def test_bad_promotion_inputs_are_explained(mlflow_uri, unique_name):
    parent = tracking.start_retraining(mlflow_uri, unique_name("exp"), "local", FINGERPRINT, {"epochs": 1})
    with pytest.raises(PromotionError, match="no finished candidate"):
        registry.promote(parent, [b"x"], [1], gate=Gate(), model_name="m", tracking_uri=mlflow_uri)
    with pytest.raises(PromotionError, match="non-empty test set"):
        registry.promote(parent, [], [], gate=Gate(), model_name="m", tracking_uri=mlflow_uri)
