"""MLflow tracking: one parent run per retraining, one child run per candidate, by explicit run id."""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pneumo.errors import TrackingError

# Tag keys; the registry reads the candidate ones back, so they are part of the contract.
TAG_KIND = "pneumo.kind"
TAG_SOURCE = "pneumo.dataset.source"
TAG_FINGERPRINT = "pneumo.dataset.fingerprint"
TAG_VERSION = "pneumo.version"
TAG_CANDIDATE = "pneumo.candidate"
TAG_SERVING_MODEL = "pneumo.serving_model_uri"
TAG_KERAS_MODEL = "pneumo.keras_model_uri"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own key: the UI nests children by it
SCORE_METRIC = "selection_score"
THRESHOLD_METRIC = "threshold"
DATASET_NAME = "chest-xray"
SERVING_MODEL_NAME = "serving_model"
KERAS_MODEL_NAME = "model"
DIGEST_LENGTH = 36  # MLflow stores dataset digests in a 36-character column
_MAX_PARAM = 6000  # MLflow's limit on a param value's length (longer values are truncated)


# ----------------------------------------------------------------------------- server check
def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with the URI in a one-line message, when MLflow cannot be used.

    HTTP(S) servers are probed directly (``/health`` and an experiments search) with a short
    timeout, because MLflow's own client retries connection errors with back-off for minutes.
    Other URIs (``sqlite:///…``, ``file:…``) are opened with the MLflow client.

    Args:
        uri: the tracking URI.
        timeout: seconds per HTTP probe.

    Raises:
        TrackingError: unreachable, not an MLflow server, or an unusable store URI.
    """
    if not uri or not uri.strip():
        raise TrackingError("MLflow tracking URI is empty (set MLFLOW_TRACKING_URI or PNEUMO_TRACKING_URI)")
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        _check_http(uri.rstrip("/"), timeout)
        return
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any failure here means the URI is unusable
        raise TrackingError(f"MLflow tracking store {uri} is not usable: {_one_line(error)}") from None


def _check_http(uri: str, timeout: float) -> None:
    import requests

    try:
        health = requests.get(f"{uri}/health", timeout=timeout)
        search = requests.get(f"{uri}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                              timeout=timeout)
    except requests.Timeout:
        raise TrackingError(f"MLflow tracking server {uri} is unreachable (no answer within {timeout:g} s)") from None
    except requests.RequestException as error:
        errno = re.search(r"\[Errno -?\d+\] [^'\")]+", str(error))
        why = errno.group(0).strip() if errno else _one_line(error)
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({why})") from None
    if health.status_code != 200 or search.status_code != 200 or "experiments" not in _json(search):
        status = health.status_code if health.status_code != 200 else search.status_code
        raise TrackingError(
            f"{uri} does not answer like an MLflow tracking server (HTTP {status}); check MLFLOW_TRACKING_URI"
        )


def _json(response: Any) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


# ----------------------------------------------------------------------------- helpers
def _client(tracking_uri: str | None) -> Any:
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        # Model logging (Model.log) reads the process-wide URI; keep it equal to ours.
        mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri or mlflow.get_tracking_uri())


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """A config (pydantic model or mapping, nested allowed) as flat ``{dotted.key: str}`` params."""
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    flat: dict[str, str] = {}
    for key, value in dict(config or {}).items():
        name = f"{prefix}{key}"
        if hasattr(value, "model_dump") or isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            flat[name] = text[:_MAX_PARAM]
    return flat


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _log_params(client: Any, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=items[start:start + 100])


def _log_metrics(client: Any, run_id: str, metrics: Sequence[tuple[str, float, int]]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(key, float(value), now, step) for key, value, step in metrics if _finite(value)]
    for start in range(0, len(items), 1000):  # and at most 1000 metrics
        client.log_batch(run_id, metrics=items[start:start + 1000])


def _log_json(client: Any, run_id: str, name: str, data: Any, artifact_path: str | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="pneumo-json-") as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(data, indent=2, default=str, allow_nan=True))
        client.log_artifact(run_id, str(path), artifact_path)


def dataset_digest(fingerprint: str) -> str:
    """The logged dataset's digest: the fingerprint, cut to MLflow's 36-character digest limit.

    36 hex digits of a SHA-256 are 144 bits, still collision-free in practice; the full value is
    in the dataset's profile and in the runs' ``pneumo.dataset.fingerprint`` tag.
    """
    return fingerprint[:DIGEST_LENGTH]


def dataset_entity(source: str, fingerprint: str, frame: Any = None, name: str = DATASET_NAME) -> Any:
    """An MLflow dataset entity: digest from the fingerprint, schema and row count from ``frame``."""
    import warnings

    import mlflow.data
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.entities import Dataset

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
            pandas_dataset = mlflow.data.from_pandas(frame, source=origin, name=name, digest=dataset_digest(fingerprint))
        schema = json.dumps({"mlflow_colspec": pandas_dataset.schema.to_dict()}) if pandas_dataset.schema else None
        profile.update(num_rows=int(len(frame)), num_elements=int(frame.size))
    return Dataset(name=name, digest=dataset_digest(fingerprint), source_type=origin._get_source_type(),
                   source=origin.to_json(), schema=schema, profile=json.dumps(profile))


def _log_dataset(client: Any, run_id: str, entity: Any, context: str) -> None:
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])


# ----------------------------------------------------------------------------- parent run
def start_retraining(
    tracking_uri: str,
    experiment: str,
    source: str,
    fingerprint: str,
    config: Any,
    *,
    data_report: Mapping[str, Any] | None = None,
    manifest: Any = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Check the server, then open the parent run of one retraining. Call this before training.

    Args:
        tracking_uri: MLflow tracking URI.
        experiment: experiment name (created when missing).
        source: where the dataset came from (``s3://bucket/prefix`` or a local path).
        fingerprint: dataset fingerprint; becomes the logged dataset's digest.
        config: the run's configuration (pydantic model or mapping), logged as params and JSON.
        data_report: ingest/validation report, logged as ``data_report.json``.
        manifest: the manifest DataFrame, for the logged dataset's schema and row count.
        run_name: parent run name (default ``retrain-<UTC time>``).
        tags: extra tags.

    Returns:
        The parent run id (pass it to :func:`log_candidate` and the registry).

    Raises:
        TrackingError: the server is unreachable or cannot store runs or artifacts.
    """
    import pneumo

    check_tracking_server(tracking_uri)
    try:
        client = _client(tracking_uri)
        experiment_id = _experiment_id(client, experiment)
        run = client.create_run(
            experiment_id,
            run_name=run_name or time.strftime("retrain-%Y%m%d-%H%M%S", time.gmtime()),
            tags={TAG_KIND: "retraining", TAG_SOURCE: source, TAG_FINGERPRINT: fingerprint,
                  TAG_VERSION: pneumo.__version__, **(tags or {})},
        )
        run_id = run.info.run_id
        _log_params(client, run_id, flatten(config))
        _log_dataset(client, run_id, dataset_entity(source, fingerprint, manifest), "retraining")
        # Writing artifacts now proves the artifact store works before hours of training.
        _log_json(client, run_id, "config.json", json.loads(json.dumps(flatten_config(config), default=str)))
        if data_report is not None:
            _log_json(client, run_id, "data_report.json", data_report)
    except TrackingError:
        raise
    except Exception as error:  # noqa: BLE001 - report any store failure with the URI
        raise TrackingError(f"cannot start the retraining run on {tracking_uri}: {_one_line(error)}") from None
    return run_id


def flatten_config(config: Any) -> Any:
    """The config as plain JSON data (pydantic models dumped)."""
    return config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config or {})


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # another retraining created it a moment ago
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def finish_retraining(
    parent_run_id: str,
    *,
    status: str = "FINISHED",
    summary: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> None:
    """Close the parent run (``FINISHED``/``FAILED``/``KILLED``), optionally logging ``summary.json``."""
    client = _client(tracking_uri)
    if summary is not None:
        _log_json(client, parent_run_id, "summary.json", summary)
    client.set_terminated(parent_run_id, status=status)


# ----------------------------------------------------------------------------- child runs
def model_params(model: Any) -> dict[str, str]:
    """Parameters read off a compiled Keras model: optimizer, learning rate, frozen layers, sizes."""
    params: dict[str, str] = {}
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        params["optimizer"] = type(optimizer).__name__
        try:
            params["learning_rate"] = f"{float(optimizer.learning_rate):.6g}"
        except (TypeError, ValueError):
            pass
    frozen = [layer.name for layer in _all_layers(model) if not layer.trainable and layer.weights]
    params["frozen_layers"] = str(len(frozen))
    if frozen:
        params["frozen_layer_names"] = ",".join(frozen)[:_MAX_PARAM]
    params["trainable_params"] = str(sum(int(w.numpy().size) for w in model.trainable_weights))
    params["non_trainable_params"] = str(sum(int(w.numpy().size) for w in model.non_trainable_weights))
    shape = getattr(model, "input_shape", None)
    if shape:
        params["input_shape"] = str(tuple(shape[1:]))
    return params


def _all_layers(model: Any) -> list[Any]:
    """Layers including those of nested models (VGG16's base), leaves only."""
    layers = []
    for layer in getattr(model, "layers", []):
        layers.extend(_all_layers(layer) if getattr(layer, "layers", None) else [layer])
    return layers


def _metric_rows(prefix: str, metrics: Mapping[str, Any] | None) -> list[tuple[str, float, int]]:
    return [(f"{prefix}.{key}", value, 0) for key, value in (metrics or {}).items() if _finite(value)]


def log_candidate(
    parent_run_id: str,
    name: str,
    *,
    config: Any,
    model: Any,
    history: Mapping[str, Sequence[float]],
    threshold: float,
    score: float,
    validation: Mapping[str, float],
    test: Mapping[str, float],
    validation_at_05: Mapping[str, float] | None = None,
    test_at_05: Mapping[str, float] | None = None,
    artifacts: Mapping[str, str | Path] | None = None,
    data_report: Mapping[str, Any] | None = None,
    class_weight: Mapping[int, float] | None = None,
    params: Mapping[str, Any] | None = None,
    threshold_reached: bool | None = None,
    image_size: int | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Log one trained candidate as a child run of ``parent_run_id``; thread-safe.

    Uses only explicit run ids (never MLflow's thread-local active run), so candidates trained
    in concurrent threads can log at the same time.

    Args:
        parent_run_id: from :func:`start_retraining`.
        name: architecture name (``dense``, ``cnn``, …).
        config: the shared training config (pydantic model or mapping).
        model: the trained ``keras.Model``.
        history: per-epoch metric lists (Keras ``History.history``), logged with steps.
        threshold: decision threshold tuned on validation.
        score: selection score on validation (what the registry ranks by).
        validation: metrics on validation at ``threshold`` (``evaluate.compute_metrics``).
        test: metrics on test at ``threshold``.
        validation_at_05: metrics on validation at 0.5.
        test_at_05: metrics on test at 0.5.
        artifacts: files to attach; PNGs go under ``plots/``, others under ``reports/``.
        data_report: the ingest/validation report (``data_report.json``).
        class_weight: loss weights per label.
        params: extra parameters (epochs run, device, …).
        threshold_reached: whether the recall target was reachable on validation.
        image_size: model input side (default: read from the model).
        tracking_uri: default: the process-wide MLflow URI set by :func:`start_retraining`.

    Returns:
        The child run id.

    Raises:
        TrackingError: logging failed; the child run is marked FAILED.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    client = _client(tracking_uri)
    parent = client.get_run(parent_run_id)
    size = int(image_size or model.input_shape[1])
    run = client.create_run(
        parent.info.experiment_id,
        run_name=name,
        tags={PARENT_RUN_TAG: parent_run_id, MLFLOW_RUN_NAME: name, TAG_KIND: "candidate",
              TAG_CANDIDATE: name, TAG_SOURCE: parent.data.tags.get(TAG_SOURCE, ""),
              TAG_FINGERPRINT: parent.data.tags.get(TAG_FINGERPRINT, "")},
    )
    run_id = run.info.run_id
    try:
        all_params = {**flatten(config), **model_params(model), "model": name, "image_size": str(size)}
        for label, weight in (class_weight or {}).items():
            all_params[f"class_weight_{label}"] = f"{float(weight):.6g}"
        all_params.update({key: str(value)[:_MAX_PARAM] for key, value in (params or {}).items()})
        _log_params(client, run_id, all_params)

        rows: list[tuple[str, float, int]] = [
            (key, value, step) for key, values in history.items() for step, value in enumerate(values)
        ]
        rows += _metric_rows("validation", validation) + _metric_rows("test", test)
        rows += _metric_rows("validation_at_0.5", validation_at_05) + _metric_rows("test_at_0.5", test_at_05)
        rows += [(SCORE_METRIC, score, 0), (THRESHOLD_METRIC, threshold, 0)]
        if threshold_reached is not None:
            rows.append(("threshold_reached", float(bool(threshold_reached)), 0))
        _log_metrics(client, run_id, rows)

        for entity in (item.dataset for item in (parent.inputs.dataset_inputs if parent.inputs else [])):
            _log_dataset(client, run_id, entity, "training")

        for artifact in (artifacts or {}).values():
            path = Path(artifact)
            if path.name == "metrics.json":
                continue  # superseded by the complete metrics.json below
            client.log_artifact(run_id, str(path), "plots" if path.suffix.lower() == ".png" else "reports")
        _log_json(client, run_id, "metrics.json", {
            "candidate": name, "threshold": threshold, "threshold_reached": threshold_reached,
            "selection_score": score, "validation": dict(validation), "test": dict(test),
            "validation_at_0.5": dict(validation_at_05 or {}), "test_at_0.5": dict(test_at_05 or {}),
            "history": {key: list(values) for key, values in history.items()},
        })
        if data_report is not None:
            _log_json(client, run_id, "data_report.json", data_report)

        keras_info = _log_keras(run_id, model, size)
        from pneumo.serving import log_serving_model

        serving_info = log_serving_model(run_id, model, threshold=threshold, image_size=size, candidate=name,
                                         name=SERVING_MODEL_NAME)
        client.set_tag(run_id, TAG_KERAS_MODEL, keras_info.model_uri)
        client.set_tag(run_id, TAG_SERVING_MODEL, serving_info.model_uri)
    except Exception as error:
        client.set_terminated(run_id, status="FAILED")
        raise TrackingError(f"logging candidate {name} to {client.tracking_uri} failed: {_one_line(error)}") from error
    client.set_terminated(run_id, status="FINISHED")
    return run_id


class _KerasFlavor:
    """``mlflow.keras`` with the model folder created first.

    MLflow 3.17's ``mlflow.keras.save_model`` writes the input example before it creates the
    model folder, so ``log_model(..., input_example=...)`` fails with FileNotFoundError.
    """

    __name__ = "mlflow.keras"

    @staticmethod
    def save_model(path: str, **kwargs: Any) -> Any:
        import os

        import mlflow.keras

        os.makedirs(path, exist_ok=True)
        return mlflow.keras.save_model(path=path, **kwargs)


def _log_keras(run_id: str, model: Any, image_size: int) -> Any:
    """The Keras flavor with a tensor signature and a one-image input example."""
    import numpy as np
    from mlflow.models import Model, infer_signature

    from pneumo.serving import pip_requirements

    example = np.full((1, image_size, image_size, 3), 128.0, dtype=np.float32)
    signature = infer_signature(example, np.asarray(model.predict_on_batch(example), dtype=np.float32))
    return Model.log(artifact_path=None, name=KERAS_MODEL_NAME, flavor=_KerasFlavor, run_id=run_id, model=model,
                     signature=signature, input_example=example, pip_requirements=pip_requirements())


def log_candidate_result(
    parent_run_id: str,
    result: Any,
    config: Any,
    *,
    data_report: Mapping[str, Any] | None = None,
    class_weight: Mapping[int, float] | None = None,
    validation_at_05: Mapping[str, float] | None = None,
    tracking_uri: str | None = None,
) -> str:
    """:func:`log_candidate` for a ``pneumo.pipeline.CandidateResult`` (failed ones get a FAILED run).

    Returns:
        The child run id.
    """
    if result.status != "ok":
        return log_failed_candidate(parent_run_id, result.name, result.error, tracking_uri=tracking_uri)
    return log_candidate(
        parent_run_id, result.name, config=config, model=result.model, history=result.history,
        threshold=result.threshold, score=result.score, validation=result.validation, test=result.test,
        validation_at_05=validation_at_05, test_at_05=result.test_at_05, artifacts=result.artifacts,
        data_report=data_report, class_weight=class_weight,
        params={**result.params, "train_seconds": f"{result.seconds:.1f}",
                "images_per_second": f"{result.images_per_second:.1f}"},
        threshold_reached=result.threshold_reached, tracking_uri=tracking_uri,
    )


def log_failed_candidate(parent_run_id: str, name: str, error: str, *, tracking_uri: str | None = None) -> str:
    """A FAILED child run recording why a candidate did not produce a model."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    client = _client(tracking_uri)
    parent = client.get_run(parent_run_id)
    run = client.create_run(parent.info.experiment_id, run_name=name, tags={
        PARENT_RUN_TAG: parent_run_id, MLFLOW_RUN_NAME: name, TAG_KIND: "candidate", TAG_CANDIDATE: name,
        "pneumo.error": error[:5000],
    })
    client.set_terminated(run.info.run_id, status="FAILED")
    return run.info.run_id


def retraining_dataset(parent_run_id: str, *, tracking_uri: str | None = None) -> tuple[str, str]:
    """(dataset source, fingerprint) a retraining was run on, from its parent run's tags."""
    tags = _client(tracking_uri).get_run(parent_run_id).data.tags
    if TAG_SOURCE not in tags:
        raise TrackingError(f"run {parent_run_id} is not a pneumo retraining run (no {TAG_SOURCE} tag)")
    return tags[TAG_SOURCE], tags.get(TAG_FINGERPRINT, "")


def candidate_runs(parent_run_id: str, *, tracking_uri: str | None = None) -> list[Any]:
    """Finished candidate child runs of a retraining (failed ones excluded)."""
    client = _client(tracking_uri)
    parent = client.get_run(parent_run_id)
    return list(client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}' and attributes.status = 'FINISHED'",
        max_results=1000,
    ))
