"""Training learns the generated signal; divergence is reported; a candidate run yields all outputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pneumo.config import Settings, TrainConfig
from pneumo.errors import TrainingDiverged
from pneumo.pipeline import best_candidate, prepare_source, run_candidate
from pneumo.promotion.leaderboard import format_leaderboard, leaderboard
from pneumo.training.train import train_candidate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cnn_result(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    config = TrainConfig(image_size=40, batch_size=16, epochs=5, seed=7)
    data = prepare_source(str(small_dataset), Settings(home=tmp_path_factory.mktemp("home")), config,
                          log=lambda _: None)
    return run_candidate("cnn", data, config, tmp_path_factory.mktemp("runs"), log=print)


def test_cnn_learns_the_generated_signal(cnn_result) -> None:
    assert cnn_result.status == "ok", cnn_result.error
    assert cnn_result.validation["roc_auc"] > 0.75
    assert cnn_result.test["roc_auc"] > 0.7
    assert cnn_result.history["loss"][-1] < cnn_result.history["loss"][0]


def test_candidate_run_reports_metrics_threshold_and_artifacts(cnn_result) -> None:
    assert cnn_result.validation["recall"] >= 0.95  # the tuned threshold keeps the target
    assert 0 < cnn_result.score <= 1
    # The test score the gate compares is logged with its interval (2·recall + specificity)/3 by default.
    test = cnn_result.test
    assert test["selection_score"] == pytest.approx((2 * test["recall"] + test["specificity"]) / 3)
    assert set(cnn_result.history) >= {"loss", "val_loss", "auc", "val_auc"}
    for name in ("confusion_matrix", "roc", "pr", "training_curves"):
        assert Path(cnn_result.artifacts[name]).stat().st_size > 0
    table = format_leaderboard(leaderboard([cnn_result]))
    assert "cnn" in table and f"{cnn_result.score:.3f}" in table


def test_nan_loss_is_reported_as_divergence() -> None:
    images = tf.data.Dataset.from_tensor_slices(
        (np.full((8, 40, 40, 3), np.nan, np.float32), np.ones(8, np.float32))).batch(4)
    config = TrainConfig(image_size=40, epochs=3, class_weights=False)
    with pytest.raises(TrainingDiverged, match="NaN"):
        train_candidate("cnn", images, images, config, train_images=8, log=lambda _: None)


def test_failed_candidate_is_recorded_and_others_rank(small_dataset: Path, tmp_path: Path, cnn_result) -> None:
    config = TrainConfig(image_size=40, epochs=1, vgg16_weights=str(tmp_path / "missing.h5"))
    data = prepare_source(str(small_dataset), Settings(home=tmp_path), config, log=lambda _: None)
    failed = run_candidate("vgg16", data, config, tmp_path, log=lambda _: None)
    assert failed.status == "failed" and "missing.h5" in failed.error
    assert best_candidate([failed, cnn_result]) is cnn_result
    assert best_candidate([failed]) is None
    table = leaderboard([failed, cnn_result])
    assert table["model"].tolist() == ["cnn", "vgg16"] and table["status"][1].startswith("failed")


def test_a_tied_score_goes_to_the_higher_validation_auc(cnn_result) -> None:
    # 97 validation images often give several candidates the same score (all at specificity 1.0).
    weaker = dataclasses.replace(cnn_result, name="dense", validation={**cnn_result.validation, "roc_auc": 0.5})
    stronger = dataclasses.replace(cnn_result, name="vgg16", validation={**cnn_result.validation, "roc_auc": 0.99})
    assert best_candidate([weaker, stronger]) is stronger and best_candidate([stronger, weaker]) is stronger
    assert leaderboard([weaker, stronger])["model"].tolist() == ["vgg16", "dense"]  # shown in the order promoted


def test_short_subsets_fail_early_with_the_counts(small_dataset: Path) -> None:
    from pneumo.data.images import assign_subsets
    from pneumo.errors import DataError
    from pneumo.pipeline import check_subsets
    from tests.plugins.data import local_manifest

    frame = assign_subsets(local_manifest(small_dataset))
    check_subsets(frame, min_per_class=2)  # the generated dataset is big enough
    no_test_normals = frame[~((frame["subset"] == "test") & (frame["label"] == 0))]
    with pytest.raises(DataError, match=r"test/NORMAL=0"):
        check_subsets(no_test_normals, min_per_class=2)
    with pytest.raises(DataError, match=r"train/NORMAL=\d+"):
        check_subsets(frame, min_per_class=10_000)
