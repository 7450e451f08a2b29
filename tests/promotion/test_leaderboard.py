"""What the leaderboard and the decision summary say (#27 items 1 and 5): why the selected candidate was
selected, the score that selects beside the score the gate compares, one rounding, links to MLflow."""

from __future__ import annotations

import pytest

from pneumo.promotion.leaderboard import decision_markdown, leaderboard_records, why_selected

UI = "http://127.0.0.1:5555"


def _candidate(name: str, score: float, auc: float, test_score: float, run_id: str) -> dict:
    test = {"recall": 0.9615384, "specificity": 0.94, "roc_auc": 0.98, "accuracy": 0.95, "f2": 0.955,
            "selection_score": test_score}
    return {"name": name, "status": "ok", "score": score, "threshold": 0.61234, "run_id": run_id,
            "validation": {"roc_auc": auc}, "test": test,
            "intervals": {"test": {"recall": [0.91, 0.99], "specificity": [0.9, 0.97], "roc_auc": [0.96, 0.995]}}}


CANDIDATES = [_candidate("cnn", 0.982, 0.990, 0.95, "c" * 32), _candidate("vgg16", 0.982, 0.995, 0.93, "v" * 32),
              _candidate("dense", 0.91, 0.97, 0.96, "d" * 32),
              {"name": "cnn_deep", "status": "failed", "error": "x" * 300, "score": None, "threshold": None,
               "test": {}, "validation": {}, "run_id": None}]
DECISION = {"candidate": "vgg16", "outcome": "undecided", "score": 0.9318, "champion_version": "1",
            "champion_score": 0.9368, "model_name": "pneumonia-classifier", "version": "2", "run_id": "v" * 32,
            "parent_run_id": "p" * 32, "reason": "vs champion version 1: not shown better", "metrics": {}}


def test_a_tie_on_validation_is_explained_by_the_auc_and_the_gate_score_is_named() -> None:
    assert why_selected(CANDIDATES, DECISION) == (
        "vgg16 selected: highest validation score 0.9820, tied with cnn; the tie goes to the higher validation ROC "
        "AUC (0.9950 vs cnn 0.9900); the gate then judged its test score 0.9318 against champion version 1's 0.9368 "
        "(test metrics judge, they never select)")


def test_a_clear_winner_names_the_runner_up_and_a_skipped_better_one_is_named() -> None:
    clear = [_candidate("cnn", 0.95, 0.99, 0.9, "c" * 32), _candidate("dense", 0.90, 0.99, 0.9, "d" * 32)]
    assert why_selected(clear, {**DECISION, "candidate": "cnn", "champion_version": None}).startswith(
        "cnn selected: highest validation score 0.9500 (next: dense 0.9000); the gate then judged its test score")
    skipped = why_selected(clear, {**DECISION, "candidate": "dense"})
    assert "dense selected: the best-ranked candidate whose model could be evaluated" in skipped and "cnn" in skipped
    assert why_selected(clear, None) is None


def test_the_table_is_narrow_with_one_rounding_the_status_and_run_link_up_front_and_both_scores() -> None:
    rows = leaderboard_records(CANDIDATES, DECISION, UI)
    assert [row["model"] for row in rows] == ["vgg16", "cnn", "dense", "cnn_deep"]  # the order promotion ranks
    assert list(rows[0])[:5] == ["model", "status", "MLflow run", "val score (selects)", "test score (gate)"]
    top = rows[0]
    assert top["MLflow run"] == f"[vvvvvvvv]({UI}/#/runs/{'v' * 32})"
    assert top["val score (selects)"] == "0.982" and top["test score (gate)"] == "0.930"
    assert top["recall [95% CI]"] == "0.962 [0.910, 0.990]" and top["threshold"] == "0.612"
    assert top["status"] == "selected (undecided)" and rows[1]["status"] == "ok" and top["error"] == ""
    failed = rows[3]  # a short status up front; its error (cut) in the last column
    assert failed["status"] == "failed" and failed["MLflow run"] == "-" and failed["error"] == "x" * 200
    assert list(failed)[-1] == "error"
    assert "error" not in leaderboard_records(CANDIDATES[:3], DECISION, UI)[0]  # no failure: no error column
    for row in rows:  # every number with 3 decimals: no 0.94 beside 0.928
        for key, value in row.items():
            if key not in ("model", "MLflow run", "status", "error") and value != "-":
                assert all(len(part.strip("[],").split(".")[1]) == 3 for part in value.split()), (key, value)


def test_the_decision_summary_links_the_version_runs_and_champion_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    text = decision_markdown({**DECISION, "why_selected": why_selected(CANDIDATES, DECISION)}, 4, UI)
    assert "- why this candidate: vgg16 selected: highest validation score 0.9820" in text
    assert f"[pneumonia-classifier version 2]({UI}/#/models/pneumonia-classifier/versions/2)" in text
    assert f"[vvvvvvvv]({UI}/#/runs/{'v' * 32})" in text and f"[pppppppp]({UI}/#/runs/{'p' * 32})" in text
    assert f"[pneumonia-classifier version 1]({UI}/#/models/pneumonia-classifier/versions/1)" in text
    # A local store links to `mlflow ui`'s address, unless PNEUMO_MLFLOW_UI_URL names the UI.
    assert "http://127.0.0.1:5000/#/runs/" in decision_markdown(DECISION, 4, "sqlite:///m.db")
    monkeypatch.setenv("PNEUMO_MLFLOW_UI_URL", "https://mlflow.example.org/")
    assert "https://mlflow.example.org/#/runs/" in decision_markdown(DECISION, 4, "sqlite:///m.db")
