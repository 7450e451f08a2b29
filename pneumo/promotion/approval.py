"""A person's sign-off before ``champion`` moves (``gate.approval: required``): what they are shown, what is recorded.

Pure helpers: the flow (:mod:`flows.retrain`) pauses with Prefect's own input form and calls these;
nothing here talks to Prefect. The record goes into the version's audit bundle and, as one line,
into its ``pneumo.approval`` tag and model card (:func:`pneumo.promotion.audit.approval_summary`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

from pneumo.promotion.leaderboard import decision_numbers
from pneumo.promotion.links import mlflow_ui, run_url, version_url

Record = dict[str, Any]
Status = Literal["approved", "rejected", "timed out", "not asked"]
WOULD_PROMOTE = "dry-run: would be promoted"  # Decision.outcome of a dry run that passes the gate


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second (what the tags and the card show)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def would_promote(proposed: Mapping[str, Any]) -> bool:
    """Whether a dry-run decision says the gate passes: only then is a person asked."""
    return proposed.get("outcome") == WOULD_PROMOTE


def approval_record(status: Status, *, approver: str = "nobody", reason: str = "", asked_at: str | None = None,
                    timeout_seconds: int | None = None, approver_source: str | None = None,
                    flow_run_id: str | None = None) -> Record:
    """The approval as the audit bundle stores it (``required`` is always true here: "none" passes None)."""
    return {"required": True, "status": status, "approver": approver.strip() or "nobody",
            "approver_source": approver_source, "at": now_iso(), "reason": reason.strip(), "asked_at": asked_at,
            "timeout_seconds": timeout_seconds, "flow_run_id": flow_run_id}


def not_asked() -> Record:
    """Approval was required but the gate did not pass: nothing to sign, the normal challenger path."""
    return approval_record("not asked", reason="the statistical gate did not pass, so there was nothing to approve")


def withhold_reason(record: Mapping[str, Any]) -> str | None:
    """Why the version must stay a challenger despite passing the gate (None when it was approved)."""
    if record["status"] == "approved":
        return None
    if record["status"] == "timed out":
        return f"no approval within {record.get('timeout_seconds')} s of {record.get('asked_at')}"
    return f"{record['status']} by {record['approver']}: {record.get('reason') or 'no reason given'}"


def _mlflow_links(proposed: Mapping[str, Any], tracking_uri: str) -> list[str]:
    ui = mlflow_ui(tracking_uri)
    # Bare addresses, not [text](url): the Prefect UI's form description drops a markdown link and all after it.
    links = [f"- candidate run in MLflow: {run_url(ui, proposed.get('run_id'))}",
             f"- the retraining: {run_url(ui, proposed.get('parent_run_id'))}"]
    if proposed.get("champion_version"):
        links.append(f"- current champion, version {proposed['champion_version']}: "
                     f"{version_url(ui, proposed['model_name'], proposed['champion_version'])}")
    return links


def approval_markdown(proposed: Mapping[str, Any], tracking_uri: str, timeout_seconds: int) -> str:
    """What the approver reads above the Prefect form: the gate's decision with its numbers and links."""
    gate = proposed.get("gate") or {}
    lines = [f"## Approve {proposed['candidate']} as champion of {proposed['model_name']}?", "",
             f"The statistical gate passed: {proposed['reason']}.", "", *decision_numbers(proposed)]
    if not proposed.get("champion_version"):
        lines.append("- no champion yet: this would be the first")
    lines.append(f"- gate: {gate.get('mode')}, margin {gate.get('margin')}, floors recall ≥ {gate.get('min_recall')} "
                 f"and specificity ≥ {gate.get('min_specificity')} on the {gate.get('floors_on')}")
    lines += ["", "**Approve** promotes it (the gate decides again at that moment: it never promotes a candidate "
              "that no longer passes). Leaving it unticked rejects it: it is registered as `challenger` and "
              f"`champion` stays. No answer within {timeout_seconds} s counts as a rejection. "
              "Your name, the time and your reason are recorded on the version.", ""]
    lines += _mlflow_links(proposed, tracking_uri)
    return "\n".join(lines) + "\n"


def approval_lines(record: Mapping[str, Any] | None) -> list[str]:
    """The model card's and the Prefect artifact's approval section (empty when approval was not required)."""
    if not record or not record.get("required"):
        return []
    lines = ["## Approval", f"- **{record['status']}** by {record.get('approver')} at {record.get('at')}"
             + (f" (asked at {record['asked_at']})" if record.get("asked_at") else "")]
    if record.get("reason"):
        lines.append(f"- reason: {record['reason']}")
    if record.get("approver_source") == "typed":
        lines.append("- the approver's name is as typed in the form (the Prefect server recorded no user)")
    if record.get("flow_run_id"):
        lines.append(f"- Prefect flow run `{record['flow_run_id']}`")
    return lines
