"""Model registry: register a retraining's best candidate, gate it against the champion, champion and rollback.

The only module that calls MLflow's registry API (besides the lock in :mod:`pneumo.lock`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from pneumo.config import Gate
from pneumo.errors import PromotionError
from pneumo.stats import Interval, PairedComparison, metric_intervals, paired_score_difference
from pneumo.lock import promotion_lock
from pneumo.mlflow_client import error_code, mlflow_client, one_line
from pneumo.pipeline import TestSet
from pneumo.runs import ranked_candidates
from pneumo.tracking import (
    SCORE_METRIC, TAG_CANDIDATE, TAG_FINGERPRINT, TAG_SERVING_MODEL, TAG_SOURCE, log_json, log_text,
)

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous-champion"
CHALLENGER = "challenger"
ALIASES: tuple[str, ...] = (CHAMPION, PREVIOUS, CHALLENGER)
DECISION_TAG = "pneumo.decision"
PREVIOUS_TAG = "pneumo.previous_champion"
REASON_TAG = "pneumo.decision.reason"
_EPSILON = 1e-9  # scores are means of counts: equal models must compare equal despite rounding


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


def floor_reasons(gate: Gate, candidate: Evaluation) -> list[str]:
    """Which test-metric floors ``candidate`` misses (on the interval's lower bound unless ``floors_on`` is point)."""
    found = []
    for metric, floor in (("recall", gate.min_recall), ("specificity", gate.min_specificity)):
        value = candidate.metrics[metric]
        if gate.floors_on == "lower-bound" and metric in candidate.intervals:
            low = candidate.intervals[metric].low
            if math.isfinite(low) and low + _EPSILON < floor:
                found.append(f"test {metric} {value:.4f} has its 95 % interval's lower bound {low:.4f} below the "
                             f"floor {floor:.4f}")
        elif value + _EPSILON < floor:
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
        """Whether ``champion`` moved to this candidate."""
        return self.passes and not self.dry_run

    @property
    def reason(self) -> str:
        """One line: why it was (not) promoted."""
        parts = list(self.reasons)
        if self.comparison is not None:
            parts.append(f"vs champion version {self.champion.version}: "  # type: ignore[union-attr]
                         + self.comparison.describe(self.gate.margin, self.gate.mode))
        elif not self.reasons:
            parts.append("passed the floors; there was no champion yet")
        return "; ".join(parts)

    @property
    def outcome(self) -> str:
        """``promoted``, ``challenger`` (registered, not promoted), ``undecided`` (registered as
        challenger: the test split cannot tell) or ``dry-run: would be …``."""
        verdict = "promoted" if self.passes else "undecided" if not self.reasons and self.verdict == "undecided" \
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
            "aliases": dict(self.aliases), "skipped_candidates": list(self.skipped),
        }


# ----------------------------------------------------------------------------- helpers
def _alias_version(client: Any, name: str, alias: str) -> Any:
    """The version an alias points to, or None (also when the model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error_code(error) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _aliases(client: Any, name: str) -> dict[str, str]:
    """``{alias: version}`` for our aliases."""
    return {alias: str(version.version) for alias in ALIASES
            if (version := _alias_version(client, name, alias)) is not None}


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name, description="Pneumonia vs normal chest X-ray classifier (pyfunc: images in, "
                              "probability + label out). Aliases: champion, previous-champion, challenger.")
    except MlflowException as error:
        if error_code(error) not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def evaluate_model(model_uri: str, test: TestSet, gate: Gate, *, version: str | None = None) -> Evaluation:
    """Score a served (pyfunc) model on encoded test images at the threshold stored with it, with intervals."""
    import mlflow.pyfunc

    from pneumo.evaluate import compute_metrics, selection_score

    model = mlflow.pyfunc.load_model(model_uri)
    threshold = float((model.model_config or {}).get("threshold", 0.5))
    probabilities = model.predict(list(test.images))["probability"].to_numpy()
    metrics = compute_metrics(test.labels, probabilities, threshold)
    intervals = metric_intervals(test.labels, probabilities, threshold, test.patients,
                                 score_weight=gate.score_weight, replicates=gate.replicates)
    return Evaluation(model_uri=model_uri, threshold=threshold, metrics=metrics, version=version,
                      score=selection_score(metrics["recall"], metrics["specificity"], gate.score_weight),
                      probabilities=probabilities, intervals=intervals)


def _own_model(client: Any, run: Any) -> str:
    """The served model a candidate run logged; refuses a tag that points at another run's model."""
    uri = run.data.tags[TAG_SERVING_MODEL]
    source_run = client.get_logged_model(uri.removeprefix("models:/")).source_run_id
    if source_run != run.info.run_id:
        raise PromotionError(f"its model {uri} was logged by run {source_run}, not by this candidate")
    return uri


