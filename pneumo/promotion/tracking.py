"""MLflow writes: one parent run per retraining, one child run per candidate, by explicit run id."""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pneumo.errors import CandidateLoggingError, TrackingError, redact
from pneumo.mlflow_client import check_tracking_server, mlflow_client, one_line
from pneumo.promotion.provenance import code_version, params_digest

# Tag keys; the registry and run queries read them back, so they are part of the contract.
TAG_KIND = "pneumo.kind"
TAG_SOURCE = "pneumo.dataset.source"
TAG_FINGERPRINT = "pneumo.dataset.fingerprint"
TAG_VERSION = "pneumo.version"
TAG_CANDIDATE = "pneumo.candidate"
TAG_SERVING_MODEL = "pneumo.serving_model_uri"
TAG_KERAS_MODEL = "pneumo.keras_model_uri"
TAG_ERROR = "pneumo.error"
TAG_OUTCOME = "pneumo.outcome"  # "skipped" on a retraining that found nothing new to train
TAG_SKIP_REASON = "pneumo.skip_reason"
TAG_PARAMS_DIGEST = "pneumo.params_digest"
TAG_CODE_VERSION = "pneumo.code_version"
TAG_CODE_DIRTY = "pneumo.code_dirty"
TAG_FLOW_RUN_URL = "pneumo.prefect.flow_run_url"  # on the parent run: its Prefect flow run's page
TAG_FLOW_RUN_NAME = "pneumo.prefect.flow_run_name"
TAG_REGISTERED = "pneumo.registered_version"  # on the candidate run a version was registered from
INGEST_MANIFEST = "ingest_manifest.csv"  # what the ingest listed, before validation: the dataset watch's baseline
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own key: the UI nests children by it
SCORE_METRIC = "validation.selection_score"  # what candidates are ranked by
DATASET_NAME = "chest-xray"
DIGEST_LENGTH = 36  # MLflow stores dataset digests in a 36-character column
_MAX_PARAM = 6000  # MLflow's limit on a param value's length


# ----------------------------------------------------------------------------- helpers
def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """A config (pydantic model or mapping, nested allowed) as flat ``{dotted.key: str}`` params."""
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    flat: dict[str, str] = {}
    for key, value in dict(config or {}).items():
        if hasattr(value, "model_dump") or isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            flat[f"{prefix}{key}"] = redact(text)[:_MAX_PARAM]
    return flat


def _log_params(client: Any, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=items[start:start + 100])


def _log_metrics(client: Any, run_id: str, metrics: Sequence[tuple[str, float, int]]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(key, float(value), now, step) for key, value, step in metrics
             if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)]
    for start in range(0, len(items), 1000):  # and at most 1000 metrics
        client.log_batch(run_id, metrics=items[start:start + 1000])


def log_text(client: Any, run_id: str, name: str, text: str, artifact_path: str | None = None) -> None:
    """Write ``text`` as an artifact ``name`` of a run."""
    with tempfile.TemporaryDirectory(prefix="pneumo-artifact-") as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        client.log_artifact(run_id, str(path), artifact_path)


def log_json(client: Any, run_id: str, name: str, data: Any, artifact_path: str | None = None) -> None:
    """Write ``data`` as a JSON artifact ``name`` of a run."""
    log_text(client, run_id, name, json.dumps(data, indent=2, default=str), artifact_path)


def dataset_entity(source: str, fingerprint: str, frame: Any = None) -> Any:
    """An MLflow dataset entity: digest from the fingerprint (cut to MLflow's 36 characters), schema from ``frame``."""
    import mlflow.data
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.entities import Dataset

    digest = fingerprint[:DIGEST_LENGTH]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the resolver warns about unrecognised schemes
            origin = resolve_dataset_source(source)
    except Exception:  # noqa: BLE001 - e.g. "synthetic:seed=0": keep the text as the source
        origin = CodeDatasetSource({"source": source})
    profile: dict[str, Any] = {"fingerprint": fingerprint}
    schema = None
    if frame is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # integer-column hints are irrelevant for a manifest
            pandas_dataset = mlflow.data.from_pandas(frame, source=origin, name=DATASET_NAME, digest=digest)
        schema = json.dumps({"mlflow_colspec": pandas_dataset.schema.to_dict()}) if pandas_dataset.schema else None
        profile.update(num_rows=int(len(frame)), num_elements=int(frame.size))
    return Dataset(name=DATASET_NAME, digest=digest, source_type=origin._get_source_type(),
                   source=origin.to_json(), schema=schema, profile=json.dumps(profile))


