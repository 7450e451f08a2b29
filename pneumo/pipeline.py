"""The plain-Python retraining steps the flows wire together: prepare data, run a candidate, rank."""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pneumo.config import TrainConfig
from pneumo.data import Manifest, assign_subsets, build_manifest, class_weights, counts_by
from pneumo.errors import DataError
from pneumo.layout import CLASSES

Log = Callable[[str], None]


@dataclass
class PreparedData:
    """A validated dataset with its subsets assigned, ready for any candidate."""

    root: Path
    frame: pd.DataFrame  # manifest rows plus the ``subset`` column
    report: dict[str, Any]
    class_weight: dict[int, float]


def data_report(manifest: Manifest, frame: pd.DataFrame) -> dict[str, Any]:
    """Counts per on-disk split and per subset, what was skipped and why, and the bad files."""
    return {
        "images": int(len(frame)),
        "patients": int(frame["patient_id"].nunique()),
        "splits": counts_by(frame, "split"),
        "subsets": counts_by(frame, "subset"),
        "skipped": manifest.skipped_counts(),
        "bad_images": [asdict(item) for item in manifest.bad_images()],
    }


def check_subsets(frame: pd.DataFrame, min_per_class: int = 2) -> None:
    """Fail early when a subset or a class is empty or too small to train or evaluate on.

    Raises:
        DataError: naming each subset/class that is short.
    """
    counts = counts_by(frame, "subset")
    short = [
        f"{subset}/{label}={counts.get(subset, {}).get(label, 0)}"
        for subset in ("train", "validation", "test")
        for label in CLASSES
        if counts.get(subset, {}).get(label, 0) < min_per_class
    ]
    if short:
        raise DataError(f"too few images (need ≥{min_per_class} per subset and class): {', '.join(short)}")


def prepare_data(
    root: Path, config: TrainConfig, *, manifest: Manifest | None = None, min_per_class: int = 2,
    log: Log = print,
) -> PreparedData:
    """Manifest (or a given one), patient-grouped validation carve, checks and class weights."""
    if manifest is None:
        log(f"checking images under {root} ...")
        manifest = build_manifest(Path(root))
    frame = assign_subsets(manifest.frame, config.val_fraction, config.seed)
    report = data_report(manifest, frame)
    for item in report["bad_images"]:
        log(f"skipped bad image {item['path']}: {item['reason']}")
    check_subsets(frame, min_per_class)
    return PreparedData(root=Path(root), frame=frame, report=report, class_weight=class_weights(frame))


@dataclass
class CandidateResult:
    """Everything one candidate produced; small and JSON-friendly except for ``model``."""

    name: str
    status: str  # "ok" or "failed"
    error: str = ""
    threshold: float = 0.5
    threshold_reached: bool = False
    score: float = float("nan")
    validation: dict[str, float] = field(default_factory=dict)  # at the tuned threshold
    test: dict[str, float] = field(default_factory=dict)  # at the tuned threshold
    test_at_05: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_second: float = 0.0
    artifacts: dict[str, str] = field(default_factory=dict)
    model: Any = None  # the trained keras.Model (not serialized)

    def summary(self) -> dict[str, Any]:
        """JSON-ready view without the model."""
        data = asdict(self)
        data.pop("model")
        return data


