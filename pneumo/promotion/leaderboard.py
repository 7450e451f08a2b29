"""How a retraining's outcome is shown: the leaderboard table and the promotion-decision summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pneumo.promotion.links import markdown_link, mlflow_ui, run_url, version_url

COLUMNS = ("model", "status", "accuracy", "recall", "recall 95% CI", "specificity", "specificity 95% CI", "f2",
           "auc", "auc 95% CI", "score", "test score", "threshold")
Record = dict[str, Any]


def _summaries(results: Sequence[Any]) -> list[Record]:
    """Candidate summaries (``CandidateResult`` or its ``summary()`` dict) in the order promotion ranks them."""
    from pneumo.promotion.gate import selection_rank

    summaries = [result if isinstance(result, Mapping) else result.summary() for result in results]
    return sorted(summaries, reverse=True, key=lambda s: selection_rank(
        s["score"] if s["status"] == "ok" else None, (s.get("validation") or {}).get("roc_auc")))


def leaderboard(results: Sequence[Any]) -> pd.DataFrame:
    """One row per candidate (``CandidateResult`` or its ``summary()`` dict), in the order promotion ranks them."""
    rows = []
    for summary in _summaries(results):
        ok = summary["status"] == "ok"
        test = summary.get("test") or {}
        intervals = (summary.get("intervals") or {}).get("test", {})
        rows.append({
            "model": summary["name"], "status": "ok" if ok else f"failed: {summary['error'][:200]}",
            "accuracy": test.get("accuracy"), "recall": test.get("recall"), "recall 95% CI": _ci(intervals, "recall"),
            "specificity": test.get("specificity"), "specificity 95% CI": _ci(intervals, "specificity"),
            "f2": test.get("f2"), "auc": test.get("roc_auc"), "auc 95% CI": _ci(intervals, "roc_auc"),
            "score": summary["score"] if ok else None, "test score": test.get("selection_score"),
            "threshold": summary["threshold"] if ok else None,
        })
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _ci(intervals: Mapping[str, Sequence[float]], name: str) -> str | None:
    bounds = intervals.get(name)
    return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds and all(np.isfinite(bounds)) else None


def _number(value: Any) -> str:
    """Every number of a table with 3 decimals (never 0.94 beside 0.928), "-" when missing."""
    return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else (
        f"{value:.3f}" if isinstance(value, float) else str(value))


def _with_ci(value: Any, interval: Any = None) -> str:
    """``0.962 [0.910, 0.990]``; the value alone without an interval (pandas gives a missing one as NaN)."""
    return f"{_number(value)} {interval}" if isinstance(interval, str) else _number(value)


def format_leaderboard(frame: pd.DataFrame) -> str:
    """Fixed-width text table; the scores are validation (selects) and test (the gate's), the metrics test's."""
    cell = _with_ci

    header = (f"{'model':<10}{'val score':>10}{'test score':>11}{'recall [95% CI]':>22}{'specificity [95% CI]':>23}"
              f"{'AUC [95% CI]':>22}{'F2':>7}{'thresh':>8}  status")
    lines = [header, "-" * len(header)]
    for row in frame.to_dict("records"):
        lines.append(f"{row['model']:<10}{cell(row['score']):>10}{cell(row['test score']):>11}"
                     f"{cell(row['recall'], row['recall 95% CI']):>22}"
                     f"{cell(row['specificity'], row['specificity 95% CI']):>23}"
                     f"{cell(row['auc'], row['auc 95% CI']):>22}{cell(row['f2']):>7}{cell(row['threshold']):>8}"
                     f"  {row['status']}")
    return "\n".join(lines)


def why_selected(candidates: Sequence[Any], decision: Mapping[str, Any] | None) -> str | None:
    """One line: why the decision's candidate was the one put to the gate (None when none was)."""
    from pneumo.promotion.gate import RANK_DECIMALS

    if not decision:
        return None
    chosen = decision["candidate"]
    ranked = [s for s in _summaries(candidates) if s["status"] == "ok"]
    mine = next((s for s in ranked if s["name"] == chosen), None)
    if mine is None:
        return f"{chosen} was put to the gate (the best-ranked candidate whose model could be evaluated)"
    auc = (mine.get("validation") or {}).get("roc_auc")
    better = [s["name"] for s in ranked[:ranked.index(mine)]]
    tied = [s for s in ranked if s is not mine and round(s["score"], RANK_DECIMALS) == round(mine["score"], RANK_DECIMALS)]
    if better:
        why = (f"the best-ranked candidate whose model could be evaluated (validation score {mine['score']:.4f}; "
               f"{', '.join(better)} ranked higher but could not be loaded)")
    elif tied:
        rivals = ", ".join(f"{s['name']} {_value((s.get('validation') or {}).get('roc_auc'))}" for s in tied)
        why = (f"highest validation score {mine['score']:.4f}, tied with {', '.join(s['name'] for s in tied)}; "
               f"the tie goes to the higher validation ROC AUC ({_value(auc)} vs {rivals})")
    else:
        runner_up = next((s for s in ranked if s is not mine), None)
        why = f"highest validation score {mine['score']:.4f}" + (
            f" (next: {runner_up['name']} {runner_up['score']:.4f})" if runner_up else " (the only candidate)")
    gate = f"the gate then judged its test score {_value(decision.get('score'))}"
    if decision.get("champion_version"):
        gate += f" against champion version {decision['champion_version']}'s {_value(decision.get('champion_score'))}"
    return f"{chosen} selected: {why}; {gate} (test metrics judge, they never select)"


LEADERBOARD_LEGEND = ("The val score (recall-weighted, on validation) selects; the test score is what the gate "
                      "compares with the champion; recall, specificity and AUC are on the test split at the tuned "
                      "threshold, with 95 % intervals by patient.")


def leaderboard_records(candidates: Sequence[Record], decision: Record | None, tracking_uri: str) -> list[Record]:
    """The leaderboard as JSON-ready rows (Prefect's table artifact and the MLflow table), narrow enough for the
    Prefect UI's pane: short text cells, every number with 3 decimals, the status and the MLflow run link up
    front, a failed candidate's error last (:data:`LEADERBOARD_LEGEND` says what the columns are).
    """
    ui = mlflow_ui(tracking_uri)
    run_ids = {c["name"]: c.get("run_id") for c in candidates}
    rows = []
    for row in leaderboard(candidates).to_dict("records"):
        failed = row["status"] != "ok"
        status = "failed" if failed else (f"selected ({decision['outcome']})"
                                          if decision and row["model"] == decision["candidate"] else "ok")
        run_id = run_ids.get(row["model"])
        rows.append({
            "model": row["model"], "status": status,
            "MLflow run": markdown_link(run_id[:8], run_url(ui, run_id)) if run_id else "-",
            "val score (selects)": _number(row["score"]), "test score (gate)": _number(row["test score"]),
            "recall [95% CI]": _with_ci(row["recall"], row["recall 95% CI"]),
            "specificity [95% CI]": _with_ci(row["specificity"], row["specificity 95% CI"]),
            "AUC [95% CI]": _with_ci(row["auc"], row["auc 95% CI"]), "threshold": _number(row["threshold"]),
            "error": row["status"].removeprefix("failed: ") if failed else "",  # last: its length hides nothing
        })
    if not any(row["error"] for row in rows):  # no empty column to scroll past
        for row in rows:
            del row["error"]
    return rows


def _value(number: Any) -> str:
    return f"{number:.4f}" if isinstance(number, float) else str(number)


def with_interval(value: float, bounds: Sequence[float] | None = None) -> str:
    """``0.9500 [0.9100, 0.9700]`` (4 digits), or just the value when there is no interval."""
    return f"{value:.4f}" + (f" [{bounds[0]:.4f}, {bounds[1]:.4f}]" if bounds else "")


def decision_markdown(decision: Record | None, candidates: int, tracking_uri: str = "") -> str:
    """Human summary of the promotion decision (Prefect's markdown artifact), numbers rounded to 4 digits,
    with links to the MLflow pages it names."""
    if decision is None:
        return "# Promotion decision\n\nNo candidate succeeded: nothing was registered and no alias moved.\n"
    ui = mlflow_ui(tracking_uri)
    name, version = decision["model_name"], decision.get("version")
    registered = markdown_link(f"{name} version {version}", version_url(ui, name, version)) if version else (
        f"{name} (not registered: dry run)")
    run_id, parent = decision.get("run_id"), decision.get("parent_run_id")
    lines = ["# Promotion decision", "", f"**{decision['outcome']}**: {decision['reason']}", "",
             *([f"- why this candidate: {decision['why_selected']}"] if decision.get("why_selected") else []),
             f"- candidate: `{decision['candidate']}` → {registered}",
             f"- candidate run: {markdown_link(run_id[:8], run_url(ui, run_id)) if run_id else '-'}; retraining: "
             f"{markdown_link(parent[:8], run_url(ui, parent)) if parent else '-'}",
             f"- validation score: {_value(decision.get('validation_score'))}", *decision_numbers(decision)]
    if champion := decision.get("champion_version"):
        lines.append(f"- champion compared: {markdown_link(f'{name} version {champion}', version_url(ui, name, champion))}")
    lines += ["", f"{candidates} candidates; see the `leaderboard` artifact."]
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