def _log_dataset(client: Any, run_id: str, entity: Any, context: str) -> None:
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])


def default_artifact_location(tracking_uri: str) -> str | None:
    """``mlruns`` beside a local SQLite database (so under the PNEUMO home by default), else the server's choice.

    Without it MLflow gives a new experiment ``./mlruns`` of the working directory (#27, item 6)."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or tracking_uri == prefix + ":memory:":
        return None
    database = Path(tracking_uri[len(prefix):].split("?", 1)[0])
    return (database.resolve().parent / "mlruns").as_uri()


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=default_artifact_location(client.tracking_uri))
    except MlflowException:  # another retraining created it a moment ago
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _origin_tags() -> dict[str, str]:
    """Who and what started a run: the MLflow UI's "Created by" and "Source" columns."""
    import getpass

    from mlflow.utils.mlflow_tags import MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = "unknown"
    return {MLFLOW_USER: user, MLFLOW_SOURCE_NAME: "pneumo retrain (flows/retrain.py)", MLFLOW_SOURCE_TYPE: "JOB"}


# ----------------------------------------------------------------------------- parent run
def start_retraining(
    tracking_uri: str, experiment: str, source: str, fingerprint: str, config: Any, *,
    data_report: Mapping[str, Any] | None = None, manifest: Any = None, ingested: Any = None,
    run_name: str | None = None, tags: Mapping[str, str] | None = None,
) -> str:
    """Check the server, then open the parent run of one retraining (before training); returns its id.

    ``config`` is logged as params and ``config.json``, ``data_report`` as ``data_report.json``;
    ``manifest`` gives the logged dataset its schema and row count; ``ingested`` (the ingest's
    manifest) is logged as :data:`INGEST_MANIFEST`. The code version and the parameter digest
    (:mod:`pneumo.promotion.provenance`) are tags of every retraining.

    Raises:
        TrackingError: the server is unreachable or cannot store runs or artifacts.
    """
    import pneumo

    check_tracking_server(tracking_uri)
    code = code_version()
    run_id = None
    try:
        client = mlflow_client(tracking_uri)
        run = client.create_run(
            _experiment_id(client, experiment),
            run_name=run_name or time.strftime("retrain-%Y%m%d-%H%M%S", time.gmtime()),
            tags={TAG_KIND: "retraining", TAG_SOURCE: source, TAG_FINGERPRINT: fingerprint,
                  TAG_VERSION: pneumo.__version__, TAG_PARAMS_DIGEST: params_digest(config),
                  TAG_CODE_VERSION: code["version"], TAG_CODE_DIRTY: str(code["dirty"]).lower(),
                  **_origin_tags(), **(tags or {})},
        )
        run_id = run.info.run_id
        if ingested is not None:
            columns = [c for c in ("path", "split", "label", "bytes", "etag") if c in ingested.columns]
            log_text(client, run_id, INGEST_MANIFEST, ingested[columns].to_csv(index=False))
        _log_params(client, run_id, flatten(config))
        _log_dataset(client, run_id, dataset_entity(source, fingerprint, manifest), "retraining")
        # Writing artifacts now proves the artifact store works before hours of training.
        log_text(client, run_id, "config.json", redact(json.dumps(
            config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config), indent=2, default=str)))
        if data_report is not None:
            log_json(client, run_id, "data_report.json", data_report)
    except Exception as error:  # noqa: BLE001 - report any store failure with the URI
        message = str(error) if isinstance(error, TrackingError) else (
            f"cannot start the retraining run on {redact(tracking_uri)}: {one_line(error)}")
        if run_id is not None:  # created, then a write failed: never leave it RUNNING
            with contextlib.suppress(Exception):
                _close(client, run_id, "FAILED", message)
        raise TrackingError(message) from None
    return run_id