def predict(model: Any, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """Labels and pneumonia probabilities, read from the same batches so they stay aligned."""
    labels, probs = [], []
    for images, batch_labels in dataset:
        probs.append(np.asarray(model(images, training=False), dtype=np.float64).ravel())
        labels.append(np.asarray(batch_labels).ravel())
    return np.concatenate(labels).astype(int), np.concatenate(probs)


def run_candidate(
    name: str, data: PreparedData, config: TrainConfig, out_dir: Path, *, log: Log = print,
) -> CandidateResult:
    """Train one candidate, tune its threshold on validation, measure validation and test, plot.

    Any exception is captured into a ``failed`` result (the failure policy keeps the other
    candidates going); the traceback goes to the log.
    """
    from pneumo import evaluate
    from pneumo.data import subset_dataset
    from pneumo.train import train_candidate

    started = time.perf_counter()
    out_dir = Path(out_dir) / name
    try:
        datasets = {
            subset: subset_dataset(data.root, data.frame, subset, image_size=config.image_size,
                                   batch_size=config.batch_size, augment=config.augment, seed=config.seed)
            for subset in ("train", "validation", "test")
        }
        trained = train_candidate(
            name, datasets["train"], datasets["validation"], config,
            train_images=int((data.frame["subset"] == "train").sum()),
            class_weight=data.class_weight, log=log,
        )
        val_true, val_prob = predict(trained.model, datasets["validation"])
        test_true, test_prob = predict(trained.model, datasets["test"])
        threshold, reached = evaluate.tune_threshold(val_true, val_prob, config.recall_target)
        validation = evaluate.compute_metrics(val_true, val_prob, threshold)
        test = evaluate.compute_metrics(test_true, test_prob, threshold)
        score = evaluate.selection_score(validation["recall"], validation["specificity"], config.score_weight)
        artifacts = {
            "confusion_matrix": evaluate.plot_confusion_matrix(test, out_dir / "confusion_matrix.png",
                                                               f"{name}: test @ {threshold:.3f}"),
            "roc": evaluate.plot_roc(test_true, test_prob, out_dir / "roc.png", f"{name}: test ROC"),
            "pr": evaluate.plot_pr(test_true, test_prob, out_dir / "pr.png", f"{name}: test PR"),
            "training_curves": evaluate.plot_history(trained.history, out_dir / "training_curves.png", name),
        }
        result = CandidateResult(
            name=name, status="ok", threshold=threshold, threshold_reached=reached, score=score,
            validation=validation, test=test, test_at_05=evaluate.compute_metrics(test_true, test_prob, 0.5),
            history=trained.history, params=trained.params, seconds=time.perf_counter() - started,
            images_per_second=trained.images_per_second,
            artifacts={key: str(path) for key, path in artifacts.items()}, model=trained.model,
        )
        metrics_file = out_dir / "metrics.json"
        metrics_file.write_text(json.dumps(result.summary(), indent=2, default=str))
        result.artifacts["metrics"] = str(metrics_file)
        log(f"[{name}] done: score {score:.3f}, threshold {threshold:.3f}, "
            f"test recall {test['recall']:.3f}, specificity {test['specificity']:.3f}")
        return result
    except Exception as error:  # noqa: BLE001 - the failure policy records every candidate failure
        log(f"[{name}] FAILED: {type(error).__name__}: {error}\n{traceback.format_exc()}")
        return CandidateResult(name=name, status="failed", error=f"{type(error).__name__}: {error}",
                               seconds=time.perf_counter() - started)


LEADERBOARD_COLUMNS = ("model", "status", "accuracy", "recall", "specificity", "f2", "auc", "score", "threshold")


def leaderboard(results: Sequence[CandidateResult | Mapping[str, Any]]) -> pd.DataFrame:
    """One row per candidate (test metrics at the tuned threshold), best selection score first.

    Args:
        results: candidate results, or their :meth:`CandidateResult.summary` dicts (as flows pass them).
    """
    rows = []
    for result in results:
        summary = result.summary() if isinstance(result, CandidateResult) else result
        ok = summary["status"] == "ok"
        test = summary.get("test") or {}
        rows.append({
            "model": summary["name"], "status": "ok" if ok else f"failed: {summary['error'][:200]}",
            "accuracy": test.get("accuracy"), "recall": test.get("recall"),
            "specificity": test.get("specificity"), "f2": test.get("f2"), "auc": test.get("roc_auc"),
            "score": summary["score"] if ok else None, "threshold": summary["threshold"] if ok else None,
        })
    frame = pd.DataFrame(rows, columns=list(LEADERBOARD_COLUMNS))
    return frame.sort_values("score", ascending=False, na_position="last", ignore_index=True)


def best_candidate(results: list[CandidateResult]) -> CandidateResult | None:
    """The successful candidate with the highest selection score (validation), if any."""
    survivors = [r for r in results if r.status == "ok" and np.isfinite(r.score)]
    return max(survivors, key=lambda r: r.score, default=None)


def format_leaderboard(frame: pd.DataFrame) -> str:
    """Fixed-width text table; score is on validation, the other metrics on test."""
    def cell(value: Any) -> str:
        return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else (
            f"{value:.3f}" if isinstance(value, float) else str(value))

    header = f"{'model':<10}{'accuracy':>9}{'recall':>8}{'spec':>7}{'F2':>7}{'AUC':>7}{'score':>7}{'thresh':>8}  status"
    lines = [header, "-" * len(header)]
    for row in frame.itertuples(index=False):
        lines.append(f"{row.model:<10}{cell(row.accuracy):>9}{cell(row.recall):>8}{cell(row.specificity):>7}"
                     f"{cell(row.f2):>7}{cell(row.auc):>7}{cell(row.score):>7}{cell(row.threshold):>8}  {row.status}")
    return "\n".join(lines)
