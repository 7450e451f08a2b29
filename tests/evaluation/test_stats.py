"""Metric intervals by patient (Wilson with design effect, cluster bootstrap) and the paired promotion test."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from pneumo.evaluation.metrics import compute_metrics, selection_score
from pneumo.evaluation.stats import (
    METRICS, PairedComparison, metric_intervals, paired_score_difference, patient_design_effect, wilson,
)
from pneumo.evaluation.stats import _ranking_aucs

BOOTSTRAPPED = ("f2", "roc_auc", "pr_auc", "selection_score")


def _test_split(seed: int = 1, patient_spread: float = 1.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Kaggle-like test split: 234 NORMAL patients with one image, 390 PNEUMONIA images of 150 patients.

    A patient's images share a random effect, so they are correlated as real views of one chest are.
    """
    rng = np.random.default_rng(seed)
    sizes = rng.multinomial(390 - 150, np.ones(150) / 150) + 1
    groups = np.r_[[f"IM-{i:04d}" for i in range(234)], np.repeat([f"person{i}" for i in range(150)], sizes)]
    labels = np.r_[np.zeros(234, int), np.ones(390, int)]
    effect = np.r_[rng.normal(0, 1, 234), np.repeat(rng.normal(0, patient_spread, 150), sizes)]
    logit = np.where(labels == 1, 2.5, -1.5) + effect + rng.normal(0, 0.7, labels.size)
    return labels, np.round(1 / (1 + np.exp(-logit)), 3), groups


@pytest.fixture(scope="module")
def split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _test_split()


@pytest.fixture(scope="module")
def intervals(split) -> dict:
    labels, probs, groups = split
    return metric_intervals(labels, probs, 0.5, groups)


# --- Wilson and the design effect -------------------------------------------------------------

def test_wilson_matches_published_values_and_closed_forms() -> None:
    # Newcombe (1998), Stat Med 17:857, table II: 81/263 and 15/148
    assert (wilson(81, 263).low, wilson(81, 263).high) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert (wilson(15, 148).low, wilson(15, 148).high) == pytest.approx((0.0624, 0.1605), abs=5e-5)
    z2 = 1.959963984540054**2
    none, every = wilson(0, 10), wilson(390, 390)
    assert (none.low, none.high) == (0.0, pytest.approx(z2 / (10 + z2)))
    assert (every.low, every.high) == (pytest.approx(390 / (390 + z2)), 1.0)  # never [1, 1]
    assert wilson(81, 263, confidence=0.99).low < wilson(81, 263).low


def test_design_effect_counts_trials_as_fewer_independent_ones() -> None:
    widened = wilson(20, 100, design_effect=2.0)
    halved = wilson(10, 50)
    assert (widened.value, widened.low, widened.high) == pytest.approx((halved.value, halved.low, halved.high))
    assert "design effect 2.00 (effective n 50 of 100)" in widened.method


@pytest.mark.parametrize(
    ("successes", "trials", "message"),
    [(1, 0, "trials ≥ 1"), (5, 4, "successes ≤ trials"), (-1, 4, "successes ≤ trials")],
)
def test_wilson_rejects_impossible_counts(successes, trials, message) -> None:
    with pytest.raises(ValueError, match=message):
        wilson(successes, trials)


def test_wilson_rejects_a_design_effect_below_one_and_bad_confidence() -> None:
    with pytest.raises(ValueError, match="design effect"):
        wilson(1, 4, design_effect=0.5)
    with pytest.raises(ValueError, match="confidence"):
        wilson(1, 4, confidence=95)


def test_patient_design_effect() -> None:
    # 50 patients with 4 trials each, all hit or all miss: the 200 trials are worth 50 (× m/(m-1)).
    sizes = np.full(50, 4)
    assert patient_design_effect(np.r_[np.full(25, 4), np.zeros(25)], sizes) == pytest.approx(4 * 50 / 49)
    assert patient_design_effect([1, 0, 1, 1], [1, 1, 1, 1]) == 1.0  # one trial each: independent
    assert patient_design_effect([3, 2, 0], [3, 2, 0]) == 1.0  # no failure: nothing to estimate
    assert patient_design_effect([1, 2, 1, 2], [2, 4, 2, 4]) == 1.0  # less spread than binomial: floored
    assert patient_design_effect([2], [5]) == 5.0  # one patient counts once
    with pytest.raises(ValueError, match="per patient"):
        patient_design_effect([3], [2])


