"""Metric definitions against the seed article's confusion matrices; threshold tuning; score; plots."""

from __future__ import annotations

import numpy as np
import pytest

from pneumo.evaluation.metrics import (
    compute_metrics, confusion_metrics, plot_confusion_matrix, plot_history, plot_pr, plot_roc,
    selection_score, tune_threshold,
)


@pytest.mark.parametrize(
    ("matrix", "accuracy", "recall", "specificity"),
    [
        ([[154, 80], [2, 388]], 86.86, 99.49, 65.81),  # seed article, small CNN
        ([[199, 35], [6, 384]], 93.43, 98.46, 85.04),  # seed article, deeper CNN with dropout
    ],
)
def test_seed_article_numbers(matrix, accuracy, recall, specificity) -> None:
    (tn, fp), (fn, tp) = matrix
    metrics = confusion_metrics(tn, fp, fn, tp)
    assert round(100 * metrics["accuracy"], 2) == accuracy
    assert round(100 * metrics["recall"], 2) == recall
    assert round(100 * metrics["specificity"], 2) == specificity
    assert metrics["youden_j"] == pytest.approx(metrics["recall"] + metrics["specificity"] - 1)


def test_f2_weighs_recall_over_precision() -> None:
    metrics = confusion_metrics(tn=50, fp=50, fn=0, tp=100)  # precision 2/3, recall 1
    assert metrics["f1"] == pytest.approx(0.8)
    assert metrics["f2"] == pytest.approx(5 * (2 / 3) / (4 * (2 / 3) + 1))
    assert metrics["f2"] > metrics["f1"]


def test_compute_metrics_from_probabilities() -> None:
    y_true = [0, 0, 0, 1, 1, 1]
    y_prob = [0.1, 0.4, 0.6, 0.55, 0.8, 0.9]
    metrics = compute_metrics(y_true, y_prob, threshold=0.5)
    assert (metrics["tn"], metrics["fp"], metrics["fn"], metrics["tp"]) == (2, 1, 0, 3)
    assert metrics["roc_auc"] == pytest.approx(8 / 9)
    strict = compute_metrics(y_true, y_prob, threshold=0.7)
    assert (strict["tn"], strict["fp"], strict["fn"], strict["tp"]) == (3, 0, 1, 2)


def test_compute_metrics_rejects_misaligned_or_nan_input() -> None:
    with pytest.raises(ValueError, match="labels but"):
        compute_metrics([0, 1], [0.5])
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics([0, 1], [0.5, float("nan")])


def test_threshold_is_highest_specificity_meeting_recall_target() -> None:
    rng = np.random.default_rng(0)
    y_true = np.r_[np.zeros(200, int), np.ones(200, int)]
    y_prob = np.r_[rng.beta(2, 5, 200), rng.beta(5, 2, 200)]
    threshold, reached = tune_threshold(y_true, y_prob, recall_target=0.95)
    assert reached
    at = compute_metrics(y_true, y_prob, threshold)
    assert at["recall"] >= 0.95
    # Any higher candidate threshold drops below the target: this one has the best specificity.
    higher = np.unique(y_prob[y_prob > threshold]).min()
    assert compute_metrics(y_true, y_prob, higher)["recall"] < 0.95
    assert compute_metrics(y_true, y_prob, higher)["specificity"] >= at["specificity"]


def test_threshold_fallback_without_both_classes() -> None:
    assert tune_threshold([1, 1, 1], [0.2, 0.3, 0.9], 0.95) == (0.5, False)


def test_selection_score_ranks_seed_models_as_the_article() -> None:
    # (recall, specificity) of the seed's CNN, deeper CNN and VGG16 on the official test set.
    cnn, cnn_deep, vgg16 = (0.995, 0.658), (0.985, 0.850), (0.995, 0.756)
    scores = {name: selection_score(*pair) for name, pair in
              {"cnn": cnn, "cnn_deep": cnn_deep, "vgg16": vgg16}.items()}
    assert max(scores, key=scores.get) == "cnn_deep"
    assert selection_score(1.0, 0.0, weight=2) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        selection_score(0.5, 0.5, weight=-1)


def test_plots_are_written_as_png(tmp_path) -> None:
    y_true = [0, 0, 1, 1, 1]
    y_prob = [0.2, 0.6, 0.4, 0.8, 0.9]
    paths = [
        plot_confusion_matrix(compute_metrics(y_true, y_prob, 0.5), tmp_path / "cm.png"),
        plot_roc(y_true, y_prob, tmp_path / "roc.png"),
        plot_pr(y_true, y_prob, tmp_path / "pr.png"),
        plot_history({"loss": [0.7, 0.5], "val_loss": [0.8, 0.6], "auc": [0.6, 0.8]}, tmp_path / "h.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 2000
