"""Post-hoc probability calibration (temperature or Platt scaling), its metrics and reliability plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit
from sklearn.model_selection import StratifiedKFold

from pneumo.evaluation.metrics import _figure, _save

EPS = 1e-7  # float32 sigmoids saturate to exactly 0 or 1; clipping keeps their logit finite (±16.1)
ECE_BINS = 15
METHODS = ("identity", "temperature", "platt")
# Below this many images of either class there is too little to fit, or to cross-validate the
# choice of method (5 folds need ≥ 5 per class), so fit_calibrator keeps the raw probabilities.
MIN_PER_CLASS = 5
CV_FOLDS = 5
# "auto" keeps the simpler method unless the richer one's cross-validated NLL is lower by more
# than this (nats per image): a 2-parameter fit must earn its extra parameter.
AUTO_TOLERANCE = 1e-3
_LOG_T_BOUNDS = (np.log(1e-2), np.log(1e2))
_BIAS_BOUNDS = (-20.0, 20.0)


def _arrays(y_true: Sequence[int], y_prob: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(y_true, dtype=int).ravel()
    probs = np.asarray(y_prob, dtype=np.float64).ravel()
    if labels.shape != probs.shape:
        raise ValueError(f"{labels.size} labels but {probs.size} probabilities")
    if labels.size == 0:
        raise ValueError("no labels to calibrate against")
    if not np.all(np.isfinite(probs)) or np.any((probs < 0) | (probs > 1)):
        raise ValueError("probabilities must be finite and within [0, 1]")
    if np.any((labels != 0) & (labels != 1)):
        raise ValueError("labels must be 0 (NORMAL) or 1 (PNEUMONIA)")
    return labels, probs


def _logit(probs: np.ndarray) -> np.ndarray:
    clipped = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return np.log(clipped) - np.log1p(-clipped)


def reliability_curve(
    y_true: Sequence[int], y_prob: Sequence[float], bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of predicted PNEUMONIA probability: mean prediction, observed rate, count.

    A probability of exactly 1 joins the last bin; empty bins hold NaN.
    """
    labels, probs = _arrays(y_true, y_prob)
    index = np.minimum((probs * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(index, weights=probs, minlength=bins) / counts
        fraction_positive = np.bincount(index, weights=labels, minlength=bins) / counts
    return mean_predicted, fraction_positive, counts


def expected_calibration_error(y_true: Sequence[int], y_prob: Sequence[float], bins: int = ECE_BINS) -> float:
    """ECE of the PNEUMONIA probability: Σ_bins (n_b / N)·|observed rate − mean prediction|.

    This is the positive-class (reliability-diagram) form, not the top-label "confidence" form:
    a screening threshold is set on P(PNEUMONIA), so that is the number that must be calibrated.
    """
    mean_predicted, fraction_positive, counts = reliability_curve(y_true, y_prob, bins)
    filled = counts > 0
    gaps = np.abs(fraction_positive[filled] - mean_predicted[filled])
    return float(np.sum(counts[filled] * gaps) / np.sum(counts))


def brier_score(y_true: Sequence[int], y_prob: Sequence[float]) -> float:
    """Mean squared difference between the PNEUMONIA probability and the 0/1 label."""
    labels, probs = _arrays(y_true, y_prob)
    return float(np.mean((probs - labels) ** 2))


def log_loss(y_true: Sequence[int], y_prob: Sequence[float]) -> float:
    """Mean negative log-likelihood (nats), with probabilities clipped like :meth:`Calibrator.apply`."""
    labels, probs = _arrays(y_true, y_prob)
    return _nll(_logit(probs), labels.astype(np.float64))


@dataclass(frozen=True)
class Calibrator:
    """A monotone map of probabilities: ``sigmoid(logit(p) / temperature + bias)``.

    Temperature scaling has ``bias == 0``; Platt scaling's ``a·z + b`` is ``temperature = 1/a``,
    ``bias = b``. ``a`` is kept positive, so calibration never reorders images: ROC/PR AUC are
    unchanged and a threshold tuned on calibrated probabilities is a threshold on raw ones.
    """

    method: str
    temperature: float = 1.0
    bias: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if not np.isfinite(self.bias):
            raise ValueError(f"bias must be finite, got {self.bias}")

    @classmethod
    def identity(cls) -> Calibrator:
        """The calibrator that leaves probabilities as they are."""
        return cls("identity", 1.0, 0.0)

    @property
    def is_identity(self) -> bool:
        """True when :meth:`apply` returns its input unchanged."""
        return self.temperature == 1.0 and self.bias == 0.0

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (float64, same shape); raw 0/1 are clipped to [1e-7, 1 − 1e-7] first."""
        probs = np.asarray(probs, dtype=np.float64)
        if self.is_identity:
            return probs.copy()
        return expit(_logit(probs) / self.temperature + self.bias)

    def to_config(self) -> dict[str, str | float]:
        """Plain JSON-able numbers, e.g. for an MLflow pyfunc ``model_config["calibration"]``."""
        return {"method": self.method, "temperature": float(self.temperature), "bias": float(self.bias)}

    @classmethod
    def from_config(cls, config: Mapping[str, object] | None) -> Calibrator:
        """Inverse of :meth:`to_config`; ``None`` (a model logged without calibration) is the identity."""
        if config is None:
            return cls.identity()
        return cls(str(config["method"]), float(config.get("temperature", 1.0)), float(config.get("bias", 0.0)))


def _nll(scores: np.ndarray, targets: np.ndarray) -> float:
    # log(1 + e^s) − t·s is the cross-entropy of sigmoid(s), stable for any s.
    return float(np.mean(np.logaddexp(0.0, scores) - targets * scores))


def _fit_inputs(y_true: Sequence[int], y_prob: Sequence[float]) -> tuple[np.ndarray, np.ndarray] | None:
    """Logits and Platt's (1999) smoothed targets (N₊+1)/(N₊+2) and 1/(N₋+2); None for a single class.

    Without the smoothing a validation set the model separates perfectly drives the fitted temperature
    to zero and every calibrated probability to exactly 0 or 1; with it the fit stays finite.
    """
    labels, probs = _arrays(y_true, y_prob)
    positives = int(labels.sum())
    negatives = labels.size - positives
    if not positives or not negatives:
        return None
    return _logit(probs), np.where(labels == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))


def fit_temperature(y_true: Sequence[int], y_prob: Sequence[float]) -> Calibrator:
    """Temperature scaling: the ``T`` minimising NLL of ``sigmoid(logit(p) / T)`` (bounded search on log T).

    Returns the identity when the labels hold a single class (nothing to fit).
    """
    if (inputs := _fit_inputs(y_true, y_prob)) is None:
        return Calibrator.identity()
    logits, targets = inputs
    # NLL is unimodal in log T; bounded Brent needs no gradient and cannot step outside [0.01, 100].
    result = minimize_scalar(lambda log_t: _nll(logits * np.exp(-log_t), targets),
                             bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return Calibrator("temperature", float(np.exp(result.x)), 0.0)


def fit_platt(y_true: Sequence[int], y_prob: Sequence[float]) -> Calibrator:
    """Platt scaling: logistic regression ``sigmoid(a·logit(p) + b)`` with ``a > 0`` (fitted as log a).

    Returns the identity when the labels hold a single class (nothing to fit).
    """
    if (inputs := _fit_inputs(y_true, y_prob)) is None:
        return Calibrator.identity()
    logits, targets = inputs

    def loss_and_grad(params: np.ndarray) -> tuple[float, np.ndarray]:
        scale = np.exp(params[0])
        scores = scale * logits + params[1]
        residual = expit(scores) - targets  # d NLL / d score, per image
        grad = np.array([np.mean(residual * logits) * scale, np.mean(residual)])
        return _nll(scores, targets), grad

    result = minimize(loss_and_grad, x0=np.zeros(2), jac=True, method="L-BFGS-B",
                      bounds=[(-_LOG_T_BOUNDS[1], -_LOG_T_BOUNDS[0]), _BIAS_BOUNDS])
    log_scale, bias = result.x
    return Calibrator("platt", float(np.exp(-log_scale)), float(bias))


_FITTERS = {"identity": lambda labels, probs: Calibrator.identity(), "temperature": fit_temperature, "platt": fit_platt}


def cross_validated_nll(
    y_true: Sequence[int], y_prob: Sequence[float], folds: int = CV_FOLDS, seed: int = 0
) -> dict[str, float]:
    """Mean out-of-fold NLL per image (nats) of each method in :data:`METHODS`, keyed by method.

    Fits on k−1 stratified folds (seeded shuffle, so deterministic) and scores the held-out one;
    each class needs at least ``folds`` images.
    """
    labels, probs = _arrays(y_true, y_prob)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    totals = dict.fromkeys(METHODS, 0.0)
    for fit_rows, held_rows in splitter.split(probs.reshape(-1, 1), labels):
        for method, fit in _FITTERS.items():
            calibrated = fit(labels[fit_rows], probs[fit_rows]).apply(probs[held_rows])
            totals[method] += log_loss(labels[held_rows], calibrated) * held_rows.size
    return {method: total / labels.size for method, total in totals.items()}


def fit_calibrator(y_true: Sequence[int], y_prob: Sequence[float], method: str = "auto") -> Calibrator:
    """Fit a calibrator on validation labels and raw probabilities.

    ``"auto"`` measures instead of assuming: it takes the method with the lowest 5-fold
    cross-validated NLL (:func:`cross_validated_nll`), preferring the simpler of identity <
    temperature < Platt unless the richer one wins by more than :data:`AUTO_TOLERANCE`. On
    over-confidence alone temperature and Platt tie and temperature is kept; when the model's
    prior is also off (e.g. trained with class weights) Platt's bias wins; a model that is already
    calibrated keeps the identity, and so does one whose chosen map would not lower its
    validation ECE. Any method gives the identity when either class has fewer than
    :data:`MIN_PER_CLASS` images (a single class or a tiny validation set).
    """
    if method != "auto" and method not in METHODS:
        raise ValueError(f"calibration method must be 'auto' or one of {', '.join(METHODS)}, got {method!r}")
    labels, probs = _arrays(y_true, y_prob)
    positives = int(labels.sum())
    if min(positives, labels.size - positives) < MIN_PER_CLASS:
        return Calibrator.identity()
    if method != "auto":
        return _FITTERS[method](labels, probs)
    scores = cross_validated_nll(labels, probs)
    method = METHODS[0]
    for candidate in METHODS[1:]:
        if scores[candidate] < scores[method] - AUTO_TOLERANCE:
            method = candidate
    calibrator = _FITTERS[method](labels, probs)
    # NLL and binned ECE can disagree on a small validation set; a map that does not lower the
    # ECE it will be reported with has shown no benefit, so the raw probabilities are kept.
    if expected_calibration_error(labels, calibrator.apply(probs)) >= expected_calibration_error(labels, probs):
        return Calibrator.identity()
    return calibrator


def plot_reliability(
    y_true: Sequence[int],
    prob_before: Sequence[float],
    prob_after: Sequence[float],
    path: Path,
    title: str = "Reliability",
    bins: int = ECE_BINS,
) -> Path:
    """Reliability diagram PNG, raw vs calibrated, with each one's ECE and Brier, over a histogram."""
    fig, (curve, histogram) = _figure().subplots(2, 1, figsize=(4.5, 6), height_ratios=(3, 1), sharex=True)
    curve.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    edges = np.linspace(0, 1, bins + 1)
    for name, probs, marker in (("raw", prob_before, "o"), ("calibrated", prob_after, "s")):
        mean_predicted, fraction_positive, counts = reliability_curve(y_true, probs, bins)
        filled = counts > 0
        label = (f"{name}: ECE {expected_calibration_error(y_true, probs, bins):.3f}, "
                 f"Brier {brier_score(y_true, probs):.3f}")
        curve.plot(mean_predicted[filled], fraction_positive[filled], marker=marker, label=label)
        histogram.stairs(counts, edges, label=name)
    curve.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed PNEUMONIA rate", title=title)
    curve.legend(loc="upper left", fontsize="small")
    histogram.set(xlabel="predicted PNEUMONIA probability", ylabel="images", yscale="symlog")
    return _save(fig, path)