def _evaluate_best(client: Any, ranked: Sequence[Any], test: TestSet, gate: Gate) -> tuple[Any, Evaluation, list[str]]:
    """The best-ranked candidate whose model loads and scores, and why better-ranked ones were skipped."""
    skipped: list[str] = []
    for run in ranked:
        try:
            return run, evaluate_model(_own_model(client, run), test, gate), skipped
        except Exception as error:  # noqa: BLE001 - a broken candidate must not block the next one
            name = run.data.tags.get(TAG_CANDIDATE, run.info.run_name)
            skipped.append(f"{name} (run {run.info.run_id}): {one_line(error)}")
            log.warning("skipping candidate %s: its model could not be evaluated", name)
    raise PromotionError("no candidate's model could be loaded and evaluated: " + "; ".join(skipped))


# ----------------------------------------------------------------------------- promotion
def promote(
    parent_run_id: str, test: TestSet, *, gate: Gate, model_name: str, run_ids: Collection[str] | None = None,
    tracking_uri: str | None = None, dry_run: bool = False, lock_timeout: float = 600.0,
) -> Decision:
    """Register the retraining's best candidate and move ``champion`` only if it passes the gate.

    The candidate is evaluated first (outside the lock; a candidate whose model fails to load is
    skipped for the next best); then, holding the promotion lock, the current champion is read
    afresh and evaluated on the same test images, the gate decides (floors, then a paired
    bootstrap of the score difference by patient: see :mod:`pneumo.stats`), and the registry
    changes: pass → ``champion`` moves to the new version and the old champion becomes
    ``previous-champion``; fail or undecided → the new version gets ``challenger`` and a tag with
    the reason.
    The decision is logged on the parent run. If any step fails, the new version is deleted and
    the aliases are put back, so nothing half-done remains.

    Args:
        parent_run_id: the retraining's parent run.
        test: encoded test images, labels and patient ids (the champion is measured on the same).
        gate: floors, margin, mode and score weight.
        model_name: registered model name.
        run_ids: only these child runs compete (default: every finished candidate of the retraining).
        tracking_uri: MLflow URI (default: the process-wide one).
        dry_run: decide and return without registering, moving aliases or logging.
        lock_timeout: seconds to wait for a concurrent promotion to finish.

    Raises:
        PromotionError: no candidate or test set, lock not obtained, or the registry failed
            (and was rolled back).
    """
    if not test.images or not len(test.images) == len(test.labels) == len(test.patients):
        raise PromotionError(f"need a non-empty test set with one label and patient per image (got "
                             f"{len(test.images)} images, {len(test.labels)} labels, {len(test.patients)} patients)")
    client = mlflow_client(tracking_uri)
    ranked = ranked_candidates(parent_run_id, run_ids, tracking_uri=tracking_uri)
    best, evaluation, skipped = _evaluate_best(client, ranked, test, gate)

    def decide() -> Decision:
        current = _alias_version(client, model_name, CHAMPION)
        champion = comparison = None
        if current is not None:
            champion = evaluate_model(f"models:/{model_name}/{current.version}", test, gate,
                                      version=str(current.version))
            comparison = paired_score_difference(
                test.labels, evaluation.probabilities, evaluation.threshold, champion.probabilities,
                champion.threshold, test.patients, score_weight=gate.score_weight, replicates=gate.replicates)
        return Decision(
            model_name=model_name, candidate=best.data.tags.get(TAG_CANDIDATE, best.info.run_name),
            run_id=best.info.run_id, parent_run_id=parent_run_id, dry_run=dry_run,
            reasons=floor_reasons(gate, evaluation), validation_score=float(best.data.metrics[SCORE_METRIC]),
            evaluation=evaluation, champion=champion, gate=gate, comparison=comparison,
            n_test_images=len(test.images), n_test_patients=len(set(test.patients)), skipped=skipped,
        )

    if dry_run:  # read-only: no lock, no registration
        decision = decide()
        decision.aliases = _aliases(client, model_name)
        return decision
    _ensure_registered_model(client, model_name)
    with promotion_lock(client, model_name, timeout=lock_timeout) as lease:
        decision = decide()  # the champion is read under the lock: never a stale view
        _apply(client, decision, best, lease)
    return decision


