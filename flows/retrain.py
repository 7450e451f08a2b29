"""Prefect retraining flow: ingest → validate → train candidates in parallel → [approve] → promote → report.

Each task is one call into :mod:`pneumo.pipeline`; this file only wires them and shows the result.
With ``gate.approval: required`` the flow pauses for a person's sign-off (Prefect's input form)
before a candidate that passes the gate becomes champion (docs/governance.md, "Approval").
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Completed, Running, State
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from pneumo import pipeline
from pneumo.config import Settings
from pneumo.data.storage import cache_dir
from pneumo.errors import PneumoError, redact
from pneumo.mlflow_client import check_tracking_server
from pneumo.params import RetrainParams
from pneumo.promotion import tracking
from pneumo.promotion.approval import (
    approval_lines, approval_markdown, approval_record, not_asked, now_iso, withhold_reason, would_promote
)
from pneumo.promotion.leaderboard import LEADERBOARD_LEGEND, decision_markdown, leaderboard_records

# Task inputs and results stay small (URIs, manifests as records, run ids, metrics), so they
# serialize cheaply to Dask workers and into Prefect's result store; models live in MLflow.
Record = dict[str, Any]


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures only: a PneumoError marked transient (a store answering 5xx, a tracking
    outage while logging) or an OSError (a dropped connection, a timeout). Anything else means "fix
    the input" or a bug, and retrying would only repeat it, minutes later."""
    try:
        state.result()
    except PneumoError as error:
        return bool(getattr(error, "transient", False))
    except OSError:
        return True
    except Exception:  # noqa: BLE001 - a programming error or a bad input: not worth retrying
        return False
    return False


def _frame(records: list[Record]) -> pd.DataFrame:
    return pd.DataFrame.from_records(records)


@task(name="ingest", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_retry_transient)
def ingest(source: str) -> Record:
    """Sync the dataset into the local cache; returns the pinned manifest and the ingest report."""
    started = time.perf_counter()
    result = pipeline.ingest(source, Settings())
    report = result.report
    get_run_logger().info("ingest: images=%d downloaded=%d reused=%d skipped=%d fingerprint=%s",
                          report.images, report.downloaded, report.reused, len(report.skipped),
                          result.fingerprint[:12])
    return {"root": str(result.root), "fingerprint": result.fingerprint, "report": report.to_dict(),
            "manifest": result.frame.to_dict("records"), "seconds": time.perf_counter() - started}


@task(name="validate-data")
def validate_data(root: str, manifest: list[Record], params: RetrainParams) -> Record:
    """Decode-check images, carve the patient-grouped validation split, fail early on short classes."""
    started = time.perf_counter()
    prepared = pipeline.prepare_data(root, _frame(manifest), params.train, min_per_class=params.min_images_per_class,
                                     log=get_run_logger().warning, cache=cache_dir(Settings().home, params.source))
    subsets = " ".join(f"{subset}={sum(counts.values())}" for subset, counts in prepared.report["subsets"].items())
    get_run_logger().info("data: images=%d patients=%d %s", prepared.report["images"],
                          prepared.report["patients"], subsets)
    return {"manifest": prepared.frame.to_dict("records"), "report": prepared.report,
            "seconds": time.perf_counter() - started}


@task(name="train-candidate", task_run_name="train-{name}", retries=3, retry_delay_seconds=[5, 30, 60],
      retry_condition_fn=_retry_transient)
def train_candidate(name: str, manifest: list[Record], params: RetrainParams, parent_run_id: str,
                    data_report: Record) -> Record:
    """Train and evaluate one model on the pinned manifest and log it to MLflow."""
    return pipeline.train_and_log(name, _frame(manifest), params, parent_run_id, data_report, Settings(),
                                  log=get_run_logger().info)


# Transient failures only (a tracking or store blip): the gate undoes a failed promotion, so a retry starts clean.
@task(name="select-and-promote", retries=2, retry_delay_seconds=[10, 30], retry_condition_fn=_retry_transient)
def select_and_promote(params: RetrainParams, parent_run_id: str, run_ids: list[str], test_manifest: list[Record],
                       approval: Record | None = None, withhold: str | None = None) -> Record:
    """Register the best of this retraining's candidates; move the champion alias only if it passes the gate
    (and, when ``withhold`` says nobody signed off, not even then)."""
    started = time.perf_counter()
    decision = pipeline.promote_best(params, parent_run_id, run_ids, _frame(test_manifest), Settings(),
                                     approval=approval, withhold=withhold).record()
    get_run_logger().info("promotion: %s: %s", decision["outcome"], decision["reason"])
    return {**decision, "approval": approval, "seconds": time.perf_counter() - started}


