"""Promotion against a real mlflow server: selection, gate, aliases, rollback, concurrency, clean failure."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pneumo.config import Gate
from pneumo.errors import DataError, PromotionError
from pneumo.evaluation.holdout import TestSet, read_test_set
from pneumo.evaluation.stats import Interval
from pneumo.promotion import lock, registry, tracking
from pneumo.promotion.gate import Decision, Evaluation, floor_reasons
from pneumo.promotion.runs import TIE_BREAK_METRIC, candidate_runs, ranked_candidates
from tests.plugins.mlflow_server import (
    brightness_model,
    labelled_images,
    log_retraining,
    threshold_for,
)

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


GATE = Gate(floors_on="point")  # these tests check the gate's logic; floors on intervals have their own test


def repeated_split(copies: int = 4, per_class: int = 10) -> TestSet:
    """``copies`` noisy copies of the same gray levels (metrics as for one copy), one patient per image."""
    images, labels = [], []
    for copy in range(copies):
        found = labelled_images(per_class, per_class, seed=1000 * copy)
        images += found[0]
        labels += found[1]
    return TestSet(images, labels, [f"patient-{index}" for index in range(len(images))])


@pytest.fixture(scope="module")
def test_set() -> TestSet:
    return repeated_split()


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
    
    # 1. First retraining: the best on validation is registered and, with no champion, promoted.
    first = retraining(mlflow_uri, experiment, model, {"cnn": (MID, 0.9), "dense": (BEST, 0.5)})
    decision = registry.promote(first, test_set, gate=GATE, tracking_uri=mlflow_uri,
                                model_name=name)
    assert decision.promoted and decision.candidate == "cnn" and decision.version == "1"
    assert decision.evaluation.metrics["specificity"] == pytest.approx(0.7)
    assert decision.outcome == "promoted" and "no champion yet" in decision.reason
    assert aliases(mlflow_uri, name) == {"champion": "1"}
    tags = client.get_model_version(name, "1").tags
    assert tags["pneumo.candidate"] == "cnn" and tags["pneumo.dataset.fingerprint"] == FINGERPRINT
    # Rounded as the version page shows them (#27 item 3); the exact threshold is in the model's config.
    assert tags["pneumo.selection_score"] == "0.9000" and tags["pneumo.threshold"] == f"{threshold_for(MID):.4f}"
    # Why this one: the validation score selects, the gate judges the test score (#27 item 1).
    assert decision.selected_because == (f"cnn selected: highest validation score 0.9000 (next: dense 0.5000); the "
                                         f"gate then judged its test score {decision.evaluation.score:.4f} (test "
                                         "metrics judge, they never select)")
    assert "Why this candidate: cnn selected" in client.get_model_version(name, "1").description
    marked = client.get_run(decision.run_id)  # the runs table shows which candidate run a version came from
    assert marked.info.run_name == "cnn (registered v1)"
    assert marked.data.tags["pneumo.registered_version"] == f"{name} version 1 (promoted)"
    assert tags["pneumo.parent_run_id"] == first and tags["pneumo.run_id"] == decision.run_id
    assert client.get_model_version(name, "1").run_id == decision.run_id
    assert "cnn" in client.get_model_version(name, "1").description

    # 2. A worse model passes the floors but not the champion: registered as challenger, with why.
    second = retraining(mlflow_uri, experiment, model, {"cnn": (WORSE, 0.95)})
    decision = registry.promote(second, test_set, gate=GATE, tracking_uri=mlflow_uri,
                                model_name=name)
    assert not decision.promoted and decision.version == "2" and decision.champion.version == "1"
    assert aliases(mlflow_uri, name) == {"champion": "1", "challenger": "2"}
    reason = client.get_model_version(name, "2").tags[registry.REASON_TAG]
    assert reason.startswith("vs champion version 1: not better: difference -0.133 [") and "margin 0.000" in reason
    record = decision.record()
    assert record["score_diff"] == pytest.approx(0.7667 - 0.9, abs=1e-3) and record["score_diff_ci_high"] <= 0
    assert record["n_test_images"] == 80 and record["n_test_patients"] == 80 and "bootstrap" in record["method"]
    parent = client.get_run(second)
    assert parent.data.tags["pneumo.promotion.decision"] == "challenger"
    assert parent.data.tags["pneumo.promotion.reason"] == reason
    assert parent.data.metrics["promotion.champion_test_score"] == pytest.approx(0.9)
    logged = json.loads(Path(client.download_artifacts(second, "promotion/decision.json", str(tmp_path))).read_text())
    assert logged["outcome"] == "challenger" and logged["champion_version"] == "1"

    # 3. Dry run of a better model: the decision, and nothing changes. The retraining's dataset
    # is a local folder this time, so the command line can find its test split by itself.
    data = tmp_path / "data"
    for index, (image, label) in enumerate(zip(test_set.images, test_set.labels)):
        folder = data / "chest_xray" / "test" / ("PNEUMONIA" if label else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / (f"person{index}_bacteria_1.jpeg" if label else f"IM-{index:04d}-0001.jpeg")).write_bytes(image)
    third = retraining(mlflow_uri, experiment, model, {"cnn_deep": (BEST, 0.97)}, source=str(data))
    dry = registry.promote(third, test_set, gate=GATE, tracking_uri=mlflow_uri,
                           model_name=name, dry_run=True)
    assert dry.outcome == "dry-run: would be promoted" and dry.version is None and dry.champion.version == "1"
    assert versions(mlflow_uri, name) == ["1", "2"] and aliases(mlflow_uri, name) == {"champion": "1", "challenger": "2"}
    assert "pneumo.promotion.decision" not in client.get_run(third).data.tags
    monkeypatch.setenv("PNEUMO_HOME", str(tmp_path / "home"))
    code, out = cli(capsys, "promote", third, "--dry-run", "--floors-on", "point", "--model", name,
                    "--tracking-uri", mlflow_uri, "--json")
    assert code == 0 and out["outcome"] == "dry-run: would be promoted" and out["champion_version"] == "1"
    assert out["metrics"]["recall"] == 1.0 and out["champion_metrics"]["specificity"] == pytest.approx(0.7)
    assert out["score_diff"] == pytest.approx(0.1, abs=1e-3) and out["score_diff_ci_low"] > 0
    assert versions(mlflow_uri, name) == ["1", "2"]

    # 4. The better model promotes; the old champion becomes previous-champion.
    decision = registry.promote(third, test_set, gate=GATE, tracking_uri=mlflow_uri,
                                model_name=name)
    assert decision.promoted and decision.version == "3" and decision.record()["previous_champion"] == "1"
    assert aliases(mlflow_uri, name) == {"champion": "3", "previous-champion": "1", "challenger": "2"}
    info = registry.champion_info(name, tracking_uri=mlflow_uri)
    assert info["version"] == "3" and info["candidate"] == "cnn_deep" and info["metrics"]["test_score"] == 1.0
    assert info["threshold"] == pytest.approx(threshold_for(BEST), abs=5e-5) and info["run_id"] == decision.run_id
    assert info["aliases"] == ["champion"] and info["uri"] == f"models:/{name}@champion"
    assert info["metrics"]["test_recall.ci_low"] <= 1.0 <= info["metrics"]["test_recall.ci_high"]
    assert info["decision"]["score_diff.ci_low"] <= info["decision"]["score_diff"] <= info["decision"]["score_diff.ci_high"]
    assert info["decision"]["n_test_images"] == 80

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
    rows = []
    for index, (image, label) in enumerate(zip(test_set.images, test_set.labels)):
        path = f"chest_xray/test/{'PNEUMONIA' if label else 'NORMAL'}/{index}.jpeg"
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(image)
        rows.append({"path": path, "label": label, "subset": "test", "patient_id": f"p{index}"})
    run_ids = [run.info.run_id for run in candidate_runs(parent, tracking_uri=mlflow_uri)]
    decision = registry.promote(parent, read_test_set(tmp_path, pd.DataFrame(rows)),
                                gate=Gate(min_recall=0.95, min_specificity=0.5, floors_on="point"),
                                model_name=name, run_ids=run_ids, tracking_uri=mlflow_uri)
    assert not decision.promoted and decision.champion is None
    assert decision.reasons == ["test recall 0.4000 is below the floor 0.9500"]
    assert decision.outcome == "challenger" and decision.version == "1"
    assert aliases(mlflow_uri, name) == {"challenger": "1"}
    assert registry.champion_info(name, tracking_uri=mlflow_uri) is None
    assert cli(capsys, "champion", "--model", name, "--tracking-uri", mlflow_uri, "--json") == (1, None)


def test_the_gate_scores_a_test_split_larger_than_the_serving_cap(mlflow_uri, unique_name, model, tmp_path,
                                                                  monkeypatch):
    """The REST request cap (here 7 images) must not limit the gate, which reads and scores the
    split's files in chunks: 340 test images (more than five SCORE_CHUNKs) all get scored."""
    import pandas as pd

    from pneumo.promotion import gate
    from pneumo.serving.pyfunc import InvalidImageError, PneumoniaClassifier

    split = repeated_split(copies=17)
    assert len(split.images) == 340 > 7 and len(split.images) > 5 * gate.SCORE_CHUNK
    rows = []
    for index, (image, label) in enumerate(zip(split.images, split.labels)):
        path = f"chest_xray/test/{'PNEUMONIA' if label else 'NORMAL'}/{index}.jpeg"
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(image)
        rows.append({"path": path, "label": label, "subset": "test", "patient_id": f"p{index}"})
    test = read_test_set(tmp_path, pd.DataFrame(rows))
    assert all(isinstance(item, Path) for item in test.images)  # files, read a chunk at a time
    monkeypatch.setenv("PNEUMO_MAX_BATCH_IMAGES", "7")
    name = unique_name("model")
    parent = retraining(mlflow_uri, unique_name("exp"), model, {"cnn": (MID, 0.9)})
    decision = registry.promote(parent, test, gate=GATE, model_name=name, tracking_uri=mlflow_uri)
    assert decision.promoted and decision.n_test_images == 340
    assert len(decision.evaluation.probabilities) == 340
    assert decision.evaluation.metrics["specificity"] == pytest.approx(0.7)  # as for one copy of the levels
    # The cap still holds for REST clients of the very model the gate just scored.
    import mlflow.pyfunc

    served = mlflow.pyfunc.load_model(f"models:/{name}/1")
    assert isinstance(served.unwrap_python_model(), PneumoniaClassifier)
    with pytest.raises(InvalidImageError, match="8 images in one request exceeds the maximum of 7"):
        served.predict(list(split.images[:8]))


