"""How a retraining's outcome is shown: the leaderboard table and the promotion-decision summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

COLUMNS = ("model", "status", "accuracy", "recall", "recall 95% CI", "specificity", "specificity 95% CI", "f2",
           "auc", "auc 95% CI", "score", "threshold")
Record = dict[str, Any]


def leaderboard(results: Sequence[Any]) -> pd.DataFrame:
    """One row per candidate (``CandidateResult`` or its ``summary()`` dict), in the order promotion ranks them."""
    from pneumo.promotion.gate import selection_rank

    summaries = [result if isinstance(result, Mapping) else result.summary() for result in results]
    rows = []
    for summary in sorted(summaries, reverse=True, key=lambda s: selection_rank(
            s["score"] if s["status"] == "ok" else None, (s.get("validation") or {}).get("roc_auc"))):
        ok = summary["status"] == "ok"
        test = summary.get("test") or {}
        intervals = (summary.get("intervals") or {}).get("test", {})
        rows.append({
            "model": summary["name"], "status": "ok" if ok else f"failed: {summary['error'][:200]}",
            "accuracy": test.get("accuracy"), "recall": test.get("recall"), "recall 95% CI": _ci(intervals, "recall"),
            "specificity": test.get("specificity"), "specificity 95% CI": _ci(intervals, "specificity"),
            "f2": test.get("f2"), "auc": test.get("roc_auc"), "auc 95% CI": _ci(intervals, "roc_auc"),
            "score": summary["score"] if ok else None, "threshold": summary["threshold"] if ok else None,
        })
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _ci(intervals: Mapping[str, Sequence[float]], name: str) -> str | None:
    bounds = intervals.get(name)
    return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds and all(np.isfinite(bounds)) else None


def format_leaderboard(frame: pd.DataFrame) -> str:
    """Fixed-width text table; score is on validation, the other metrics on test (with 95 % intervals)."""
    def cell(value: Any, interval: Any = None) -> str:
        text = "-" if value is None or (isinstance(value, float) and np.isnan(value)) else (
            f"{value:.3f}" if isinstance(value, float) else str(value))
        return f"{text} {interval}" if isinstance(interval, str) else text

    header = (f"{'model':<10}{'accuracy':>9}{'recall [95% CI]':>22}{'specificity [95% CI]':>23}{'F2':>7}"
              f"{'AUC [95% CI]':>22}{'score':>7}{'thresh':>8}  status")
    lines = [header, "-" * len(header)]
    for row in frame.to_dict("records"):
        lines.append(f"{row['model']:<10}{cell(row['accuracy']):>9}{cell(row['recall'], row['recall 95% CI']):>22}"
                     f"{cell(row['specificity'], row['specificity 95% CI']):>23}{cell(row['f2']):>7}"
                     f"{cell(row['auc'], row['auc 95% CI']):>22}{cell(row['score']):>7}{cell(row['threshold']):>8}"
                     f"  {row['status']}")
    return "\n".join(lines)


def ui_address(tracking_uri: str) -> str | None:
    """The MLflow UI's base address for an HTTP tracking server (no credentials), else None."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def _run_link(ui: str | None, run_id: str | None) -> str:
    if not run_id:
        return "-"
    return f"[{run_id[:8]}]({ui}/#/runs/{run_id})" if ui else run_id


def leaderboard_records(candidates: Sequence[Record], decision: Record | None, tracking_uri: str) -> list[Record]:
    """The leaderboard as JSON-ready rows (Prefect's table artifact), with the decision and run links.

    Every number is from the test split at the candidate's tuned threshold, except ``validation score``.
    """
    frame = leaderboard(candidates).round(4)
    if decision is not None:
        frame.loc[frame["model"] == decision["candidate"], "status"] = f"selected ({decision['outcome']})"
    run_ids = {c["name"]: c.get("run_id") for c in candidates}
    ui = ui_address(tracking_uri)
    frame["mlflow run"] = [_run_link(ui, run_ids[name]) for name in frame["model"]]
    frame = frame.rename(columns={column: f"test {column}" for column in COLUMNS[2:-2]} | {
        "score": "validation score", "threshold": "threshold (tuned on validation)"})
    first = ["model", "status", "validation score"]  # what candidates are ranked by, up front
    frame = frame[first + [column for column in frame.columns if column not in first]]
    return frame.astype(object).where(frame.notna(), None).to_dict("records")  # JSON has no NaN


def _value(number: Any) -> str:
    return f"{number:.4f}" if isinstance(number, float) else str(number)


def with_interval(value: float, bounds: Sequence[float] | None = None) -> str:
    """``0.9500 [0.9100, 0.9700]`` (4 digits), or just the value when there is no interval."""
    return f"{value:.4f}" + (f" [{bounds[0]:.4f}, {bounds[1]:.4f}]" if bounds else "")


def decision_markdown(decision: Record | None, candidates: int, tracking_uri: str = "") -> str:
    """Human summary of the promotion decision (Prefect's markdown artifact), numbers rounded to 4 digits."""
    if decision is None:
        return "# Promotion decision\n\nNo candidate succeeded: nothing was registered and no alias moved.\n"
    ui = ui_address(tracking_uri)
    name, version = decision["model_name"], decision.get("version")
    registered = f"{name} version {version}" if version else f"{name} (not registered: dry run)"
    if ui and version:
        registered = f"[{registered}]({ui}/#/models/{name}/versions/{version})"
    lines = ["# Promotion decision", "", f"**{decision['outcome']}**: {decision['reason']}", "",
             f"- candidate: `{decision['candidate']}` → {registered}",
             f"- candidate run: {_run_link(ui, decision.get('run_id'))}",
             f"- validation score: {_value(decision.get('validation_score'))}", *decision_numbers(decision),
             "", f"{candidates} candidates; see the `leaderboard` artifact."]
    return "\n".join(lines) + "\n"


def decision_numbers(decision: Mapping[str, Any]) -> list[str]:
    """The test numbers a decision rests on, as Markdown bullets (the decision artifact, the approval form)."""
    metrics, intervals = decision.get("metrics") or {}, decision.get("intervals") or {}
    lines = [f"- test split: {decision.get('n_test_images')} images, {decision.get('n_test_patients')} patients; "
             f"threshold {_value(decision.get('threshold'))}"]
    lines += [f"- test {metric}: {with_interval(metrics[metric], intervals.get(metric))}"
              for metric in ("recall", "specificity", "roc_auc") if metric in metrics]
    lines.append(f"- test score: {_value(decision.get('score'))}")
    if decision.get("champion_version"):
        lines += [f"- champion version {decision['champion_version']} on the same images: test score "
                  f"{_value(decision.get('champion_score'))}",
                  f"- score difference: {_value(decision.get('score_diff'))} [{_value(decision.get('score_diff_ci_low'))}, "
                  f"{_value(decision.get('score_diff_ci_high'))}] ({decision.get('method')})"]
    return lines
