"""The promotion gate's verdict: a served model scored on the test set, the floors, and the decision."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumo.config import Gate
from pneumo.errors import PromotionError
from pneumo.evaluation.stats import Interval, PairedComparison, metric_intervals, paired_score_difference
from pneumo.promotion.tracking import TAG_CANDIDATE, TAG_FINGERPRINT

if TYPE_CHECKING:
    from pneumo.evaluation.holdout import TestSet, TestSetChange

# Registry aliases the verdict sets: a passing candidate becomes champion, the one it replaces
# previous-champion; one that does not pass becomes challenger.
CHAMPION = "champion"
PREVIOUS = "previous-champion"
CHALLENGER = "challenger"
ALIASES: tuple[str, ...] = (CHAMPION, PREVIOUS, CHALLENGER)
# Test images read and scored per call. Peak memory of scoring is this many encoded files, plus
# the served model's own bound per call (pyfunc.CHUNK images decoded within DECODE_PIXEL_BUDGET,
# then one forward pass), plus 8 bytes per test image for the probabilities: independent of the
# split's size. At real size (JPEGs of ~0.2 MB) a chunk is ~13 MB of encoded bytes.
SCORE_CHUNK = 64
TAG_TEST_SET = "pneumo.test_set.sha256"  # version tag: the locked test set it was promoted on
RANK_DECIMALS = 4  # metrics are logged rounded to this (a person compares them); ranking uses the same digits
_EPSILON = 1e-9  # scores are means of counts: equal models must compare equal despite rounding


def selection_rank(score: float | None, validation_auc: float | None) -> tuple[float, float]:
    """Sort key of a candidate, higher is better: validation score, ties to the higher validation ROC AUC.

    A small validation set often gives several candidates the same score; ROC AUC is threshold-free.
    Missing or non-finite values rank last. Both are compared at :data:`RANK_DECIMALS`, the precision
    the candidate runs log them with, so the flow, the leaderboard and the registry rank alike.
    """
    def finite(value: float | None) -> float:
        return round(value, RANK_DECIMALS) if value is not None and math.isfinite(value) else -math.inf

    return finite(score), finite(validation_auc)


@dataclass
class Evaluation:
    """A served model scored now on a test set, at its own stored threshold."""

    model_uri: str
    threshold: float
    metrics: dict[str, float]
    score: float
    version: str | None = None
    probabilities: Any = None  # per test image, for the paired comparison
    intervals: dict[str, Interval] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)  # SHA-256 of the model files scored


def floor_reasons(gate: Gate, candidate: Evaluation) -> list[str]:
    """Which test-metric floors ``candidate`` misses (on the interval's lower bound unless ``floors_on`` is point)."""
    found = []
    for metric, floor in (("recall", gate.min_recall), ("specificity", gate.min_specificity)):
        value = candidate.metrics[metric]
        bounded = gate.floors_on == "lower-bound" and metric in candidate.intervals
        checked = candidate.intervals[metric].low if bounded else value
        if floor > 0 and not math.isfinite(checked):  # a floor that cannot be evaluated is not passed
            what = "95 % interval" if bounded else "value"
            found.append(f"test {metric} {value:.4f} cannot be checked against the floor {floor:.4f}: its {what} "
                         "is undefined (does the test split hold both classes?)")
        elif bounded and checked + _EPSILON < floor:
            found.append(f"test {metric} {value:.4f} has its 95 % interval's lower bound {checked:.4f} below the "
                         f"floor {floor:.4f}")
        elif not bounded and value + _EPSILON < floor:
            found.append(f"test {metric} {value:.4f} is below the floor {floor:.4f}")
    return found


@dataclass
class Decision:
    """The outcome of one promotion attempt (also logged as ``promotion/decision.json``)."""

    model_name: str
    candidate: str
    run_id: str
    parent_run_id: str
    dry_run: bool
    reasons: list[str]
    validation_score: float
    evaluation: Evaluation
    champion: Evaluation | None
    gate: Gate
    comparison: PairedComparison | None = None  # challenger − champion on the same test images
    n_test_images: int = 0
    n_test_patients: int = 0
    version: str | None = None  # the registered version (None on a dry run)
    aliases: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # better-ranked candidates that could not be evaluated
    test_set_digest: str = ""  # SHA-256 of the locked test set scored now (TestSet.digest)
    champion_test_set_digest: str | None = None  # the one the champion was promoted on; None: not recorded
    test_change: TestSetChange | None = None  # set when the two differ
    compared_on_shared: bool = False  # the paired comparison used only the images in both splits
    withheld: str | None = None  # why a person did not sign off (approval rejected or timed out): no promotion
    selected_because: str = ""  # one line: why this candidate was the one put to the gate (leaderboard.why_selected)

    @property
    def test_set_note(self) -> str:
        """Whether champion and candidate were compared on the champion's locked test set, and if not why."""
        if self.champion is None:
            return ""
        if self.champion_test_set_digest is None:
            return f"version {self.champion.version}'s test set was not recorded (registered before test-set hashes)"
        if self.test_change is None:
            return f"same locked test set as version {self.champion.version} (sha256 {self.test_set_digest[:12]})"
        where = (f"the {self.comparison.n_images} images both share" if self.comparison and self.compared_on_shared
                 else f"all {self.n_test_images} current images (too few are shared per class)")
        return (f"the test split changed since version {self.champion.version} was promoted "
                f"({self.test_change.describe()}): compared on {where}")

    @property
    def verdict(self) -> str:
        """``better`` / ``not-better`` / ``undecided`` from the paired test; ``better`` with no champion."""
        if self.comparison is None:
            return "better"
        return self.comparison.verdict(self.gate.margin, self.gate.mode)

    @property
    def passes(self) -> bool:
        """Floors met and the paired test clears the gate."""
        return not self.reasons and self.verdict == "better"

    @property
    def promoted(self) -> bool:
        """Whether ``champion`` moved to this candidate (never without the sign-off the gate asked for)."""
        return self.passes and not self.dry_run and self.withheld is None

    @property
    def reason(self) -> str:
        """One line: why it was (not) promoted."""
        parts = list(self.reasons) + ([f"not signed off: {self.withheld}"] if self.withheld else [])
        if self.comparison is not None:
            parts.append(f"vs champion version {self.champion.version}: "  # type: ignore[union-attr]
                         + self.comparison.describe(self.gate.margin, self.gate.mode))
        if self.test_set_note:
            parts.append(self.test_set_note)
        elif not self.reasons:
            parts.append("passed the floors; there was no champion yet")
        return "; ".join(parts)

    @property
    def outcome(self) -> str:
        """``promoted``, ``challenger`` (registered, not promoted), ``undecided`` (registered as
        challenger: the test split cannot tell) or ``dry-run: would be …``."""
        verdict = "challenger" if self.withheld else "promoted" if self.passes else "undecided" if not self.reasons and self.verdict == "undecided" \
            else "challenger"
        return f"dry-run: would be {verdict}" if self.dry_run else verdict

    def record(self) -> dict[str, Any]:
        """Flat JSON-ready summary (what flows, the CLI and the parent run's decision.json show)."""
        champion = self.champion
        return {
            "outcome": self.outcome, "promoted": self.promoted, "dry_run": self.dry_run, "reason": self.reason,
            "reasons": list(self.reasons), "model_name": self.model_name, "candidate": self.candidate,
            "version": self.version, "model_uri": self.evaluation.model_uri, "run_id": self.run_id,
            "parent_run_id": self.parent_run_id, "validation_score": self.validation_score,
            "why_selected": self.selected_because,
            "score": self.evaluation.score, "threshold": self.evaluation.threshold,
            "metrics": dict(self.evaluation.metrics),
            "intervals": {name: [i.low, i.high] for name, i in self.evaluation.intervals.items()},
            "n_test_images": self.n_test_images, "n_test_patients": self.n_test_patients,
            "gate": self.gate.model_dump(mode="json"),
            "score_diff": comparison.diff if (comparison := self.comparison) else None,
            "score_diff_ci_low": comparison.low if comparison else None,
            "score_diff_ci_high": comparison.high if comparison else None,
            "p_better": comparison.p_better if comparison else None,
            "method": comparison.method if comparison else None,
            "champion_version": champion.version if champion else None,
            "champion_score": champion.score if champion else None,
            "champion_metrics": dict(champion.metrics) if champion else None,
            "previous_champion": champion.version if champion and self.promoted else None,
            "aliases": dict(self.aliases), "skipped_candidates": list(self.skipped), "withheld": self.withheld,
            "test_set": {"sha256": self.test_set_digest, "champion_sha256": self.champion_test_set_digest,
                         "same": None if self.champion is None or self.champion_test_set_digest is None
                         else self.test_change is None, "note": self.test_set_note,
                         "change": None if self.test_change is None else {
                             "added": self.test_change.added, "removed": self.test_change.removed,
                             "shared": len(self.test_change.shared)}},
        }


def evaluate_model(model_uri: str, test: TestSet, gate: Gate, *, version: str | None = None,
                   expected: dict[str, str] | None = None) -> Evaluation:
    """Score a served (pyfunc) model on encoded test images at the threshold stored with it, with intervals.

    The model is downloaded once and its files hashed before loading: the checksums of what was
    scored are what registration records; with ``expected`` (a registered version's checksums)
    they are verified first (:class:`~pneumo.serving.integrity.IntegrityError` names what changed).
    """
    import tempfile

    import mlflow.artifacts
    import mlflow.pyfunc

    from pneumo.evaluation.metrics import compute_metrics, selection_score
    from pneumo.serving.integrity import file_digests, verify

    with tempfile.TemporaryDirectory(prefix="pneumo-gate-") as tmp:
        local = mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp)
        checksums = file_digests(local) if expected is None else verify(local, expected, model_uri)
        model = mlflow.pyfunc.load_model(local)
    threshold = float((model.model_config or {}).get("threshold", 0.5))
    served = model.unwrap_python_model()
    if not hasattr(served, "score"):
        raise PromotionError(f"{model_uri} is not pneumo's served model (no score method)")
    # One chunk of encoded images at a time, never the REST request cap: see SCORE_CHUNK.
    probabilities = np.concatenate([served.score(chunk)["probability"].to_numpy(dtype=np.float64)
                                    for chunk in test.chunks(SCORE_CHUNK)])
    metrics = compute_metrics(test.labels, probabilities, threshold)
    intervals = metric_intervals(test.labels, probabilities, threshold, test.patients,
                                 score_weight=gate.score_weight, replicates=gate.replicates)
    return Evaluation(model_uri=model_uri, threshold=threshold, metrics=metrics, version=version,
                      score=selection_score(metrics["recall"], metrics["specificity"], gate.score_weight),
                      probabilities=probabilities, intervals=intervals, checksums=checksums)


