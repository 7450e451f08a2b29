"""Confidence intervals for the evaluation metrics and the paired champion-vs-challenger test, resampled by patient."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Literal

import numpy as np

from pneumo.evaluation.metrics import compute_metrics, selection_score

METRICS: tuple[str, ...] = (
    "recall", "specificity", "precision", "accuracy", "f2", "roc_auc", "pr_auc", "selection_score",
)
Mode = Literal["superiority", "non-inferiority"]
Verdict = Literal["better", "not-better", "undecided"]
# A score-difference interval wider than this (10 points of score) says the test split is too small
# to tell; a narrower one straddling the bar says the challenger is not shown better.
WIDE_INTERVAL = 0.1


@dataclass(frozen=True)
class Interval:
    """A point estimate on the full data with its confidence interval and how the interval was made."""

    value: float
    low: float
    high: float
    method: str


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def wilson(successes: int, trials: int, confidence: float = 0.95, *, design_effect: float = 1.0) -> Interval:
    """Wilson score interval for a proportion, optionally widened for clustered trials.

    Unlike the normal interval and the percentile bootstrap it keeps its coverage near 0 and 1
    and does not collapse to a point when every trial succeeds (e.g. recall 390/390). With a
    design effect d the trials count as ``trials / d`` independent ones (the effective sample
    size of Korn & Graubard, 1998).
    """
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 ≤ successes ≤ trials and trials ≥ 1, got {successes}/{trials}")
    if not design_effect >= 1:
        raise ValueError(f"design effect must be ≥ 1, got {design_effect}")
    _check_confidence(confidence)
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    p = successes / trials
    n = trials / design_effect
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # Exact 0 and 1 at the edges: rounding would otherwise leave e.g. 1e-17 below a 0/n interval.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    method = f"wilson score, {confidence:.0%}"
    if design_effect > 1:
        method += f", patient design effect {design_effect:.2f} (effective n {n:.0f} of {trials})"
    return Interval(p, low, high, method)


def patient_design_effect(successes: Sequence[int], trials: Sequence[int]) -> float:
    """How much a proportion's variance grows because each patient contributes several correlated trials.

    The ratio estimator's between-patient (linearised) variance over the binomial variance,
    floored at 1 as Korn & Graubard (1998) do: chance anti-correlation must not narrow an
    interval. Without any failure or success the variance says nothing, so that also gives 1.
    Patients without trials are ignored; with at most one trial each the effect is exactly 1.
    """
    hits = np.asarray(successes, dtype=float).ravel()
    sizes = np.asarray(trials, dtype=float).ravel()
    if hits.shape != sizes.shape or np.any(hits < 0) or np.any(hits > sizes):
        raise ValueError("need one 0 ≤ successes ≤ trials pair per patient")
    hits, sizes = hits[sizes > 0], sizes[sizes > 0]
    total, n_patients = sizes.sum(), sizes.size
    p = hits.sum() / total if total else 0.0
    if np.all(sizes == 1) or p in (0.0, 1.0):
        return 1.0
    if n_patients == 1:  # one patient: its trials are as good as one
        return float(total)
    between = n_patients / (n_patients - 1) * np.sum((hits - p * sizes) ** 2) / total**2
    return max(1.0, float(between / (p * (1 - p) / total)))


def _prepare(y_true: Sequence[int], groups: Sequence[object]) -> tuple[np.ndarray, np.ndarray, int]:
    """Labels and each image's patient index 0..P-1 (validated), and P."""
    labels = np.asarray(y_true).ravel()
    patients = np.asarray(groups).ravel()
    if labels.size == 0:
        raise ValueError("no images")
    if patients.shape != labels.shape:
        raise ValueError(f"{labels.size} labels but {patients.size} patient ids")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (NORMAL) or 1 (PNEUMONIA)")
    _, patient_index = np.unique(patients, return_inverse=True)
    return labels.astype(int), patient_index.ravel(), int(patient_index.max()) + 1


def _replicate_counts(n_patients: int, replicates: int, seed: int) -> np.ndarray:
    """How often each patient is drawn in each replicate: a (replicates × patients) float matrix.

    Every replicate draws as many patients as there are, with replacement, so summing a patient's
    statistics times its count gives the statistics of the resampled data set.
    """
    if replicates < 1:
        raise ValueError(f"replicates must be ≥ 1, got {replicates}")
    draws = np.random.default_rng(seed).integers(0, n_patients, size=(replicates, n_patients))
    flat = (draws + n_patients * np.arange(replicates)[:, None]).ravel()
    # float so the later products run through BLAS; counts are small integers, exact in float64
    return np.bincount(flat, minlength=replicates * n_patients).reshape(replicates, n_patients).astype(float)


def _patient_confusion(labels: np.ndarray, predicted: np.ndarray, patient: np.ndarray, n_patients: int) -> np.ndarray:
    """Per-patient (tp, fp, fn, tn) counts, a (patients × 4) float matrix."""
    cell = np.where(labels == 1, np.where(predicted, 0, 2), np.where(predicted, 1, 3))
    return np.bincount(4 * patient + cell, minlength=4 * n_patients).reshape(n_patients, 4).astype(float)