def test_floors_apply_to_the_lower_bound_unless_told_otherwise():
    def evaluation(recall: float, low: float) -> Evaluation:
        intervals = {"recall": Interval(recall, low, 1.0, "wilson"), "specificity": Interval(0.5, 0.4, 0.6, "wilson")}
        return Evaluation("models:/x", 0.5, {"recall": recall, "specificity": 0.5}, 0.8, intervals=intervals)

    gate = Gate(min_recall=0.95, min_specificity=0.6)
    assert floor_reasons(gate, evaluation(0.97, 0.91)) == [
        "test recall 0.9700 has its 95 % interval's lower bound 0.9100 below the floor 0.9500",
        "test specificity 0.5000 has its 95 % interval's lower bound 0.4000 below the floor 0.6000",
    ]
    assert floor_reasons(gate.model_copy(update={"floors_on": "point"}), evaluation(0.97, 0.91)) == [
        "test specificity 0.5000 is below the floor 0.6000",
    ]
    assert floor_reasons(Gate(min_recall=0.95), evaluation(0.99, 0.95)) == []  # inclusive


def test_a_floor_that_cannot_be_evaluated_fails():
    # #25: a test split without NORMAL images gives specificity 0.0 with a [nan, nan] interval.
    undefined = Evaluation("models:/x", 0.5, {"recall": 1.0, "specificity": 0.0}, 0.67, intervals={
        "recall": Interval(1.0, 0.9, 1.0, "wilson"), "specificity": Interval(0.0, math.nan, math.nan, "wilson")})
    [reason] = floor_reasons(Gate(min_recall=0.5, min_specificity=0.9), undefined)
    assert reason.startswith("test specificity 0.0000 cannot be checked against the floor 0.9000: its 95 % interval")
    assert floor_reasons(Gate(min_recall=0.5, min_specificity=0.0), undefined) == []  # no floor set, nothing to fail
    pointless = Evaluation("models:/x", 0.5, {"recall": 1.0, "specificity": math.nan}, 0.67)
    assert "its value is undefined" in floor_reasons(Gate(min_specificity=0.1, floors_on="point"), pointless)[0]