# --- metric intervals --------------------------------------------------------------------------

def test_values_are_compute_metrics_and_intervals_hold_them(split, intervals) -> None:
    labels, probs, _ = split
    point = compute_metrics(labels, probs, 0.5)
    assert tuple(intervals) == METRICS
    for name in METRICS[:-1]:
        assert intervals[name].value == point[name]
    assert intervals["selection_score"].value == selection_score(point["recall"], point["specificity"], 2.0)
    for name, interval in intervals.items():
        assert 0 <= interval.low <= interval.value <= interval.high <= 1, name


def test_method_per_metric(intervals) -> None:
    assert intervals["specificity"].method == "wilson score, 95%"  # NORMAL patients have one image each
    assert intervals["recall"].method.startswith("wilson score, 95%, patient design effect")
    for name in BOOTSTRAPPED:
        assert intervals[name].method == "patient cluster bootstrap, 2000 replicates, seed 0, percentile 95%"


def test_recall_interval_is_wilson_with_the_patients_design_effect(split, intervals) -> None:
    labels, probs, groups = split
    positive = labels == 1
    _, patient = np.unique(groups[positive], return_inverse=True)
    hits = np.bincount(patient, weights=probs[positive] >= 0.5)
    expected = wilson(int(hits.sum()), int(positive.sum()),
                      design_effect=patient_design_effect(hits, np.bincount(patient)))
    assert (intervals["recall"].low, intervals["recall"].high) == (expected.low, expected.high)


def test_fixed_seed_reproduces_and_bounds_are_stable_across_seeds(split, intervals) -> None:
    labels, probs, groups = split
    assert metric_intervals(labels, probs, 0.5, groups) == intervals
    other = metric_intervals(labels, probs, 0.5, groups, seed=1)
    for name in BOOTSTRAPPED:  # the docs promise bounds stable to 0.005 at 2000 replicates
        assert other[name] != intervals[name]
        assert abs(other[name].low - intervals[name].low) < 0.005, name
        assert abs(other[name].high - intervals[name].high) < 0.005, name
    assert other["recall"] == intervals["recall"]  # closed form: no seed in it


def test_cluster_bootstrap_is_wider_than_image_bootstrap_for_correlated_images(split, intervals) -> None:
    labels, probs, _ = split
    per_image = metric_intervals(labels, probs, 0.5, np.arange(labels.size))
    for name in ("recall", "accuracy", *BOOTSTRAPPED):
        by_patient = intervals[name].high - intervals[name].low
        assert by_patient > 1.1 * (per_image[name].high - per_image[name].low), name
    assert per_image["recall"].method == "wilson score, 95%"


def test_one_image_per_patient_is_the_ordinary_bootstrap() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(0.3 * labels + rng.random(200) * 0.7, 0, 1)
    named = metric_intervals(labels, probs, 0.5, [f"p{i:03d}" for i in range(200)], replicates=300)
    numbered = metric_intervals(labels, probs, 0.5, np.arange(200), replicates=300)
    assert named == numbered


def test_recall_coverage_by_simulation() -> None:
    """True recall 0.95; 150 patients with 1-8 correlated images each; 4000 test splits."""
    rng = np.random.default_rng(7)
    true_recall, concentration = 0.95, 5.0
    sizes = rng.poisson(1.6, 150) + 1
    # each patient's chance of being detected varies (beta around the true recall): correlated images
    chances = rng.beta(true_recall * concentration, (1 - true_recall) * concentration, size=(4000, 150))
    hits = rng.binomial(sizes, chances)
    covered = naive = 0
    for patient_hits in hits:
        successes = int(patient_hits.sum())
        interval = wilson(successes, int(sizes.sum()), design_effect=patient_design_effect(patient_hits, sizes))
        covered += interval.low <= true_recall <= interval.high
        plain = wilson(successes, int(sizes.sum()))
        naive += plain.low <= true_recall <= plain.high
    assert 0.93 <= covered / len(hits) <= 0.97
    assert naive / len(hits) < 0.92  # treating a patient's images as independent is overconfident