def log_leaderboard(parent_run_id: str, rows: Sequence[Mapping[str, Any]], *, tracking_uri: str | None = None) -> None:
    """The leaderboard as an MLflow table on the parent run (the UI's artifact view shows it as a table)."""
    import pandas as pd

    mlflow_client(tracking_uri).log_table(parent_run_id, pd.DataFrame(list(rows)), "leaderboard.json")


def finish_retraining(parent_run_id: str, *, status: str = "FINISHED", error: str | None = None,
                      tracking_uri: str | None = None) -> None:
    """Close the parent run (``FINISHED``/``FAILED``/``KILLED``), recording ``error`` as a tag."""
    _close(mlflow_client(tracking_uri), parent_run_id, status, error)


def _close(client: Any, run_id: str, status: str, error: str | None = None) -> None:
    if error:  # an error's text may quote a credentialed URI
        client.set_tag(run_id, TAG_ERROR, redact(error)[:5000])
    client.set_terminated(run_id, status=status)


# ----------------------------------------------------------------------------- child runs
# The few numbers a person compares across candidate runs, in MLflow's metrics table and compare view
# (#27 item 3): what selects, what the gate judges, the test metrics behind it with their 95 % intervals,
# and the cost. Every other number (confusion counts, calibration, per-epoch history) is in metrics.json.
HEADLINE_WITH_INTERVALS = ("test.selection_score", "test.recall", "test.specificity", "test.roc_auc")
HEADLINE = (SCORE_METRIC, "validation.roc_auc", *HEADLINE_WITH_INTERVALS, "test.precision", "test.f2", "test.ece")
METRIC_DECIMALS = 4  # what the UI shows (and ranking uses: pneumo.promotion.gate.RANK_DECIMALS)


def headline_metrics(result: Any) -> list[tuple[str, float, int]]:
    """The candidate run's metrics (``(key, value, step)``, at most 20), rounded as a person reads them."""
    values = {**{f"validation.{k}": v for k, v in result.validation.items()},
              **{f"test.{k}": v for k, v in result.test.items()}, SCORE_METRIC: result.score}
    rows = [(key, round(values[key], METRIC_DECIMALS), 0) for key in HEADLINE if values.get(key) is not None]
    for key in HEADLINE_WITH_INTERVALS:
        split, metric = key.split(".", 1)
        bounds = result.intervals.get(split, {}).get(metric)
        rows += [(f"{key}.ci_{side}", round(bound, METRIC_DECIMALS), 0)
                 for side, bound in zip(("low", "high"), bounds or ())]
    return rows + [("threshold", round(result.threshold, METRIC_DECIMALS), 0),
                   ("train_seconds", round(result.seconds, 1), 0),
                   ("images_per_second", round(result.images_per_second, 1), 0)]


def flat_metrics(saved: Mapping[str, Any]) -> dict[str, float]:
    """Every number of a candidate's ``metrics.json`` under the keys runs once logged them as metrics
    (``test.ece``, ``validation.ece.ci_low``, ``validation.selection_score``): what the model card reads."""
    flat = {SCORE_METRIC: saved["selection_score"], "threshold": saved["threshold"]}
    for split in ("validation", "test"):
        flat.update({f"{split}.{key}": value for key, value in (saved.get(split) or {}).items()})
        for metric, bounds in ((saved.get("intervals") or {}).get(split) or {}).items():
            flat.update({f"{split}.{metric}.ci_low": bounds[0], f"{split}.{metric}.ci_high": bounds[1]})
    return {key: float(value) for key, value in flat.items() if isinstance(value, (int, float))}