def test_a_test_split_without_one_class_is_refused_before_scoring(tmp_path):
    import pandas as pd

    rows = [{"path": f"chest_xray/test/PNEUMONIA/p{i}.jpeg", "split": "test", "label": 1, "patient_id": f"p{i}"}
            for i in range(3)]
    with pytest.raises(DataError, match="the test split has 0 NORMAL images"):
        read_test_set(tmp_path, pd.DataFrame(rows))


def test_concurrent_promotions_never_decide_on_a_stale_champion(mlflow_uri, unique_name, model, test_set):
    from mlflow import MlflowClient

    name, experiment = unique_name("model"), unique_name("exp")
    best = retraining(mlflow_uri, experiment, model, {"cnn": (BEST, 0.9)})
    good = retraining(mlflow_uri, experiment, model, {"cnn": (GOOD, 0.9)})
    barrier = threading.Barrier(2)
    decisions: dict[str, Decision] = {}
    errors: list[BaseException] = []

    def run(label: str, parent: str) -> None:
        try:
            barrier.wait(timeout=60)  # both reach the registry at the same moment
            decisions[label] = registry.promote(parent, test_set, gate=GATE,
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
    with pytest.raises(PromotionError, match="rolled back"):
        registry.promote(parent, test_set, gate=GATE, tracking_uri=mlflow_uri,
                         model_name=name)
    assert versions(mlflow_uri, name) == [] and aliases(mlflow_uri, name) == {}
    assert not client.search_registered_models(f"name = '{name}{lock.LOCK_SUFFIX}'")
    # The deleted version is not left linked on the logged model (the Models tab would show it registered).
    [model_id] = [m.model_id for m in client.search_logged_models(experiment_ids=[client.get_run(parent).info.experiment_id])
                  if m.name == "cnn-serving"]
    assert json.loads(client.get_logged_model(model_id).tags.get("mlflow.modelVersions", "[]")) == []


def test_bad_promotion_inputs_are_explained(mlflow_uri, unique_name):
    parent = tracking.start_retraining(mlflow_uri, unique_name("exp"), "local", FINGERPRINT, {"epochs": 1})
    with pytest.raises(PromotionError, match="no finished candidate"):
        registry.promote(parent, TestSet([b"x"], [1], ["p"]), gate=Gate(), model_name="m", tracking_uri=mlflow_uri)
    with pytest.raises(PromotionError, match="non-empty test set"):
        registry.promote(parent, TestSet([], [], []), gate=Gate(), model_name="m", tracking_uri=mlflow_uri)


def test_identical_model_is_never_promoted_and_a_tiny_split_is_undecided(mlflow_uri, unique_name, model, test_set):
    name, experiment = unique_name("model"), unique_name("exp")
    first = retraining(mlflow_uri, experiment, model, {"cnn": (MID, 0.9)})
    assert registry.promote(first, test_set, gate=GATE, model_name=name, tracking_uri=mlflow_uri).promoted
    same = retraining(mlflow_uri, experiment, model, {"cnn": (MID, 0.95)})  # same weights, same threshold
    decision = registry.promote(same, test_set, gate=GATE, model_name=name, tracking_uri=mlflow_uri)
    assert decision.outcome == "challenger" and decision.comparison.diff == 0 == decision.comparison.high
    # A clearly better model, judged on 6 images: the interval cannot tell, so nothing moves.
    better = retraining(mlflow_uri, experiment, model, {"cnn": (BEST, 0.97)})
    tiny = repeated_split(copies=1, per_class=3)
    decision = registry.promote(better, tiny, gate=GATE, model_name=name, tracking_uri=mlflow_uri)
    assert decision.outcome == "undecided" and decision.comparison.diff > 0
    assert "vs champion version 1: not shown better: difference" in decision.reason
    assert decision.reason.count("undecided") == 0 and "a larger test split would narrow it" in decision.reason
    assert aliases(mlflow_uri, name) == {"champion": "1", "challenger": decision.version}
    # Non-inferiority on the same data accepts the newer model unless the interval says it is worse.
    decision = registry.promote(better, tiny, gate=GATE.model_copy(update={"mode": "non-inferiority", "margin": 0.05}),
                                model_name=name, tracking_uri=mlflow_uri)
    assert decision.promoted and "non-inferior" in decision.reason


def test_only_this_retrainings_working_candidates_compete(mlflow_uri, unique_name, model, test_set):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    name, experiment = unique_name("model"), unique_name("exp")
    parent = retraining(mlflow_uri, experiment, model, {"cnn": (MID, 0.9), "dense": (GOOD, 0.8)})
    trained = {run.data.tags["pneumo.candidate"]: run.info.run_id for run in candidate_runs(parent, tracking_uri=mlflow_uri)}
    # A run tagged with the parent after training, with a better score, is not one the flow trained.
    late = log_retraining(mlflow_uri, experiment, model, {"intruder": (threshold_for(BEST), 0.99)})
    [intruder] = candidate_runs(late, tracking_uri=mlflow_uri)
    client.set_tag(intruder.info.run_id, "mlflow.parentRunId", parent)
    client.set_tag(intruder.info.run_id, "pneumo.candidate", "intruder")
    assert len(candidate_runs(parent, tracking_uri=mlflow_uri)) == 3
    # The best of the trained ones points at a model it did not log: skipped for the next best.
    client.set_tag(trained["cnn"], tracking.TAG_SERVING_MODEL, intruder.data.tags[tracking.TAG_SERVING_MODEL])
    decision = registry.promote(parent, test_set, gate=GATE, model_name=name, run_ids=list(trained.values()),
                                tracking_uri=mlflow_uri, dry_run=True)
    assert decision.candidate == "dense" and decision.run_id == trained["dense"]
    [skipped] = decision.skipped
    assert skipped.startswith(f"cnn (run {trained['cnn']})") and "not by this candidate" in skipped
    client.set_tag(trained["cnn"], tracking.TAG_SERVING_MODEL, "models:/m-0000000000000000000000000000dead")
    decision = registry.promote(parent, test_set, gate=GATE, model_name=name, run_ids=list(trained.values()),
                                tracking_uri=mlflow_uri)
    assert decision.candidate == "dense" and decision.promoted and decision.record()["skipped_candidates"]


def test_a_tied_score_goes_to_the_higher_validation_auc(mlflow_uri, unique_name, model):
    from mlflow import MlflowClient

    parent = retraining(mlflow_uri, unique_name("exp"), model, {"cnn": (MID, 0.9), "vgg16": (MID, 0.9)})
    ids = {run.data.tags["pneumo.candidate"]: run.info.run_id for run in candidate_runs(parent, tracking_uri=mlflow_uri)}
    client = MlflowClient(mlflow_uri)
    for candidate, auc in (("cnn", 0.90), ("vgg16", 0.97)):
        client.log_metric(ids[candidate], TIE_BREAK_METRIC, auc)
    assert [run.data.tags["pneumo.candidate"] for run in ranked_candidates(parent, tracking_uri=mlflow_uri)] == \
        ["vgg16", "cnn"]


def _lose_model_files(s3_server, mlflow_server, model_uri: str) -> None:
    """Delete a logged model's files from the artifact store (a bucket on the test S3 server)."""
    bucket = mlflow_server.artifacts_destination.split("/")[2]
    assert s3_server.delete_keys_containing(bucket, model_uri.removeprefix("models:/"))


def test_rollback_names_a_deleted_previous_champion_and_refuses_one_that_does_not_load(
        mlflow_uri, mlflow_server, s3_server, unique_name, model, test_set):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    name, experiment = unique_name("model"), unique_name("exp")
    newer = GATE.model_copy(update={"mode": "non-inferiority", "margin": 0.01})  # a retrained equal model wins
    for level in (MID, BEST, BEST):
        parent = retraining(mlflow_uri, experiment, model, {"cnn": (level, 0.9)})
        assert registry.promote(parent, test_set, gate=newer, model_name=name, tracking_uri=mlflow_uri).promoted
    assert aliases(mlflow_uri, name) == {"champion": "3", "previous-champion": "2"}
    # The previous champion's files are gone: rollback refuses and the champion stays.
    _lose_model_files(s3_server, mlflow_server, client.get_model_version(name, "2").source)
    with pytest.raises(PromotionError, match=r"version 2 \(previous-champion\) does not load, so the champion stays"):
        registry.rollback(name, tracking_uri=mlflow_uri)
    assert aliases(mlflow_uri, name)["champion"] == "3"
    # The previous champion was deleted: rollback says so, not "no previous-champion".
    client.delete_model_version(name, "2")
    with pytest.raises(PromotionError, match="version 2, the previous champion, was deleted"):
        registry.rollback(name, tracking_uri=mlflow_uri)