def _version_tags(decision: Decision, best: Any) -> dict[str, str]:
    metrics = decision.evaluation.metrics
    values = {
        "pneumo.selection_score": decision.validation_score, "pneumo.test_score": decision.evaluation.score,
        "pneumo.test_recall": metrics["recall"], "pneumo.test_specificity": metrics["specificity"],
        "pneumo.test_roc_auc": metrics.get("roc_auc", float("nan")), "pneumo.threshold": decision.evaluation.threshold,
    }
    values.update({f"pneumo.test_{name}.ci_{side}": bound for name in ("recall", "specificity", "roc_auc")
                   if name in decision.evaluation.intervals
                   for side, bound in zip(("low", "high"), _bounds(decision.evaluation.intervals[name]))})
    if (comparison := decision.comparison) is not None:
        values.update({"pneumo.score_diff": comparison.diff, "pneumo.score_diff.ci_low": comparison.low,
                       "pneumo.score_diff.ci_high": comparison.high, "pneumo.p_better": comparison.p_better})
    return {
        TAG_CANDIDATE: decision.candidate, **{key: repr(float(value)) for key, value in values.items()},
        "pneumo.n_test_images": str(decision.n_test_images), "pneumo.n_test_patients": str(decision.n_test_patients),
        "pneumo.gate": f"{decision.gate.mode}, margin {decision.gate.margin}, floors on {decision.gate.floors_on}",
        "pneumo.method": comparison.method if comparison else "",
        TAG_FINGERPRINT: best.data.tags.get(TAG_FINGERPRINT, ""), "pneumo.run_id": decision.run_id,
        "pneumo.parent_run_id": decision.parent_run_id,
    }


def _bounds(interval: Interval) -> tuple[float, float]:
    return interval.low, interval.high


def _card(client: Any, decision: Decision, best: Any) -> str:
    """The version's model card, from the candidate run and the retraining's data report."""
    import json
    import tempfile
    from pathlib import Path

    from pneumo.model_card import model_card

    report = None
    with tempfile.TemporaryDirectory(prefix="pneumo-card-") as tmp:
        try:
            report = json.loads(Path(client.download_artifacts(decision.parent_run_id, "data_report.json", tmp)).read_text())
        except Exception:  # noqa: BLE001 - a retraining logged without a report still gets a card
            log.warning("retraining %s has no data_report.json; the card omits the counts", decision.parent_run_id)
    return model_card(decision.record(), best.data.params, best.data.metrics, report,
                      best.data.tags.get(TAG_SOURCE, "?"), best.data.tags.get(TAG_FINGERPRINT, ""))


def _apply(client: Any, decision: Decision, best: Any, lease: Any) -> None:
    """Register, move aliases, tag and log; undo everything if any step fails.

    ``lease.ensure_held()`` before each registry write: a holder that lost its lease (it stalled
    past the ttl and someone took over) stops instead of writing over the new holder's work.
    """
    name = decision.model_name
    before = _aliases(client, name)
    created = None
    try:
        source, card = best.data.tags[TAG_SERVING_MODEL], _card(client, decision, best)
        lease.ensure_held()
        created = client.create_model_version(name, source=source, run_id=decision.run_id,
                                              tags=_version_tags(decision, best), description=card,
                                              model_id=source.removeprefix("models:/"))
        log_text(client, decision.run_id, "model_card.md", card)
        decision.version = str(created.version)
        verdict = decision.outcome
        lease.ensure_held()
        if decision.promoted:
            # previous-champion first: a kill between the two writes never leaves it stale.
            if decision.champion is not None:
                client.set_registered_model_alias(name, PREVIOUS, decision.champion.version)
                # Deleting a version drops its aliases; the tag remembers it so rollback can say so.
                client.set_registered_model_tag(name, PREVIOUS_TAG, decision.champion.version)
            client.set_registered_model_alias(name, CHAMPION, decision.version)
        else:
            client.set_registered_model_alias(name, CHALLENGER, decision.version)
        client.set_model_version_tag(name, decision.version, DECISION_TAG, verdict)
        client.set_model_version_tag(name, decision.version, REASON_TAG, decision.reason[:5000])
        decision.aliases = _aliases(client, name)
        _log_decision(client, decision)
    except BaseException as error:
        _undo(client, name, before, created)
        if isinstance(error, Exception):
            raise PromotionError(f"promotion of {decision.candidate} to {name} failed and was rolled back: "
                                 f"{one_line(error)}") from error
        raise


