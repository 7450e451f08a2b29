"""Prefect retraining flow: ingest → validate → train candidates in parallel → promote → report."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from pneumo.config import RetrainParams, Settings
from pneumo.errors import PneumoError

# Task inputs and results stay small (URIs, manifests as records, run ids, metrics), so they
# serialize cheaply to Dask workers and into Prefect's result store; models live in MLflow.
Record = dict[str, Any]


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only unexpected errors (dropped connections, 5xx); PneumoError means "fix the input"."""
    try:
        state.result()
    except PneumoError:
        return False
    except Exception:  # noqa: BLE001 - anything else is presumed transient
        return True
    return False


def _settings() -> Settings:
    return Settings()


def _cache_dir(source: str) -> Path:
    """A per-source local cache under PNEUMO_HOME (each worker has its own disk)."""
    import hashlib

    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    return _settings().home / "cache" / digest


@task(name="ingest", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_retry_transient)
def ingest(source: str) -> Record:
    """Sync the dataset into the local cache; returns the pinned manifest and the ingest report."""
    from pneumo import storage

    started = time.perf_counter()
    result = storage.sync(source, _cache_dir(source), endpoint_url=_settings().s3_endpoint_url)
    get_run_logger().info("ingest: %s", result.report.to_dict())
    return {"root": str(result.root), "fingerprint": result.fingerprint, "report": result.report.to_dict(),
            "manifest": result.frame.to_dict("records"), "seconds": time.perf_counter() - started}


@task(name="validate-data")
def validate_data(root: str, manifest: list[Record], params: RetrainParams) -> Record:
    """Decode-check images, carve the patient-grouped validation split, fail early on short classes."""
    from pneumo.data import validate_images
    from pneumo.pipeline import prepare_data

    started = time.perf_counter()
    checked = validate_images(Path(root), pd.DataFrame.from_records(manifest))
    prepared = prepare_data(Path(root), params.train_config(), manifest=checked,
                            min_per_class=params.min_images_per_class, log=get_run_logger().warning)
    get_run_logger().info("data: %s", {k: prepared.report[k] for k in ("images", "patients", "subsets")})
    return {"manifest": prepared.frame.to_dict("records"), "report": prepared.report,
            "seconds": time.perf_counter() - started}


@task(name="train-candidate", task_run_name="train-{name}", retries=1, retry_delay_seconds=5,
      retry_condition_fn=_retry_transient)
def train_candidate(
    name: str, manifest: list[Record], source: str, params: RetrainParams, parent_run_id: str,
    tracking_uri: str, data_report: Record,
) -> Record:
    """Materialize the pinned manifest locally, train and evaluate one model, log it to MLflow."""
    from pneumo import storage, tracking
    from pneumo.data import class_weights
    from pneumo.pipeline import PreparedData, run_candidate

    from pneumo.train import limit_cpu_threads

    started = time.time()
    logger = get_run_logger()
    if os.environ.get("PNEUMO_TF_THREADS"):  # e.g. several Dask worker processes on one machine
        limit_cpu_threads(int(os.environ["PNEUMO_TF_THREADS"]))
    frame = pd.DataFrame.from_records(manifest)
    root = storage.materialize(frame, source, _cache_dir(source), endpoint_url=_settings().s3_endpoint_url)
    data = PreparedData(root=root, frame=frame, report=data_report, class_weight=class_weights(frame))
    config = params.train_config()
    result = run_candidate(name, data, config, _settings().home / "runs" / parent_run_id, log=logger.info)
    run_id = tracking.log_candidate_result(parent_run_id, result, config, data_report=data_report,
                                           class_weight=data.class_weight, tracking_uri=tracking_uri)
    if result.status != "ok":
        raise CandidateFailed(f"{name}: {result.error} (MLflow run {run_id})")
    summary = result.summary()
    summary.pop("history")
    return {**summary, "run_id": run_id, "pid": os.getpid(), "started": started, "finished": time.time()}


class CandidateFailed(PneumoError):
    """A candidate did not produce a model (diverged, bad weights file, out of memory...)."""


@task(name="select-and-promote")
def select_and_promote(params: RetrainParams, parent_run_id: str, tracking_uri: str,
                       test_manifest: list[Record], source: str) -> Record:
    """Register the best finished candidate; move the champion alias only if it passes the gate."""
    from pneumo import registry, storage

    started = time.perf_counter()
    frame = pd.DataFrame.from_records(test_manifest)
    root = storage.materialize(frame, source, _cache_dir(source), endpoint_url=_settings().s3_endpoint_url)
    decision = registry.promote(
        parent_run_id, test_root=root, test_frame=frame, tracking_uri=tracking_uri,
        registered_model=params.registered_model, min_recall=params.min_recall,
        min_specificity=params.min_specificity, margin=params.margin, score_weight=params.score_weight,
    ).record()
    get_run_logger().info("promotion: %s: %s", decision["outcome"], decision["reason"])
    return {**decision, "seconds": time.perf_counter() - started}


def _failed(name: str, error: BaseException | str) -> Record:
    return {"name": name, "status": "failed", "error": str(error), "score": None, "threshold": None,
            "test": {}, "validation": {}, "run_id": None}


def _run_link(tracking_uri: str, run_id: str | None) -> str:
    if not run_id:
        return "-"
    if tracking_uri.startswith("http"):
        return f"[{run_id[:8]}]({tracking_uri.rstrip('/')}/#/runs/{run_id})"
    return run_id