def test_ranking_aucs_match_sklearn_on_resampled_images() -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 300)
    probs = np.round(rng.random(300) * 0.6 + 0.4 * labels, 2)  # rounded: many ties
    weights = rng.integers(0, 3, size=(4, 300)).astype(float)
    roc, ap = _ranking_aucs(labels, probs, weights)
    for row in range(4):
        repeats = weights[row].astype(int)
        assert roc[row] == pytest.approx(roc_auc_score(labels, probs, sample_weight=weights[row]), abs=1e-12)
        expected = average_precision_score(np.repeat(labels, repeats), np.repeat(probs, repeats))
        assert ap[row] == pytest.approx(expected, abs=1e-12)
    only_negatives = _ranking_aucs(labels, probs, weights * (labels == 0))
    assert np.isnan(only_negatives).all()


def test_undefined_replicates_are_dropped_and_counted() -> None:
    # 3 PNEUMONIA and 3 NORMAL patients: about 1 replicate in 32 draws no PNEUMONIA patient at all
    labels = np.r_[1, 1, 1, 1, 0, 0, 0]
    probs = np.r_[0.9, 0.8, 0.4, 0.7, 0.2, 0.6, 0.1]
    groups = ["a", "a", "b", "c", "d", "e", "f"]
    result = metric_intervals(labels, probs, 0.5, groups)
    assert "undefined replicates dropped" in result["roc_auc"].method
    assert all(math.isfinite(result[name].low) for name in BOOTSTRAPPED)


def test_precision_without_predicted_positives_has_no_interval() -> None:
    result = metric_intervals([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], 0.9, [1, 2, 3, 4], replicates=50)
    assert result["precision"].value == 0.0  # as compute_metrics reports it
    assert math.isnan(result["precision"].low) and result["precision"].method == "undefined: no trials"


def test_metric_intervals_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="patient ids"):
        metric_intervals([0, 1], [0.2, 0.8], 0.5, ["a"])
    with pytest.raises(ValueError, match="labels must be"):
        metric_intervals([0, 2], [0.2, 0.8], 0.5, ["a", "b"])
    with pytest.raises(ValueError, match="NaN"):
        metric_intervals([0, 1], [0.2, math.nan], 0.5, ["a", "b"])


# --- the paired promotion test -------------------------------------------------------------------

def test_identical_model_is_never_superior(split) -> None:
    labels, probs, groups = split
    for seed in range(3):
        same = paired_score_difference(labels, probs, 0.5, probs.copy(), 0.5, groups, seed=seed)
        assert (same.diff, same.low, same.high, same.p_better) == (0.0, 0.0, 0.0, 0.0)
        for margin in (0.0, 0.01):
            assert same.verdict(margin, "superiority") == "not-better"
    assert same.verdict(0.01, "non-inferiority") == "better"  # no worse, so acceptable in that mode
    assert (same.n_images, same.n_patients) == (624, 384)
    assert same.method == "paired patient cluster bootstrap, 2000 replicates, seed 2, percentile 95%"


def test_clearly_better_challenger_is_better_and_the_champion_is_not(split) -> None:
    labels, probs, groups = split
    sharper = np.where(labels == 1, np.sqrt(probs), probs**2)  # more confident in the right direction
    better = paired_score_difference(labels, sharper, 0.5, probs, 0.5, groups)
    point = [compute_metrics(labels, p, 0.5) for p in (sharper, probs)]
    scores = [selection_score(m["recall"], m["specificity"]) for m in point]
    assert better.diff == pytest.approx(scores[0] - scores[1])
    assert better.low > 0.01 and better.p_better > 0.99
    assert better.verdict(0.01) == "better"
    assert better.describe(0.01).startswith(f"better: difference {better.diff:.3f} [")
    worse = paired_score_difference(labels, probs, 0.5, sharper, 0.5, groups)
    assert worse.verdict(0.0) == "not-better" and worse.p_better < 0.01
    assert worse.verdict(0.0, "non-inferiority") == "not-better"


def test_pairing_is_narrower_than_two_separate_intervals(split, intervals) -> None:
    labels, probs, groups = split
    rng = np.random.default_rng(2)
    noisy = np.clip(probs + rng.normal(0, 0.05, probs.size), 0, 1)
    paired = paired_score_difference(labels, noisy, 0.5, probs, 0.5, groups)
    alone = metric_intervals(labels, noisy, 0.5, groups)["selection_score"]
    # shared luck cancels: narrower than even one model's own interval, let alone two combined
    assert paired.high - paired.low < 0.75 * (alone.high - alone.low)