@task(name="propose-promotion", retries=2, retry_delay_seconds=[10, 30], retry_condition_fn=_retry_transient)
def propose_promotion(params: RetrainParams, parent_run_id: str, run_ids: list[str],
                      test_manifest: list[Record]) -> Record:
    """What the gate would decide now, written nowhere (a dry run): what the approver is shown."""
    proposed = pipeline.promote_best(params, parent_run_id, run_ids, _frame(test_manifest), Settings(),
                                     dry_run=True).record()
    get_run_logger().info("proposed promotion: %s: %s", proposed["outcome"], proposed["reason"])
    return proposed


# ----------------------------------------------------------------------------- approval (gate.approval: required)
APPROVAL_KEY = "approval"  # the pause key: one sign-off per flow run
APPROVAL_POLL_SECONDS = 2  # how often the paused run asks the server whether it was resumed (one cheap GET)


class ApprovalInput(RunInput):
    """The form Prefect's UI shows on a paused retraining ("Resume"): approve or reject, who, and why."""

    approve: bool = Field(False, description="Tick to promote this candidate to champion; leave unticked to "
                                             "reject it (it is registered as challenger and champion stays).")
    approver: str = Field(min_length=1, max_length=200, description="Your name, recorded on the version.")
    reason: str = Field(min_length=1, max_length=2000, description="Why: recorded on the version and its model card.")


def _prefect_sender(flow_run_id: str) -> str | None:
    """Who Prefect recorded as the sender of the approval input, if anyone (the open-source server records
    nobody; then the name typed in the form is the approver)."""
    with contextlib.suppress(Exception), get_client(sync_client=True) as client:
        found = client.filter_flow_run_input(flow_run_id, key_prefix=f"paused-{APPROVAL_KEY}-response", limit=1,
                                             exclude_keys=set())
        return found[0].sender if found and found[0].sender else None
    return None


def _running_again(flow_run_id: str) -> None:
    """After the pause timed out, set this run back to Running so it can register the version as challenger.

    Prefect leaves an expired pause PAUSED, refuses new task runs while it is, and turns any later state
    of the run into Failed; forcing Running is the one way to record the timeout and finish cleanly.
    """
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Running(message="approval timed out: registering the version as "
                                                               "challenger"), force=True)


def ask_for_approval(params: RetrainParams, proposed: Record) -> Record:
    """Pause this flow run with Prefect's input form until a person approves or rejects the proposed promotion,
    or ``gate.approval_timeout`` passes; returns the approval record (approved, rejected or timed out).

    A flow-level call, not a task: pausing is the flow run's own state.
    """
    logger, timeout, asked_at = get_run_logger(), params.gate.approval_timeout, now_iso()
    flow_run_id = str(FlowRunContext.get().flow_run.id)  # type: ignore[union-attr]
    logger.warning("approval required: %s passes the gate; waiting up to %d s for a person to approve or reject "
                   "it (Prefect UI: this flow run, Resume)", proposed["candidate"], timeout)
    form = ApprovalInput.with_initial_data(description=approval_markdown(proposed, params.tracking_uri, timeout))
    try:
        answer = pause_flow_run(wait_for_input=form, timeout=timeout, poll_interval=APPROVAL_POLL_SECONDS,
                                key=APPROVAL_KEY)
    except FlowPauseTimeout:
        _running_again(flow_run_id)
        logger.warning("no approval within %d s: the version is registered as challenger", timeout)
        return approval_record("timed out", asked_at=asked_at, timeout_seconds=timeout, flow_run_id=flow_run_id)
    sender = _prefect_sender(flow_run_id)
    record = approval_record("approved" if answer.approve else "rejected", approver=sender or answer.approver,
                             reason=answer.reason, asked_at=asked_at, timeout_seconds=timeout,
                             approver_source="prefect" if sender else "typed", flow_run_id=flow_run_id)
    logger.info("%s by %s: %s", record["status"], record["approver"], record["reason"])
    return {**record, "approver_typed": answer.approver}


