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
    """One row per candidate (test metrics at the tuned threshold), best validation score first.

    Args:
        results: ``CandidateResult`` objects or their ``summary()`` dicts (as flows pass them).
    """
    rows = []
    for result in results:
        summary = result if isinstance(result, Mapping) else result.summary()
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
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return frame.sort_values("score", ascending=False, na_position="last", ignore_index=True)


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


def _run_link(tracking_uri: str, run_id: str | None) -> str:
    if not run_id:
        return "-"
    if tracking_uri.startswith("http"):
        return f"[{run_id[:8]}]({tracking_uri.rstrip('/')}/#/runs/{run_id})"
    return run_id


def leaderboard_records(candidates: Sequence[Record], decision: Record | None, tracking_uri: str) -> list[Record]:
    """The leaderboard as JSON-ready rows (Prefect's table artifact), with the decision and run links."""
    frame = leaderboard(candidates).round(4)
    if decision is not None:
        frame.loc[frame["model"] == decision["candidate"], "status"] = f"selected ({decision['outcome']})"
    run_ids = {c["name"]: c.get("run_id") for c in candidates}
    frame["mlflow run"] = [_run_link(tracking_uri, run_ids[name]) for name in frame["model"]]
    return frame.astype(object).where(frame.notna(), None).to_dict("records")  # JSON has no NaN


def decision_markdown(decision: Record | None, candidates: int) -> str:
    """Human summary of the promotion decision (Prefect's markdown artifact)."""
    if decision is None:
        return "# Promotion decision\n\nNo candidate succeeded: nothing was registered and no alias moved.\n"
    lines = ["# Promotion decision", "",
             f"**{decision.get('outcome', '?')}**: {decision.get('reason', '')}", "",
             f"- candidate: `{decision.get('candidate')}` → `{decision.get('model_uri', '-')}`"]
    for key in ("version", "score", "threshold", "champion_score", "previous_champion"):
        if decision.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: {decision[key]}")
    lines += ["", f"{candidates} candidates; see the `leaderboard` artifact."]
    return "\n".join(lines) + "\n"
