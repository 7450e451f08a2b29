"""Metrics from probabilities and a threshold, threshold tuning, the selection score, and plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from pneumo.data.layout import CLASSES


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def f_beta(precision: float, recall: float, beta: float) -> float:
    """F-beta score; beta > 1 weighs recall more (F2 counts a missed pneumonia 4× a false alarm)."""
    return _ratio((1 + beta**2) * precision * recall, beta**2 * precision + recall)


def confusion_metrics(tn: int, fp: int, fn: int, tp: int) -> dict[str, float]:
    """The seed article's metrics from a confusion matrix, all as fractions in [0, 1].

    PNEUMONIA is the positive class: recall is sensitivity to pneumonia, specificity is the share
    of normal X-rays called normal. (The article printed specificity as a fraction while calling
    it a percentage; here every metric is a fraction.)
    """
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp),
        "accuracy": _ratio(tp + tn, tn + fp + fn + tp),
        "precision": precision,
        "recall": recall,
        "specificity": _ratio(tn, tn + fp),
        "f1": f_beta(precision, recall, 1.0),
        "f2": f_beta(precision, recall, 2.0),
        "youden_j": recall + _ratio(tn, tn + fp) - 1.0,
    }


def _as_arrays(y_true: Sequence[int], y_prob: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(y_true, dtype=int).ravel()
    probs = np.asarray(y_prob, dtype=float).ravel()
    if labels.shape != probs.shape:
        raise ValueError(f"{labels.size} labels but {probs.size} probabilities")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probabilities contain NaN or infinity")
    return labels, probs


def compute_metrics(y_true: Sequence[int], y_prob: Sequence[float], threshold: float = 0.5) -> dict[str, float]:
    """Confusion matrix and metrics at ``threshold`` (prob ≥ threshold → PNEUMONIA), plus ROC/PR AUC.

    AUCs are threshold-free; they are NaN when only one class is present.
    """
    labels, probs = _as_arrays(y_true, y_prob)
    predicted = probs >= threshold
    tp = int(np.sum(predicted & (labels == 1)))
    fp = int(np.sum(predicted & (labels == 0)))
    fn = int(np.sum(~predicted & (labels == 1)))
    tn = int(np.sum(~predicted & (labels == 0)))
    metrics = confusion_metrics(tn, fp, fn, tp)
    both_classes = len(np.unique(labels)) == 2
    metrics["roc_auc"] = float(roc_auc_score(labels, probs)) if both_classes else float("nan")
    metrics["pr_auc"] = float(average_precision_score(labels, probs)) if both_classes else float("nan")
    metrics["threshold"] = float(threshold)
    return metrics


def tune_threshold(y_true: Sequence[int], y_prob: Sequence[float], recall_target: float = 0.95) -> tuple[float, bool]:
    """The highest-specificity threshold whose recall on these (validation) labels is ≥ the target.

    Raising the threshold only lowers recall and raises specificity, so this is the largest
    candidate threshold (an observed probability) that still meets the target. Lowering the
    threshold to the smallest pneumonia probability always reaches any target, so the only
    fallback is data without both classes: then 0.5 is returned with ``reached=False``.
    """
    labels, probs = _as_arrays(y_true, y_prob)
    if len(np.unique(labels)) < 2:
        return 0.5, False
    positives = np.sort(probs[labels == 1])[::-1]
    # Predicting positives at prob ≥ t keeps every positive with prob ≥ t: the k-th largest
    # positive probability is the largest threshold with k true positives.
    needed = int(np.ceil(recall_target * positives.size - 1e-9))
    return float(positives[max(needed, 1) - 1]), True


def selection_score(recall: float, specificity: float, weight: float = 2.0) -> float:
    """Recall-weighted mean ``(w·recall + specificity) / (w + 1)``; w = 2 ranks the seed's models as it did."""
    if weight < 0:
        raise ValueError(f"score weight must be ≥ 0, got {weight}")
    return (weight * recall + specificity) / (weight + 1)


def _figure():  # matplotlib's default backend may want a display; Agg never does
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(metrics: Mapping[str, float], path: Path, title: str = "") -> Path:
    """Confusion matrix PNG with counts, rows = true class, columns = predicted class."""
    matrix = np.array([[metrics["tn"], metrics["fp"]], [metrics["fn"], metrics["tp"]]])
    fig, ax = _figure().subplots(figsize=(4, 4))
    ax.imshow(matrix, cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, int(count), ha="center", va="center",
                color="white" if count > matrix.max() / 2 else "black")
    ax.set_xticks([0, 1], CLASSES)
    ax.set_yticks([0, 1], CLASSES)
    ax.set(xlabel="predicted", ylabel="true", title=title or f"threshold {metrics.get('threshold', 0.5):.3f}")
    return _save(fig, path)


def plot_roc(y_true: Sequence[int], y_prob: Sequence[float], path: Path, title: str = "ROC") -> Path:
    """ROC curve PNG with its AUC."""
    labels, probs = _as_arrays(y_true, y_prob)
    fpr, tpr, _ = roc_curve(labels, probs)
    fig, ax = _figure().subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"AUC {roc_auc_score(labels, probs):.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (recall)", title=title)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_pr(y_true: Sequence[int], y_prob: Sequence[float], path: Path, title: str = "Precision-recall") -> Path:
    """Precision-recall curve PNG with average precision."""
    labels, probs = _as_arrays(y_true, y_prob)
    precision, recall, _ = precision_recall_curve(labels, probs)
    fig, ax = _figure().subplots(figsize=(4, 4))
    ax.plot(recall, precision, label=f"AP {average_precision_score(labels, probs):.3f}")
    ax.axhline(labels.mean(), linestyle="--", color="grey", label="always PNEUMONIA")
    ax.set(xlabel="recall", ylabel="precision", title=title)
    ax.legend(loc="lower left")
    return _save(fig, path)


def plot_history(history: Mapping[str, Sequence[float]], path: Path, title: str = "Training") -> Path:
    """Per-epoch training vs validation curves (loss and every tracked metric) as one PNG."""
    names = [key for key in history if not key.startswith("val_")]
    fig, axes = _figure().subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        epochs = range(1, len(history[name]) + 1)
        ax.plot(epochs, history[name], label="train")
        if f"val_{name}" in history:
            ax.plot(epochs, history[f"val_{name}"], label="validation")
        ax.set(title=name, xlabel="epoch")
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    plt = _figure()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