def _promote(params: RetrainParams, parent_run_id: str, run_ids: list[str], test_manifest: list[Record]) -> Record:
    """Promote as the gate says; with ``gate.approval: required`` a person signs off first (only if it passes)."""
    if params.gate.approval == "none":
        return select_and_promote(params, parent_run_id, run_ids, test_manifest)
    proposed = propose_promotion(params, parent_run_id, run_ids, test_manifest)
    if not would_promote(proposed):  # nothing to sign: it becomes a challenger as it would unattended
        return select_and_promote(params, parent_run_id, run_ids, test_manifest, approval=not_asked())
    approval = ask_for_approval(params, proposed)
    # The gate decides again under the lock: an approval never promotes a candidate that fails it by then.
    return select_and_promote(params, parent_run_id, run_ids, test_manifest, approval=approval,
                              withhold=withhold_reason(approval))


def _failed(name: str, error: BaseException | str) -> Record:
    # The row goes to the leaderboard (MLflow and Prefect): no credential from the error's text.
    return {"name": name, "status": "failed", "error": redact(str(error)), "score": None, "threshold": None,
            "test": {}, "validation": {}, "run_id": None}


def _task_runner() -> Any:
    """Threads locally; a Dask cluster when PNEUMO_DASK_ADDRESS names its scheduler."""
    address = os.environ.get("PNEUMO_DASK_ADDRESS")
    if address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=address)
    return ThreadPoolTaskRunner(max_workers=Settings().parallel_candidates)


def _submit_candidates(params: RetrainParams, manifest: list[Record], parent_run_id: str, report: Record) -> list[Any]:
    """Submit one training task per candidate; on Dask each asks for one GPU resource."""
    context = FlowRunContext.get()
    annotate: Any = contextlib.nullcontext()
    if context is not None and type(context.task_runner).__name__ == "DaskTaskRunner":
        import dask

        # Workers started with `--resources GPU=1` run one candidate each, never two on one GPU.
        annotate = dask.annotate(resources={"GPU": 1})
    with annotate:
        return [train_candidate.submit(name, manifest, params, parent_run_id, report) for name in params.candidates]


def _train_and_promote(params: RetrainParams, manifest: list[Record], parent_run_id: str,
                       report: Record) -> tuple[list[Record], Record | None, list[Record]]:
    """Train every candidate in parallel, promote the best survivor, publish the Prefect artifacts."""
    logger = get_run_logger()
    futures = _submit_candidates(params, manifest, parent_run_id, report)
    candidates = []
    for name, future in zip(params.candidates, futures):
        future.wait()
        try:
            candidates.append(future.result())
        except Exception as error:  # noqa: BLE001 - the failure policy: record it, keep the others
            logger.error("candidate %s failed: %s", name, redact(str(error)))
            candidates.append(_failed(name, error))
    # Every task has ended: a run still RUNNING belongs to an attempt whose worker died with no retry after it.
    pipeline.close_abandoned_candidates(parent_run_id, params.tracking_uri, log=logger.warning)
    survivors = [c for c in candidates if c["status"] == "ok"]
    decision = None
    if survivors:
        test_manifest = [r for r in manifest if r["subset"] == "test"]
        decision = _promote(params, parent_run_id, [c["run_id"] for c in survivors], test_manifest)
    rows = leaderboard_records(candidates, decision, params.tracking_uri)
    tracking.log_leaderboard(parent_run_id, rows, tracking_uri=params.tracking_uri)
    why = (decision or {}).get("why_selected")
    create_table_artifact(rows, key="leaderboard", description=(f"{why}. " if why else "") + LEADERBOARD_LEGEND)
    approval = "\n".join(approval_lines((decision or {}).get("approval")))
    create_markdown_artifact(decision_markdown(decision, len(rows), params.tracking_uri)
                             + (f"\n{approval}\n" if approval else ""), key="promotion-decision")
    return candidates, decision, rows


# What `prefect server start` serves by default: the local (ephemeral) server of `make demo` has no UI of its own.
LOCAL_PREFECT_UI = "http://127.0.0.1:4200"


def _this_flow_run() -> tuple[str | None, str | None]:
    """This flow run's name and its Prefect UI page (for the MLflow parent run), or None outside a flow run."""
    from prefect.utilities.urls import url_for

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return None, None
    return context.flow_run.name, url_for("flow-run", obj_id=context.flow_run.id, default_base_url=LOCAL_PREFECT_UI)