def test_small_test_split_is_undecided() -> None:
    labels = np.r_[np.ones(40, int), np.zeros(40, int)]
    champion = np.where(labels == 1, 0.8, 0.2)
    champion[:4] = 0.3  # misses 4 pneumonias
    challenger = champion.copy()
    challenger[:2], challenger[40:43] = 0.7, 0.6  # catches 2 of them but raises 3 false alarms
    small = paired_score_difference(labels, challenger, 0.5, champion, 0.5, np.arange(80))
    assert small.diff == pytest.approx((2 * 2 / 40 - 3 / 40) / 3)
    assert small.low < 0 < small.high
    assert small.verdict(0.0) == "undecided"
    assert small.high - small.low > 0.1  # 80 images: wide, so the split is what cannot tell
    assert small.describe(0.0) == (
        f"not shown better: difference {small.diff:.3f} [{small.low:.3f}, {small.high:.3f}] straddles 0.000; "
        "the interval is wide: a larger test split would narrow it"
    )


def test_a_narrow_interval_straddling_the_bar_is_not_blamed_on_the_split_size() -> None:
    from pneumo.evaluation.stats import PairedComparison

    narrow = PairedComparison(diff=-0.005, low=-0.021, high=0.011, p_better=0.3, method="paired bootstrap",
                              n_images=1000, n_patients=900)
    assert narrow.describe(0.0) == "not shown better: difference -0.005 [-0.021, 0.011] straddles 0.000"
    assert narrow.describe(0.02, "non-inferiority") == (
        "not shown non-inferior: difference -0.005 [-0.021, 0.011] straddles -0.020")
    undefined = PairedComparison(diff=math.nan, low=math.nan, high=math.nan, p_better=math.nan,
                                 method="paired bootstrap", n_images=2, n_patients=2)
    assert undefined.describe(0.0).startswith("cannot tell: the interval is undefined")


@pytest.mark.parametrize(
    ("low", "high", "margin", "mode", "verdict"),
    [
        (0.011, 0.05, 0.01, "superiority", "better"),
        (0.01, 0.05, 0.01, "superiority", "undecided"),  # the bound must clear the margin, not touch it
        (-0.02, 0.01, 0.01, "superiority", "not-better"),  # even the optimistic end does not clear it
        (-0.02, 0.03, 0.01, "superiority", "undecided"),
        (-0.009, 0.03, 0.01, "non-inferiority", "better"),
        (-0.03, 0.03, 0.01, "non-inferiority", "undecided"),
        (-0.05, -0.01, 0.01, "non-inferiority", "not-better"),
        (math.nan, math.nan, 0.0, "superiority", "undecided"),
    ],
)
def test_verdict_semantics(low, high, margin, mode, verdict) -> None:
    comparison = PairedComparison(diff=(low + high) / 2, low=low, high=high, p_better=0.5,
                                  n_images=100, n_patients=60, method="test")
    assert comparison.verdict(margin, mode) == verdict
    assert comparison.describe(margin, mode)


def test_describe_names_each_outcome() -> None:
    def comparison(low: float, high: float) -> PairedComparison:
        return PairedComparison((low + high) / 2, low, high, 0.5, 100, 60, "test")

    assert comparison(0.02, 0.04).describe(0.01) == "better: difference 0.030 [0.020, 0.040] clears the margin 0.010"
    assert comparison(-0.02, 0.0).describe(0.01).startswith("not better: difference -0.010")
    assert comparison(-0.01, 0.01).describe(0.02, "non-inferiority") == (
        "non-inferior: difference 0.000 [-0.010, 0.010] stays above -0.020"
    )
    assert comparison(-0.05, -0.03).describe(0.02, "non-inferiority").startswith("inferior: ")


def test_verdict_rejects_negative_margin_and_unknown_mode() -> None:
    comparison = PairedComparison(0.0, -0.01, 0.01, 0.5, 10, 10, "test")
    with pytest.raises(ValueError, match="margin"):
        comparison.verdict(-0.01)
    with pytest.raises(ValueError, match="mode"):
        comparison.verdict(0.01, "equivalence")  # type: ignore[arg-type]


def test_paired_rejects_misaligned_models(split) -> None:
    labels, probs, groups = split
    with pytest.raises(ValueError, match="labels but"):
        paired_score_difference(labels, probs[:-1], 0.5, probs, 0.5, groups)