def compare(test: TestSet, candidate: Evaluation, champion: Evaluation | None, gate: Gate,
            on: Sequence[int] | None = None) -> PairedComparison | None:
    """The paired bootstrap of candidate − champion score on the same test images (None without a champion);
    ``on``: only these indices (the images a changed test split shares with the champion's)."""
    if champion is None:
        return None
    keep = np.arange(len(test.labels)) if on is None else np.asarray(on, dtype=int)
    labels, patients = np.asarray(test.labels)[keep], np.asarray(test.patients)[keep]
    return paired_score_difference(labels, np.asarray(candidate.probabilities)[keep], candidate.threshold,
                                   np.asarray(champion.probabilities)[keep], champion.threshold, patients,
                                   score_weight=gate.score_weight, replicates=gate.replicates)


def version_tags(decision: Decision, fingerprint: str) -> dict[str, str]:
    """The decision as tags of the registered version (what ``champion_info`` reads back)."""
    metrics = decision.evaluation.metrics
    values = {
        "pneumo.selection_score": decision.validation_score, "pneumo.test_score": decision.evaluation.score,
        "pneumo.test_recall": metrics["recall"], "pneumo.test_specificity": metrics["specificity"],
        "pneumo.test_roc_auc": metrics.get("roc_auc", float("nan")), "pneumo.threshold": decision.evaluation.threshold,
    }
    intervals = decision.evaluation.intervals
    values.update({f"pneumo.test_{name}.ci_{side}": getattr(intervals[name], side)
                   for name in ("recall", "specificity", "roc_auc") if name in intervals for side in ("low", "high")})
    if (comparison := decision.comparison) is not None:
        values.update({"pneumo.score_diff": comparison.diff, "pneumo.score_diff.ci_low": comparison.low,
                       "pneumo.score_diff.ci_high": comparison.high, "pneumo.p_better": comparison.p_better})
    return {
        # Rounded as a person reads them in the version page (the exact numbers are in the audit bundle).
        TAG_CANDIDATE: decision.candidate, **{key: f"{float(value):.4f}" for key, value in values.items()},
        "pneumo.n_test_images": str(decision.n_test_images), "pneumo.n_test_patients": str(decision.n_test_patients),
        "pneumo.gate": f"{decision.gate.mode}, margin {decision.gate.margin}, floors on {decision.gate.floors_on}",
        "pneumo.method": comparison.method if comparison else "",
        TAG_FINGERPRINT: fingerprint, "pneumo.run_id": decision.run_id, TAG_TEST_SET: decision.test_set_digest,
        "pneumo.parent_run_id": decision.parent_run_id,
    }