def _skipped(params: RetrainParams, ingested: Record, reason: str) -> State:
    """End a retraining that would train nothing new: a short MLflow run, a Prefect artifact, the reason
    as the run's state message."""
    flow_run_name, flow_run_url = _this_flow_run()
    run_id = pipeline.record_skipped(params, ingested["fingerprint"], reason, ingested["report"],
                                     flow_run_name=flow_run_name, flow_run_url=flow_run_url)
    get_run_logger().info("retraining skipped: %s (MLflow run %s)", reason, run_id)
    create_markdown_artifact(f"## Retraining skipped\n\n{reason}.\n\nMLflow run `{run_id}` "
                             f"(tag `pneumo.outcome=skipped`); no candidate was trained and no version registered.",
                             key="retraining-skipped", description="Why this retraining trained nothing")
    result = {"outcome": "skipped", "reason": reason, "parent_run_id": run_id, "fingerprint": ingested["fingerprint"],
              "leaderboard": [], "decision": None, "candidates": []}
    # A completed state named "Skipped": the Prefect UI's run list shows the outcome, not just "Completed".
    return Completed(name="Skipped", message=f"Skipped: {reason}", data=result)


@flow(name="retrain", task_runner=_task_runner(), log_prints=True)
def retrain(params: RetrainParams = RetrainParams()) -> Record:
    """Retrain the candidates on the dataset at ``params.source`` and promote the best one.

    Fails early (before any training) when MLflow is unreachable or the data is unusable;
    a failed candidate is recorded and the others go on; the run fails if none succeeds.
    """
    logger = get_run_logger()
    params = params.resolved(Settings())
    check_tracking_server(params.tracking_uri)
    # TensorFlow starts now (seconds), with thread pools sized for parallel candidates: that cost
    # stays out of the first training task, so task times in Prefect match their MLflow runs.
    from pneumo.training.train import configure_thread_pools

    configure_thread_pools(concurrent_tasks=len(params.candidates))

    ingested = ingest(params.source)
    if not params.force and (reason := pipeline.skip_reason(params, ingested["fingerprint"])):
        return _skipped(params, ingested, reason)
    validated = validate_data(ingested["root"], ingested["manifest"], params)
    # Before any training: a configuration that cannot fit the worker fails now, with the numbers.
    estimate = pipeline.check_memory(params.candidates, params.train, validated["report"]["images"], log=logger.info)
    report = {**validated["report"], "ingest": ingested["report"], "fingerprint": ingested["fingerprint"],
              "memory_estimate": estimate}
    flow_run_name, flow_run_url = _this_flow_run()
    parent_run_id = tracking.start_retraining(
        params.tracking_uri, params.experiment, params.source, ingested["fingerprint"], params,
        data_report=report, manifest=_frame(validated["manifest"]), ingested=_frame(ingested["manifest"]),
        run_name=tracking.retraining_run_name(flow_run_name), tags=tracking.orchestrator_tags(flow_run_name, flow_run_url),
    )
    logger.info("MLflow parent run %s on %s", parent_run_id, redact(params.tracking_uri))

    try:
        candidates, decision, rows = _train_and_promote(params, validated["manifest"], parent_run_id, report)
    except BaseException as error:  # every way out closes the parent run, never leaving it RUNNING
        tracking.finish_retraining(parent_run_id, status="FAILED", error=str(error) or type(error).__name__,
                                   tracking_uri=params.tracking_uri)
        raise
    survivors = [c for c in candidates if c["status"] == "ok"]
    tracking.finish_retraining(parent_run_id, status="FINISHED" if survivors else "FAILED",
                               tracking_uri=params.tracking_uri)
    if not survivors:
        raise RuntimeError("every candidate failed: " + "; ".join(c["error"] for c in candidates))
    timings = {"ingest": ingested["seconds"], "validate-data": validated["seconds"],
               **{f"train-{c['name']}": c["finished"] - c["started"] for c in survivors},
               "select-and-promote": decision["seconds"] if decision else 0.0}
    return {"outcome": "trained", "parent_run_id": parent_run_id, "fingerprint": ingested["fingerprint"],
            "leaderboard": rows, "decision": decision, "candidates": candidates, "task_seconds": timings}
