"""The model card of a registered version: Markdown written from what the retraining logged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MAX_DESCRIPTION = 5000  # MLflow stores a version's description in a 5000-character column


def _metric(metrics: Mapping[str, float], key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return "–"
    low, high = metrics.get(f"{key}.ci_low"), metrics.get(f"{key}.ci_high")
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" if low is not None and high is not None else f"{value:.3f}"


def with_ci(value: float, bounds: Any = None) -> str:
    """``0.962 [0.910, 0.990]``: the card's one rounding."""
    return f"{value:.3f}" + (f" [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else "")


def _calibration(logged: str | None) -> str:
    """The calibration the served model applies, in words."""
    import json

    config = json.loads(logged) if logged else {}
    method = config.get("method", "identity")
    if method == "temperature":
        return f"temperature-scaled (T = {config.get('temperature', 1.0):.3f}, fitted on validation)"
    if method == "platt":
        return (f"Platt-scaled (slope {1 / config.get('temperature', 1.0):.3f}, bias {config.get('bias', 0.0):.3f}, "
                "fitted on validation)")
    return "uncalibrated (calibration did not help on validation)"


def _approval_section(record: Mapping[str, Any], approval: Mapping[str, Any] | None) -> list[str]:
    """Who signed off (or why nobody did), followed by a blank line; nothing when approval was not required."""
    from pneumo.promotion.approval import approval_lines

    lines = approval_lines(approval)
    if not lines and record.get("withheld"):  # the record alone still says why champion did not move
        lines = ["## Approval", f"- not signed off: {record['withheld']}"]
    return [*lines, ""] if lines else []


def model_card(record: Mapping[str, Any], run_params: Mapping[str, str], run_metrics: Mapping[str, float],
               data_report: Mapping[str, Any] | None, source: str, fingerprint: str,
               approval: Mapping[str, Any] | None = None, mlflow_ui: str | None = None) -> str:
    """The card as Markdown (under :data:`MAX_DESCRIPTION` characters, so it fits a version description).

    ``record`` is the promotion decision (``Decision.record()``); params and metrics are the candidate run's;
    ``approval`` the sign-off record (:mod:`pneumo.promotion.approval`) when the gate required one;
    ``mlflow_ui`` the MLflow UI's address the runs and versions named are linked to.
    """
    from pneumo.promotion.links import markdown_link, run_url, version_url

    def run(run_id: str) -> str:
        return markdown_link(f"`{run_id}`", run_url(mlflow_ui, run_id) if mlflow_ui else None)

    name, test = record["candidate"], record["metrics"]
    intervals = record.get("intervals") or {}
    gate = record.get("gate") or {}
    counts = (data_report or {}).get("subsets", {})
    lines = [
        f"# Model card: {record['model_name']} — {name}",
        "",
        "## Model details",
        f"- Architecture: `{name}` (the seed article's {name}); input {run_params.get('image_size', '?')}×"
        f"{run_params.get('image_size', '?')} RGB, 0..255 (decoded and resized by the served model).",
        f"- Parameters: {run_params.get('trainable_params', '?')} trainable, {run_params.get('non_trainable_params', '?')}"
        f" frozen; optimizer {run_params.get('optimizer', '?')} at {run_params.get('learning_rate', '?')}, "
        f"epochs run: {run_params.get('epochs_run', run_params.get('epochs', '?'))}.",
        f"- Output: probability of pneumonia, {_calibration(run_params.get('calibration'))}; "
        f"label PNEUMONIA at probability ≥ {record['threshold']:.4f} (tuned on validation for recall ≥ "
        f"{run_params.get('recall_target', '?')}).",
        f"- Trained in candidate run {run(record['run_id'])} of retraining {run(record['parent_run_id'])}.",
        "",
        "## Intended use",
        "- A screening aid that flags pediatric chest X-rays likely to show pneumonia for a clinician's review.",
        "- Not a diagnosis and not for use without a clinician. Out of scope: adults, other findings (COVID-19, "
        "tuberculosis, effusion), CT, and images from sites unlike the training data.",
        "",
        "## Data",
        f"- Source `{source}`, fingerprint `{fingerprint[:16]}`. The Kaggle source data are pediatric "
        "(1–5 years) anterior-posterior X-rays from one center (Guangzhou).",
        "- Images per subset: " + "; ".join(
            f"{subset} " + ", ".join(f"{label} {count}" for label, count in by_class.items())
            for subset, by_class in counts.items()) + f"; {(data_report or {}).get('patients', '?')} patients. "
        "Validation is carved from train by patient; test is the official test split.",
        "",
        "## Metrics (test split, 95 % intervals by patient)",
        "| metric | value [95 % CI] |",
        "|---|---|",
    ]
    lines += [f"| {metric} | {with_ci(test[metric], intervals.get(metric))} |"
              for metric in ("recall", "specificity", "precision", "accuracy", "f2", "roc_auc", "pr_auc") if metric in test]
    lines += [
        f"| score the gate compared | {with_ci(record['score'], intervals.get('selection_score'))} |",
        f"| validation selection score | {_metric(run_metrics, 'validation.selection_score')} |",
        "",
        "## Calibration",
        f"- ECE (15 bins) validation {_metric(run_metrics, 'validation.ece')} (raw "
        f"{_metric(run_metrics, 'validation.ece_uncalibrated')}), test {_metric(run_metrics, 'test.ece')} (raw "
        f"{_metric(run_metrics, 'test.ece_uncalibrated')}); Brier test {_metric(run_metrics, 'test.brier')}. "
        "Reliability diagram: the run's `plots/reliability.png`.",
        "",
        "## Promotion decision",
        f"- **{record['outcome']}**: {record['reason']}",
        *([f"- Why this candidate: {record['why_selected']}."] if record.get("why_selected") else []),
        *(["- Champion compared: " + markdown_link(
            f"version {record['champion_version']}",
            version_url(mlflow_ui, record["model_name"], record["champion_version"]) if mlflow_ui else None)]
          if record.get("champion_version") else []),
        f"- Gate: {gate.get('mode', '?')}, margin {gate.get('margin', '?')}, floors recall ≥ "
        f"{gate.get('min_recall', '?')} and specificity ≥ {gate.get('min_specificity', '?')} on the "
        f"{gate.get('floors_on', '?')}; {record.get('n_test_images', '?')} test images, "
        f"{record.get('n_test_patients', '?')} patients.",
        "",
        *_approval_section(record, approval),
        "## Evidence",
        "- Heatmaps over test examples (true/false positives/negatives): the run's `plots/gradcam.png`; "
        "the served model returns one per image with `params={\"explain\": true}`.",
        "",
        "## Caveats",
        "- Metrics come from one center's test split; performance elsewhere is unknown until measured there.",
        "- The generated demo dataset says nothing about real X-rays.",
        "- The threshold trades specificity for recall: expect false alarms among normal X-rays.",
    ]
    card = "\n".join(lines) + "\n"
    return card if len(card) <= MAX_DESCRIPTION else card[:MAX_DESCRIPTION - 40] + "\n\n(cut; see model_card.md)\n"