def _undo(client: Any, name: str, before: dict[str, str], created: Any) -> None:
    """Put the aliases back as they were and delete the version this promotion created."""
    for alias in ALIASES:
        try:
            if alias in before:
                client.set_registered_model_alias(name, alias, before[alias])
            elif _alias_version(client, name, alias) is not None:
                client.delete_registered_model_alias(name, alias)
        except Exception:  # noqa: BLE001 - keep undoing the rest; the original error is raised
            log.exception("could not restore alias %s of %s", alias, name)
    if created is not None:
        try:
            client.delete_model_version(name, str(created.version))
        except Exception:  # noqa: BLE001
            log.exception("could not delete version %s of %s", created.version, name)


def _log_decision(client: Any, decision: Decision) -> None:
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    tags = [RunTag("pneumo.promotion.decision", decision.outcome),
            RunTag("pneumo.promotion.version", decision.version or ""),
            RunTag("pneumo.promotion.candidate", decision.candidate),
            RunTag("pneumo.promotion.reason", decision.reason[:5000])]
    # The selected candidate's score on the parent too: a folded runs table can sort retrainings by it.
    metrics = [Metric("promotion.test_score", decision.evaluation.score, now, 0),
               Metric(SCORE_METRIC, decision.validation_score, now, 0)]
    if decision.champion is not None:
        tags.append(RunTag("pneumo.promotion.champion_version", decision.champion.version or ""))
        metrics.append(Metric("promotion.champion_test_score", decision.champion.score, now, 0))
    if (comparison := decision.comparison) is not None:
        metrics += [Metric(f"promotion.score_diff{suffix}", value, now, 0) for suffix, value in
                    (("", comparison.diff), (".ci_low", comparison.low), (".ci_high", comparison.high))]
    client.log_batch(decision.parent_run_id, metrics=metrics, tags=tags)
    log_json(client, decision.parent_run_id, "decision.json", decision.record(), "promotion")


# ----------------------------------------------------------------------------- champion, rollback
def _version_info(version: Any, aliases: dict[str, str]) -> dict[str, Any]:
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


def champion_info(model_name: str, *, tracking_uri: str | None = None) -> dict[str, Any] | None:
    """The current champion: version, metrics, threshold, source run; None when there is none."""
    client = mlflow_client(tracking_uri)
    version = _alias_version(client, model_name, CHAMPION)
    return None if version is None else _version_info(version, _aliases(client, model_name))


def _no_previous(client: Any, model_name: str) -> str:
    """Why there is nothing to roll back to: never a previous champion, or it was deleted."""
    from mlflow.exceptions import MlflowException

    try:
        remembered = (client.get_registered_model(model_name).tags or {}).get(PREVIOUS_TAG)
    except MlflowException:
        remembered = None
    if remembered:
        try:
            client.get_model_version(model_name, remembered)
        except MlflowException:
            return f"{model_name} version {remembered}, the previous champion, was deleted: nothing to roll back to"
    return f"{model_name} has no {PREVIOUS} version to roll back to"


def rollback(model_name: str, *, tracking_uri: str | None = None, lock_timeout: float = 600.0) -> dict[str, Any]:
    """Point ``champion`` back at ``previous-champion`` (under the promotion lock).

    The rolled-back version keeps its tags plus ``pneumo.rolled_back``; ``previous-champion``
    is removed, so a second rollback fails instead of flip-flopping.

    Returns:
        The new champion's :func:`champion_info`, plus ``rolled_back`` (the demoted version).

    Raises:
        PromotionError: there is no previous champion to go back to (or it was deleted), or its
            model does not load (the alias stays where it is).
    """
    import mlflow.pyfunc

    client = mlflow_client(tracking_uri)
    with promotion_lock(client, model_name, timeout=lock_timeout) as lease:
        previous = _alias_version(client, model_name, PREVIOUS)
        if previous is None:
            raise PromotionError(_no_previous(client, model_name))
        try:
            mlflow.pyfunc.load_model(f"models:/{model_name}/{previous.version}")
        except Exception as error:  # noqa: BLE001 - any failure means apps could not load it either
            raise PromotionError(f"{model_name} version {previous.version} ({PREVIOUS}) does not load, so the "
                                 f"champion stays: {one_line(error)}") from None
        current = _alias_version(client, model_name, CHAMPION)
        lease.ensure_held()
        client.set_registered_model_alias(model_name, CHAMPION, str(previous.version))
        client.delete_registered_model_alias(model_name, PREVIOUS)
        client.delete_registered_model_tag(model_name, PREVIOUS_TAG)
        if current is not None:
            client.set_model_version_tag(model_name, str(current.version), "pneumo.rolled_back",
                                         time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        info = _version_info(client.get_model_version(model_name, str(previous.version)),
                             _aliases(client, model_name))
    info["rolled_back"] = str(current.version) if current is not None else None
    return info