def _f2_and_score(confusion: np.ndarray, score_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """F2 and selection score of each row of (replicates × 4) confusion counts; NaN where undefined.

    compute_metrics reports 0 for an empty denominator; for a replicate that is "undefined", not
    "zero", so it must not pull the percentile down.
    """
    tp, fp, fn, tn = confusion.T
    with np.errstate(divide="ignore", invalid="ignore"):
        # = f_beta(precision, recall, 2) in counts: the same number wherever precision or recall is defined
        f2 = 5 * tp / (5 * tp + 4 * fn + fp)
        score = (score_weight * tp / (tp + fn) + tn / (tn + fp)) / (score_weight + 1)
    return f2, score


def _ranking_aucs(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC AUC and average precision (sklearn's definitions) for each row of image weights.

    A replicate is the original images each repeated ``weight`` times; repeats tie, so it is
    enough to sum the weights of positives and negatives per distinct score, once per row.
    ``weights`` is (replicates × images); each result is (replicates,), NaN where a class is absent.
    """
    order = np.argsort(-probs, kind="stable")
    ranked = probs[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    ranked_weights = weights[:, order]
    positive = labels[order] == 1
    pos = np.add.reduceat(ranked_weights * positive, starts, axis=1)  # (replicates × distinct scores), high → low
    neg = np.add.reduceat(ranked_weights * ~positive, starts, axis=1)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        # Mann–Whitney: each positive beats the negatives scored lower and half-beats its ties.
        roc = (pos * (n_neg[:, None] - fp + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
        precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=pos > 0)
        average_precision = (pos * precision).sum(axis=1) / n_pos
    average_precision[n_neg == 0] = np.nan  # compute_metrics leaves AUCs undefined without both classes
    return roc, average_precision


def _percentile_bounds(samples: np.ndarray, confidence: float) -> tuple[float, float, int]:
    """Percentile interval of the finite samples, and how many were NaN (dropped)."""
    _check_confidence(confidence)
    finite = samples[~np.isnan(samples)]
    if finite.size == 0:
        return math.nan, math.nan, samples.size
    tail = 50 * (1 - confidence)
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high), samples.size - finite.size


def _bootstrap_method(replicates: int, seed: int, confidence: float, dropped: int, paired: bool = False) -> str:
    kind = "paired patient cluster bootstrap" if paired else "patient cluster bootstrap"
    method = f"{kind}, {replicates} replicates, seed {seed}, percentile {confidence:.0%}"
    return method + (f", {dropped} undefined replicates dropped" if dropped else "")


def metric_intervals(
    y_true: Sequence[int], y_prob: Sequence[float], threshold: float, groups: Sequence[object], *,
    score_weight: float = 2.0, replicates: int = 2000, seed: int = 0, confidence: float = 0.95,
) -> dict[str, Interval]:
    """Point estimates (equal to compute_metrics') and ``confidence`` intervals of ``METRICS``, by patient.

    A patient's images are correlated, so no interval treats them as independent (``groups`` holds
    each image's patient id). Proportions (recall, specificity, precision, accuracy) get a Wilson
    interval widened by the patient design effect: closed form, no Monte Carlo noise, and it keeps
    its coverage near 0 and 1 and on small splits, where the percentile bootstrap falls short.
    F2, the AUCs and the selection score get a patient cluster bootstrap percentile interval (with
    one image per patient, the ordinary bootstrap); replicates where a metric is undefined (no
    positive or no negative drawn) are dropped and counted in ``method``. 2000 replicates keep the
    bounds stable to 0.005 (docs/statistics.md has the figures); a fixed seed gives the same intervals.
    """
    labels, patient, n_patients = _prepare(y_true, groups)
    point = compute_metrics(labels, y_prob, threshold)  # validates probabilities; the values to report
    point["selection_score"] = selection_score(point["recall"], point["specificity"], score_weight)
    probs = np.asarray(y_prob, dtype=float).ravel()
    predicted = probs >= threshold

    intervals: dict[str, Interval] = {}
    correct = predicted == (labels == 1)
    trials = {
        "recall": labels == 1, "specificity": labels == 0, "precision": predicted, "accuracy": np.ones_like(predicted),
    }
    for name, mask in trials.items():
        if not mask.any():  # e.g. precision with nothing called PNEUMONIA
            intervals[name] = Interval(point[name], math.nan, math.nan, "undefined: no trials")
            continue
        hits = np.bincount(patient[mask], weights=correct[mask], minlength=n_patients)
        sizes = np.bincount(patient[mask], minlength=n_patients)
        design_effect = patient_design_effect(hits, sizes)
        interval = wilson(int(hits.sum()), int(sizes.sum()), confidence, design_effect=design_effect)
        intervals[name] = replace(interval, value=point[name])

    counts = _replicate_counts(n_patients, replicates, seed)
    samples = dict(zip(("f2", "selection_score"), _f2_and_score(
        counts @ _patient_confusion(labels, predicted, patient, n_patients), score_weight)))
    # In chunks of replicates so the (replicates × images) work arrays stay near 16 MB on big splits.
    chunk = max(1, 2_000_000 // labels.size)
    aucs = [_ranking_aucs(labels, probs, counts[start:start + chunk, patient]) for start in range(0, replicates, chunk)]
    samples["roc_auc"], samples["pr_auc"] = (np.concatenate(parts) for parts in zip(*aucs))
    for name in ("f2", "roc_auc", "pr_auc", "selection_score"):
        low, high, dropped = _percentile_bounds(samples[name], confidence)
        intervals[name] = Interval(point[name], low, high, _bootstrap_method(replicates, seed, confidence, dropped))
    return {name: intervals[name] for name in METRICS}


@dataclass(frozen=True)
class PairedComparison:
    """Challenger minus champion selection score on the same test images, with its paired interval."""

    diff: float
    low: float
    high: float
    p_better: float  # share of replicates where the challenger scores strictly higher
    n_images: int
    n_patients: int
    method: str

    def verdict(self, margin: float = 0.0, mode: Mode = "superiority") -> Verdict:
        """Whether the interval shows the challenger clears the gate, rules it out, or cannot tell.

        superiority: "better" when ``low > margin``; "not-better" when ``high ≤ margin`` (even the
        optimistic end does not clear it: an identical model, [0, 0], is never better); otherwise
        "undecided". non-inferiority: the bar is ``-margin`` instead, so "better" means "no worse
        than the margin allows", not "better than the champion". An undefined interval is "undecided".
        """
        bar = self._bar(margin, mode)
        if self.low > bar:
            return "better"
        if self.high <= bar:
            return "not-better"
        return "undecided"

    def describe(self, margin: float = 0.0, mode: Mode = "superiority") -> str:
        """The verdict as one line for the decision record, e.g. "better: difference 0.032 [0.011, 0.054] …"."""
        verdict, bar = self.verdict(margin, mode), self._bar(margin, mode)
        difference = f"difference {self.diff:.3f} [{self.low:.3f}, {self.high:.3f}]"
        if verdict == "undecided":
            if not (math.isfinite(self.low) and math.isfinite(self.high)):
                return f"cannot tell: the interval is undefined, {difference}"
            shown = "better" if mode == "superiority" else "non-inferior"
            line = f"not shown {shown}: {difference} straddles {bar:.3f}"
            # Only a wide interval is the split's fault; a narrow one straddling the bar is the answer.
            return line + ("; the interval is wide: a larger test split would narrow it"
                           if self.high - self.low > WIDE_INTERVAL else "")
        if mode == "superiority":
            if verdict == "better":
                return f"better: {difference} clears the margin {bar:.3f}"
            return f"not better: {difference} cannot clear the margin {bar:.3f}"
        if verdict == "better":
            return f"non-inferior: {difference} stays above {bar:.3f}"
        return f"inferior: {difference} is at or below {bar:.3f}"

    @staticmethod
    def _bar(margin: float, mode: Mode) -> float:
        if margin < 0 or math.isnan(margin):
            raise ValueError(f"margin must be ≥ 0, got {margin}")
        if mode == "superiority":
            return float(margin)
        if mode == "non-inferiority":
            return -float(margin)
        raise ValueError(f"mode must be 'superiority' or 'non-inferiority', got {mode!r}")


def paired_score_difference(
    y_true: Sequence[int], prob_new: Sequence[float], threshold_new: float,
    prob_old: Sequence[float], threshold_old: float, groups: Sequence[object], *,
    score_weight: float = 2.0, replicates: int = 2000, seed: int = 0, confidence: float = 0.95,
) -> PairedComparison:
    """Selection score of the challenger minus the champion's, with a paired patient bootstrap interval.

    Both models are scored on the same resampled patients in every replicate, so the variation
    they share (which patients happen to be easy) cancels and the interval is that of the
    difference, far narrower than comparing two separate intervals. Each model is judged at its own
    threshold; ``prob_old`` must list the same images in the same order. Decide with
    :meth:`PairedComparison.verdict`.
    """
    labels, patient, n_patients = _prepare(y_true, groups)
    counts = _replicate_counts(n_patients, replicates, seed)
    diff, replicate_diffs = 0.0, np.zeros(replicates)
    for sign, probs, threshold in ((1, prob_new, threshold_new), (-1, prob_old, threshold_old)):
        point = compute_metrics(labels, probs, threshold)  # also checks length and finiteness
        diff += sign * selection_score(point["recall"], point["specificity"], score_weight)
        predicted = np.asarray(probs, dtype=float).ravel() >= threshold
        confusion = counts @ _patient_confusion(labels, predicted, patient, n_patients)
        replicate_diffs += sign * _f2_and_score(confusion, score_weight)[1]
    low, high, dropped = _percentile_bounds(replicate_diffs, confidence)
    defined = replicate_diffs[~np.isnan(replicate_diffs)]
    return PairedComparison(
        diff=float(diff), low=low, high=high, p_better=float(np.mean(defined > 0)) if defined.size else math.nan,
        n_images=int(labels.size), n_patients=n_patients,
        method=_bootstrap_method(replicates, seed, confidence, dropped, paired=True),
    )