def retraining_run_name(flow_run_name: str | None) -> str:
    """The parent run's name: the orchestrator's run name first (it tells runs apart where the UI cuts names
    short, and finds the same retraining in Prefect), then the start time."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{flow_run_name}-{stamp}" if flow_run_name else f"retrain-{stamp}"


def orchestrator_tags(flow_run_name: str | None, flow_run_url: str | None) -> dict[str, str]:
    """Tags linking the parent run to its Prefect flow run; the link also goes in the run's description,
    which the MLflow UI renders as Markdown (a clickable link)."""
    if not flow_run_url:
        return {}
    return {TAG_FLOW_RUN_URL: flow_run_url, TAG_FLOW_RUN_NAME: flow_run_name or "",
            "mlflow.note.content": f"Retraining run by Prefect flow run [{flow_run_name}]({flow_run_url})."}


def mark_registered(client: Any, run_id: str, model_name: str, version: str | int, outcome: str) -> None:
    """Mark the candidate run a version was registered from: ``(registered vN)`` in its name, which the runs
    table shows, and a tag for filtering (``tags.`pneumo.registered_version` != ''``)."""
    run = client.get_run(run_id)
    candidate = run.data.tags.get(TAG_CANDIDATE, run.info.run_name)
    client.set_tag(run_id, TAG_REGISTERED, f"{model_name} version {version} ({outcome})")
    client.update_run(run_id, name=f"{candidate} (registered v{version})")

def start_candidate(parent_run_id: str, name: str, *, tracking_uri: str | None = None) -> str:
    """Open a candidate's child run when its training starts (so the UI shows the real duration)."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    client = mlflow_client(tracking_uri)
    parent = client.get_run(parent_run_id)
    run = client.create_run(
        parent.info.experiment_id, run_name=name,
        tags={PARENT_RUN_TAG: parent_run_id, MLFLOW_RUN_NAME: name, TAG_KIND: "candidate", TAG_CANDIDATE: name,
              TAG_SOURCE: parent.data.tags.get(TAG_SOURCE, ""), TAG_FINGERPRINT: parent.data.tags.get(TAG_FINGERPRINT, ""),
              **_origin_tags()},
    )
    for entity in (item.dataset for item in (parent.inputs.dataset_inputs if parent.inputs else [])):
        _log_dataset(client, run.info.run_id, entity, "training")
    return run.info.run_id


def log_candidate(
    run_id: str, result: Any, config: Any, *, data_report: Mapping[str, Any] | None = None,
    class_weight: Mapping[int, float] | None = None, tracking_uri: str | None = None,
) -> None:
    """Log a :class:`pneumo.pipeline.CandidateResult` to its child run and close it (FAILED for a failed result).

    Explicit run ids only (never MLflow's thread-local active run): candidates in concurrent threads log at once.

    Raises:
        CandidateLoggingError: logging failed; the run is marked FAILED.
    """
    from pneumo.serving.packaging import log_keras_model, log_serving_model
    from pneumo.training.models import model_params

    client = mlflow_client(tracking_uri)
    if result.status != "ok":
        _close(client, run_id, "FAILED", result.error)
        return
    try:
        params = {**flatten(config), **model_params(result.model), "model": result.name}
        params.update({key: str(value)[:_MAX_PARAM] for key, value in result.params.items()})
        params["calibration"] = json.dumps(result.calibration)
        params.update({f"class_weight_{label}": f"{float(w):.6g}" for label, w in (class_weight or {}).items()})
        _log_params(client, run_id, params)
        _log_metrics(client, run_id, headline_metrics(result))  # everything else: metrics.json below
        for key, artifact in result.artifacts.items():
            folder = "plots/" + key.rpartition("/")[0] if "/" in key else "plots"  # plots/gradcam/<overlay>
            client.log_artifact(run_id, str(artifact), folder.rstrip("/"))
        log_json(client, run_id, "metrics.json", {
            "candidate": result.name, "threshold": result.threshold, "threshold_reached": result.threshold_reached,
            "selection_score": result.score, "validation": result.validation, "test": result.test,
            "intervals": result.intervals, "history": result.history})
        if data_report is not None:
            log_json(client, run_id, "data_report.json", data_report)
        keras_uri = log_keras_model(client, run_id, result.model, config.image_size, candidate=result.name)
        serving_uri = log_serving_model(client, run_id, result.model, threshold=result.threshold,
                                        image_size=config.image_size, candidate=result.name,
                                        calibration=result.calibration)
        client.set_tag(run_id, TAG_KERAS_MODEL, keras_uri)
        client.set_tag(run_id, TAG_SERVING_MODEL, serving_uri)
    except Exception as error:
        with contextlib.suppress(Exception):  # the server may be what failed: the logging error is the one to report
            client.set_terminated(run_id, status="FAILED")
        raise CandidateLoggingError(f"logging candidate {result.name} to {redact(client.tracking_uri)} failed: "
                                    f"{one_line(error)}") from error
    client.set_terminated(run_id, status="FINISHED")