def leaderboard_rows(candidates: list[Record], decision: Record | None, tracking_uri: str) -> list[Record]:
    """The leaderboard artifact: :func:`pneumo.pipeline.leaderboard` plus the decision and run links."""
    from pneumo.pipeline import leaderboard

    frame = leaderboard(candidates).round(4)
    if decision is not None:
        frame.loc[frame["model"] == decision["candidate"], "status"] = f"selected ({decision['outcome']})"
    run_ids = {c["name"]: c.get("run_id") for c in candidates}
    frame["mlflow run"] = [_run_link(tracking_uri, run_ids[name]) for name in frame["model"]]
    return frame.astype(object).where(frame.notna(), None).to_dict("records")  # JSON has no NaN


def decision_markdown(decision: Record | None, rows: list[Record]) -> str:
    """Human summary of the promotion decision for the Prefect UI."""
    if decision is None:
        return "# Promotion decision\n\nNo candidate succeeded: nothing was registered and no alias moved.\n"
    lines = ["# Promotion decision", "",
             f"**{decision.get('outcome', '?')}**: {decision.get('reason', '')}", "",
             f"- candidate: `{decision.get('candidate')}` → `{decision.get('model_uri', '-')}`"]
    for key in ("version", "score", "threshold", "champion_score", "previous_champion"):
        if decision.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: {decision[key]}")
    lines += ["", f"{len(rows)} candidates; see the `leaderboard` artifact."]
    return "\n".join(lines) + "\n"


def _task_runner() -> Any:
    """Threads locally; a Dask cluster when PNEUMO_DASK_ADDRESS names its scheduler."""
    address = os.environ.get("PNEUMO_DASK_ADDRESS")
    if address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=address)
    return ThreadPoolTaskRunner(max_workers=int(os.environ.get("PNEUMO_PARALLEL_CANDIDATES", "4")))


def _submit_candidates(params: RetrainParams, manifest: list[Record], parent_run_id: str,
                       tracking_uri: str, report: Record) -> list[Any]:
    """Submit one training task per candidate; on Dask each asks for one GPU resource."""
    import contextlib

    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    annotate: Any = contextlib.nullcontext()
    if context is not None and type(context.task_runner).__name__ == "DaskTaskRunner":
        import dask

        # Workers started with `--resources GPU=1` run one candidate each, never two on one GPU.
        annotate = dask.annotate(resources={"GPU": 1})
    with annotate:
        return [train_candidate.submit(name, manifest, params.source, params, parent_run_id, tracking_uri, report)
                for name in params.candidates]


@flow(name="retrain", task_runner=_task_runner(), log_prints=True)
def retrain(params: RetrainParams = RetrainParams()) -> Record:
    """Retrain the candidates on the dataset at ``params.source`` and promote the best one.

    Fails early (before any training) when MLflow is unreachable or the data is unusable;
    a failed candidate is recorded and the others go on; the run fails if none succeeds.
    """
    from pneumo import tracking
    from pneumo.train import limit_cpu_threads

    logger = get_run_logger()
    settings = _settings()
    tracking_uri = params.tracking_uri or settings.tracking_uri
    tracking.check_tracking_server(tracking_uri)
    # Parallel candidates share the cores: give each TensorFlow pool its share, not all of them.
    limit_cpu_threads(max(1, (os.cpu_count() or 1) // max(1, len(params.candidates))))

    ingested = ingest(params.source)
    validated = validate_data(ingested["root"], ingested["manifest"], params)
    report = {**validated["report"], "ingest": ingested["report"], "fingerprint": ingested["fingerprint"]}
    parent_run_id = tracking.start_retraining(
        tracking_uri, params.experiment or settings.experiment, params.source, ingested["fingerprint"], params,
        data_report=report, manifest=pd.DataFrame.from_records(validated["manifest"]),
    )
    logger.info("MLflow parent run %s on %s", parent_run_id, tracking_uri)

    futures = _submit_candidates(params, validated["manifest"], parent_run_id, tracking_uri, report)
    candidates = []
    for name, future in zip(params.candidates, futures):
        future.wait()
        try:
            candidates.append(future.result())
        except Exception as error:  # noqa: BLE001 - the failure policy: record it, keep the others
            logger.error("candidate %s failed: %s", name, error)
            candidates.append(_failed(name, error))

    survivors = [c for c in candidates if c["status"] == "ok"]
    decision = None
    if survivors:
        test_manifest = [r for r in validated["manifest"] if r["subset"] == "test"]
        decision = select_and_promote(params, parent_run_id, tracking_uri, test_manifest, params.source)
    rows = leaderboard_rows(candidates, decision, tracking_uri)
    create_table_artifact(rows, key="leaderboard", description="Candidates: test metrics at the tuned "
                          "threshold; score = recall-weighted mean on validation")
    create_markdown_artifact(decision_markdown(decision, rows), key="promotion-decision")
    tracking.finish_retraining(parent_run_id, status="FINISHED" if survivors else "FAILED", tracking_uri=tracking_uri)
    if not survivors:
        raise RuntimeError("every candidate failed: " + "; ".join(c["error"] for c in candidates))
    timings = {"ingest": ingested["seconds"], "validate-data": validated["seconds"],
               **{f"train-{c['name']}": c["finished"] - c["started"] for c in survivors},
               "select-and-promote": decision["seconds"] if decision else 0.0}
    return {"parent_run_id": parent_run_id, "fingerprint": ingested["fingerprint"], "leaderboard": rows,
            "decision": decision, "candidates": candidates, "task_seconds": timings}