def version_info(version: Any, aliases: dict[str, str]) -> dict[str, Any]:
    """A registered version (an MLflow ``ModelVersion``) as the JSON ``pneumo champion`` prints."""
    tags = dict(version.tags or {})
    number = str(version.version)
    return {
        "model": version.name,
        "version": number,
        "aliases": sorted(alias for alias, value in aliases.items() if value == number),
        "candidate": tags.get(TAG_CANDIDATE),
        "threshold": float(tags["pneumo.threshold"]) if "pneumo.threshold" in tags else None,
        "metrics": {key.removeprefix("pneumo."): float(value) for key, value in tags.items()
                    if key.startswith(("pneumo.test_", "pneumo.selection_score")) and _is_float(value)},
        "decision": {key.removeprefix("pneumo."): float(value) if _is_float(value) else value
                     for key, value in tags.items() if key.startswith(("pneumo.score_diff", "pneumo.p_better",
                                                                       "pneumo.n_test_", "pneumo.method", "pneumo.gate"))},
        "run_id": version.run_id,
        "parent_run_id": tags.get("pneumo.parent_run_id"),
        "source": version.source,
        "dataset_fingerprint": tags.get(TAG_FINGERPRINT),
        "card": version.description or "",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(version.creation_timestamp / 1000)),
        "uri": f"models:/{version.name}@{CHAMPION}" if aliases.get(CHAMPION) == number
        else f"models:/{version.name}/{number}",
    }


def _is_float(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False
