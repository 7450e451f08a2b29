"""The plain-Python retraining steps the flow and the CLI both call: ingest, prepare, train and log, promote."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pneumo.config import Settings, TrainConfig
from pneumo.data import storage
from pneumo.data.images import assign_subsets, class_weights, validate_images
from pneumo.data.layout import CLASSES
from pneumo.data.storage import IngestResult, cache_dir, counts_by
from pneumo.errors import CandidateFailed, DataError, TrackingError, redact
from pneumo.mlflow_client import is_transient, mlflow_client, one_line
from pneumo.params import RetrainParams, WatchParams

Log = Callable[[str], None]
Progress = Callable[[int, int], None]
SUBSETS: tuple[str, ...] = ("train", "validation", "test")


# ----------------------------------------------------------------------------- data
def ingest(source: str, settings: Settings, *, progress: Progress | None = None) -> IngestResult:
    """Sync a dataset source (S3 or a local folder) into this machine's cache for it."""
    return storage.sync(source, cache_dir(settings.home, source), endpoint_url=settings.s3_endpoint_url,
                        progress=progress)


def materialized(manifest: pd.DataFrame, source: str, settings: Settings) -> AbstractContextManager[Path]:
    """The pinned manifest's files on this machine (a worker may not have run the ingest), held for
    reading: no sync into the same cache (``pneumo promote``) can change them inside the block."""
    return storage.materialized(manifest, source, cache_dir(settings.home, source),
                                endpoint_url=settings.s3_endpoint_url)


@dataclass
class PreparedData:
    """A validated dataset with its subsets assigned, ready for any candidate."""

    root: Path
    frame: pd.DataFrame  # manifest rows plus the ``subset`` column
    report: dict[str, Any]
    class_weight: dict[int, float]


def check_subsets(frame: pd.DataFrame, min_per_class: int = 2) -> None:
    """Fail early (DataError naming each short subset/class) when one is too small to train or evaluate on."""
    counts = counts_by(frame, "subset")
    short = [f"{subset}/{label}={counts.get(subset, {}).get(label, 0)}"
             for subset in SUBSETS for label in CLASSES if counts.get(subset, {}).get(label, 0) < min_per_class]
    if short:
        raise DataError(f"too few images (need ≥{min_per_class} per subset and class): {', '.join(short)}")


def prepare_data(
    root: Path, manifest: pd.DataFrame, config: TrainConfig, *, min_per_class: int = 2, log: Log = print,
    progress: Progress | None = None, cache: Path | None = None,
) -> PreparedData:
    """Decode-check an ingested manifest, carve the patient-grouped validation split, check counts.

    ``cache`` (the source's cache folder) is held for reading while images are checked.
    """
    with storage.reading(cache) if cache is not None else nullcontext():
        checked = validate_images(Path(root), manifest, progress=progress)
    frame = assign_subsets(checked.frame, config.val_fraction, config.seed)
    report = {"images": len(frame), "patients": int(frame["patient_id"].nunique()),
              "splits": counts_by(frame, "split"), "subsets": counts_by(frame, "subset"),
              "bad_images": [asdict(item) for item in checked.bad]}
    for item in checked.bad:
        log(f"skipped bad image {item.path}: {item.reason}")
    check_subsets(frame, min_per_class)
    return PreparedData(root=Path(root), frame=frame, report=report, class_weight=class_weights(frame))


def prepare_source(source: str, settings: Settings, config: TrainConfig, *, log: Log = print,
                   progress: Progress | None = None) -> PreparedData:
    """:func:`ingest` then :func:`prepare_data` (the CLI's path; the flow runs them as two tasks)."""
    ingested = ingest(source, settings, progress=progress)
    prepared = prepare_data(ingested.root, ingested.frame, config, log=log, progress=progress)
    prepared.report["ingest"] = ingested.report.to_dict()
    prepared.report["fingerprint"] = ingested.fingerprint
    return prepared


def check_memory(candidates: list[str], config: TrainConfig, images: int, *, parallel: int | None = None,
                 log: Log = print) -> dict[str, Any]:
    """Estimate the training's peak memory (:mod:`pneumo.training.memory`), log it, refuse what cannot fit.

    ``parallel``: candidates trained at once (default: as the flow's task runner runs them).
    Returns the estimate as a dict (the retraining logs it in its data report).

    Raises:
        ConfigError: the estimate exceeds the worker's memory (the message has the numbers).
    """
    from pneumo.training.memory import check_fits, estimate_memory

    estimate = estimate_memory(candidates, config, images, parallel=parallel)
    log(f"memory estimate: {estimate.describe()}")
    check_fits(estimate)
    return estimate.to_dict()


# ----------------------------------------------------------------------------- one candidate
@dataclass
class CandidateResult:
    """Everything one candidate produced; small and JSON-friendly except for ``model``."""

    name: str
    status: str  # "ok" or "failed"
    error: str = ""
    threshold: float = 0.5
    threshold_reached: bool = False
    score: float = float("nan")  # selection score on validation
    validation: dict[str, float] = field(default_factory=dict)  # at the tuned threshold
    test: dict[str, float] = field(default_factory=dict)  # at the tuned threshold
    intervals: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # split → metric → [low, high]
    calibration: dict[str, Any] = field(default_factory=dict)  # Calibrator.to_config(): the served model applies it
    history: dict[str, list[float]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_second: float = 0.0
    artifacts: dict[str, str] = field(default_factory=dict)
    model: Any = None  # the trained keras.Model (not serialized)

    def summary(self) -> dict[str, Any]:
        """JSON-ready view without the model."""
        data = asdict(self)
        data.pop("model")
        return data


def predict(model: Any, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """Labels and pneumonia probabilities, read from the same batches so they stay aligned."""
    labels, probs = [], []
    for images, batch_labels in dataset:
        probs.append(np.asarray(model(images, training=False), dtype=np.float64).ravel())
        labels.append(np.asarray(batch_labels).ravel())
    return np.concatenate(labels).astype(int), np.concatenate(probs)


def run_candidate(
    name: str, data: PreparedData, config: TrainConfig, out_dir: Path, *, score_weight: float = 2.0,
    log: Log = print,
) -> CandidateResult:
    """Train one candidate, tune its threshold on validation, measure validation and test, plot.

    Any exception is captured into a ``failed`` result (the failure policy keeps the other
    candidates going); the traceback goes to the log.
    """
    from pneumo.data.images import make_dataset
    from pneumo.evaluation import metrics
    from pneumo.evaluation.calibration import fit_calibrator, plot_reliability
    from pneumo.evaluation.explain import explain_examples
    from pneumo.evaluation.stats import metric_intervals
    from pneumo.training.train import train_candidate

    started = time.perf_counter()
    out_dir = Path(out_dir) / name
    try:
        datasets = {}
        for subset in SUBSETS:
            rows = data.frame[data.frame["subset"] == subset]
            datasets[subset] = make_dataset(
                data.root, rows["path"].tolist(), rows["label"].tolist(), image_size=config.image_size,
                batch_size=config.batch_size, training=subset == "train", augment=config.augment, seed=config.seed)
        trained = train_candidate(name, datasets["train"], datasets["validation"], config,
                                  train_images=int((data.frame["subset"] == "train").sum()),
                                  class_weight=data.class_weight, log=log)
        val_true, val_raw = predict(trained.model, datasets["validation"])
        test_true, test_raw = predict(trained.model, datasets["test"])
        # Calibrated on validation; the threshold is tuned on the calibrated probabilities served.
        calibrator = fit_calibrator(val_true, val_raw)
        val_prob, test_prob = calibrator.apply(val_raw), calibrator.apply(test_raw)
        threshold, reached = metrics.tune_threshold(val_true, val_prob, config.recall_target)
        validation = _metrics(val_true, val_raw, val_prob, threshold)
        test = _metrics(test_true, test_raw, test_prob, threshold)
        score = metrics.selection_score(validation["recall"], validation["specificity"], score_weight)
        # The score the gate compares, beside its interval (test.selection_score.ci_low/high): #27 item 1.
        test["selection_score"] = metrics.selection_score(test["recall"], test["specificity"], score_weight)
        intervals = {}
        for split, labels, probs in (("validation", val_true, val_prob), ("test", test_true, test_prob)):
            found = metric_intervals(labels, probs, threshold, _patients(data.frame, split, len(labels), log),
                                     score_weight=score_weight)
            intervals[split] = {metric: [interval.low, interval.high] for metric, interval in found.items()}
        artifacts = {
            "confusion_matrix": metrics.plot_confusion_matrix(test, out_dir / "confusion_matrix.png",
                                                               f"{name}: test @ {threshold:.3f}"),
            "roc": metrics.plot_roc(test_true, test_prob, out_dir / "roc.png", f"{name}: test ROC"),
            "pr": metrics.plot_pr(test_true, test_prob, out_dir / "pr.png", f"{name}: test PR"),
            "training_curves": metrics.plot_history(trained.history, out_dir / "training_curves.png", name),
            "reliability": plot_reliability(val_true, val_raw, val_prob, out_dir / "reliability.png",
                                            f"{name}: validation, {calibrator.method} calibration"),
            **explain_examples(trained.model, datasets["test"], test_true, test_prob, threshold, out_dir, name),
        }
        log(f"[{name}] done: validation score {score:.3f}, threshold {threshold:.3f}, "
            f"test recall {test['recall']:.3f}, specificity {test['specificity']:.3f}, AUC {test['roc_auc']:.3f}")
        return CandidateResult(
            name=name, status="ok", threshold=threshold, threshold_reached=reached, score=score,
            validation=validation, test=test, intervals=intervals, calibration=calibrator.to_config(),
            history=trained.history, params=trained.params,
            seconds=time.perf_counter() - started, images_per_second=trained.images_per_second,
            artifacts={key: str(path) for key, path in artifacts.items()}, model=trained.model,
        )
    except Exception as error:  # noqa: BLE001 - the failure policy records every candidate failure
        log(f"[{name}] FAILED: {type(error).__name__}: {error}\n{traceback.format_exc()}")
        return CandidateResult(name=name, status="failed", error=f"{type(error).__name__}: {error}",
                               seconds=time.perf_counter() - started)


def _patients(frame: pd.DataFrame, subset: str, predicted: int, log: Log) -> list[str]:
    """Patient id per predicted image of a subset (the pipeline keeps the manifest's order)."""
    patients = frame.loc[frame["subset"] == subset, "patient_id"].astype(str).tolist()
    if len(patients) != predicted:  # an image failed to decode in the pipeline: no alignment to trust
        log(f"{subset}: {len(patients) - predicted} image(s) dropped while decoding; intervals treat each "
            "image as its own patient")
        return [f"image-{index}" for index in range(predicted)]
    return patients


def _metrics(labels: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, threshold: float) -> dict[str, float]:
    """Metrics of the served (calibrated) probabilities at ``threshold``, plus ECE (15 bins) and Brier score
    of the calibrated and the raw ones."""
    from pneumo.evaluation.calibration import brier_score, expected_calibration_error
    from pneumo.evaluation.metrics import compute_metrics

    return {**compute_metrics(labels, calibrated, threshold),
            "ece": expected_calibration_error(labels, calibrated), "brier": brier_score(labels, calibrated),
            "ece_uncalibrated": expected_calibration_error(labels, raw), "brier_uncalibrated": brier_score(labels, raw)}


def best_candidate(results: Sequence[CandidateResult]) -> CandidateResult | None:
    """The successful candidate that ranks first (:func:`pneumo.promotion.gate.selection_rank`), if any."""
    from pneumo.promotion.gate import selection_rank

    survivors = [r for r in results if r.status == "ok" and np.isfinite(r.score)]
    return max(survivors, key=lambda r: selection_rank(r.score, r.validation.get("roc_auc")), default=None)


# ----------------------------------------------------------------------------- a candidate's attempts
# A retraining's scratch folder on a worker is runs/<parent run id>/<candidate>/: the plots and, until
# they are logged, the trained model and its result (pending/). pending.lock guards pending/: held while
# it is written, restored or removed, so no sweep deletes what an attempt is writing.
STALE_SCRATCH_SECONDS = 7 * 24 * 3600.0  # scratch of a retraining whose run never closed (its flow was killed)
_RUN_ID = re.compile(r"[0-9a-f]{32}")


@contextmanager
def _pending_lock(candidate_dir: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold a candidate folder's ``pending.lock``; yields False, holding nothing, when ``wait`` is off and
    another attempt holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: writers go on, sweeps never delete (they cannot tell)
        yield wait
        return
    with open(candidate_dir / "pending.lock", "a+") as handle:  # closing the file releases the lock
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            held = True
        except BlockingIOError:
            held = False
        yield held


def _restore(folder: Path) -> tuple[CandidateResult, str] | None:
    """A candidate trained by an earlier attempt of this task and not yet logged, with its run id."""
    import keras

    if not (folder / "result.json").is_file() or not (folder / "model.keras").is_file():
        return None
    try:
        saved = json.loads((folder / "result.json").read_text())
    except ValueError:  # torn by a crash mid-write (before writes were atomic): train again
        return None
    run_id = saved.pop("run_id")
    return CandidateResult(**saved, model=keras.models.load_model(folder / "model.keras")), run_id


def _claim_pending(candidate_dir: Path) -> tuple[CandidateResult, str] | None:
    """The model an earlier attempt kept (with its run id), or None; what a crashed attempt left half
    written is removed, so it cannot be mistaken for this attempt's."""
    pending = candidate_dir / "pending"
    with _pending_lock(candidate_dir):
        restored = _restore(pending)
        if restored is None:
            shutil.rmtree(pending, ignore_errors=True)
        return restored


def _keep(candidate_dir: Path, result: CandidateResult, run_id: str) -> None:
    """Keep a trained model until it is logged: a tracking outage loses nothing."""
    pending = candidate_dir / "pending"
    with _pending_lock(candidate_dir):
        pending.mkdir(exist_ok=True)
        result.model.save(pending / "model.keras")
        # Written whole or not at all: the model first, then result.json by rename.
        (pending / "result.tmp").write_text(json.dumps({**result.summary(), "run_id": run_id}, default=str))
        os.replace(pending / "result.tmp", pending / "result.json")


def _drop_pending(candidate_dir: Path) -> None:
    with _pending_lock(candidate_dir):
        shutil.rmtree(candidate_dir / "pending", ignore_errors=True)


def _earlier_attempts(client: Any, parent_run_id: str, name: str) -> list[Any]:
    """Every child run of candidate ``name`` under a retraining: what earlier attempts of its task left."""
    from pneumo.promotion.tracking import PARENT_RUN_TAG, TAG_CANDIDATE

    parent = client.get_run(parent_run_id)
    return list(client.search_runs(
        [parent.info.experiment_id], max_results=1000,
        filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}' and tags.`{TAG_CANDIDATE}` = '{name}'"))


def _close_run(client: Any, run_id: str, reason: str) -> None:
    """Close a run as FAILED with ``reason`` as its error tag and its description (the MLflow UI shows both)."""
    from pneumo.promotion.tracking import TAG_ERROR

    reason = redact(reason)[:5000]
    client.set_tag(run_id, TAG_ERROR, reason)
    client.set_tag(run_id, "mlflow.note.content", reason)
    client.set_terminated(run_id, status="FAILED")


def _close_running(client: Any, runs: Sequence[Any], reason: str, log: Log) -> list[str]:
    """Close the runs still RUNNING (their attempt is gone: its worker died or it raised before logging)."""
    closed = [run.info.run_id for run in runs if run.info.status == "RUNNING"]
    for run_id in closed:
        _close_run(client, run_id, reason)
        log(f"closed MLflow run {run_id} as FAILED: {reason}")
    return closed


def close_abandoned_candidates(parent_run_id: str, tracking_uri: str, *, log: Log = print) -> list[str]:
    """Once every candidate task of a retraining has ended, close its candidate runs still RUNNING
    (a worker died and no retry followed) as FAILED, with the reason; returns their ids."""
    from pneumo.promotion.tracking import PARENT_RUN_TAG

    client = mlflow_client(tracking_uri)
    parent = client.get_run(parent_run_id)
    running = client.search_runs([parent.info.experiment_id], max_results=1000, filter_string=(
        f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'"))
    return _close_running(client, running, "its task ended without closing this run (its worker was lost)", log)


def _logged_result(client: Any, run: Any) -> dict[str, Any]:
    """What :func:`train_and_log` returns, read back from a candidate run an earlier attempt logged."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pneumo-logged-") as tmp:
        saved = json.loads(Path(client.download_artifacts(run.info.run_id, "metrics.json", tmp)).read_text())
    params, metrics = run.data.params, run.data.metrics
    return {
        "name": saved["candidate"], "status": "ok", "error": "", "threshold": saved["threshold"],
        "threshold_reached": saved["threshold_reached"], "score": saved["selection_score"],
        "validation": saved["validation"], "test": saved["test"], "intervals": saved.get("intervals", {}),
        "calibration": json.loads(params.get("calibration", "{}")),
        "params": {key: params[key] for key in ("epochs_run", "device", "mixed_precision") if key in params},
        "seconds": metrics.get("train_seconds", 0.0), "images_per_second": metrics.get("images_per_second", 0.0),
        "artifacts": {}, "run_id": run.info.run_id, "pid": os.getpid(), "reused": True,
        "started": run.info.start_time / 1000, "finished": (run.info.end_time or run.info.start_time) / 1000,
    }


def _last_touched(folder: Path) -> float:
    """The newest modification time of a folder or anything in it."""
    times = [folder.stat().st_mtime]
    for parent, _, files in os.walk(folder):
        times += [Path(parent).stat().st_mtime] + [(Path(parent) / name).stat().st_mtime for name in files]
    return max(times)


def _retraining_over(client: Any, folder: Path, now: float) -> bool:
    """Whether no attempt of the retraining a scratch folder belongs to can come back: its run is closed,
    or it is untouched for :data:`STALE_SCRATCH_SECONDS` (its run is stuck RUNNING or on another server)."""
    from pneumo.mlflow_client import MISSING, unless

    run = unless(MISSING, lambda: client.get_run(folder.name))
    return (run is not None and run.info.status != "RUNNING") or now - _last_touched(folder) > STALE_SCRATCH_SECONDS


def sweep_scratch(runs_dir: Path, keep: str, tracking_uri: str | None, *, now: float | None = None) -> list[Path]:
    """Remove the scratch (kept models, plots) of other retrainings that are over (:func:`_retraining_over`).

    A candidate folder whose ``pending.lock`` is held is left alone: an attempt is writing it.
    ``keep`` is the running retraining's run id. Returns the candidate folders removed.
    """
    client, now = mlflow_client(tracking_uri), time.time() if now is None else now
    removed = []
    for folder in sorted(runs_dir.glob("*")):
        if folder.name == keep or not _RUN_ID.fullmatch(folder.name) or not folder.is_dir():
            continue
        if not _retraining_over(client, folder, now):
            continue
        for candidate in [path for path in folder.iterdir() if path.is_dir()]:
            with suppress(FileNotFoundError), _pending_lock(candidate, wait=False) as held:
                if held:
                    shutil.rmtree(candidate, ignore_errors=True)
                    removed.append(candidate)
        with suppress(OSError):  # only when every candidate folder went
            folder.rmdir()
    return removed


def _attempts_or_raise(client: Any, parent_run_id: str, name: str, tracking_uri: str) -> list[Any]:
    try:
        return _earlier_attempts(client, parent_run_id, name)
    except Exception as error:  # noqa: BLE001 - any store failure, reported with the URI
        raised = TrackingError(f"cannot read the earlier runs of candidate {name} on {redact(tracking_uri)}: "
                               f"{one_line(error)}")
        raised.transient = is_transient(error)  # a server briefly down: the task's retry tries again
        raise raised from None


def _train(name: str, manifest: pd.DataFrame, params: RetrainParams, data_report: dict[str, Any],
           settings: Settings, out_dir: Path, log: Log) -> CandidateResult:
    """Fetch the pinned files and train and evaluate one candidate (:func:`run_candidate`)."""
    with materialized(manifest, params.source, settings) as root:  # held while training reads the files
        data = PreparedData(root=root, frame=manifest, report=data_report, class_weight=class_weights(manifest))
        return run_candidate(name, data, params.train, out_dir, score_weight=params.gate.score_weight, log=log)


def train_and_log(
    name: str, manifest: pd.DataFrame, params: RetrainParams, parent_run_id: str, data_report: dict[str, Any],
    settings: Settings, *, log: Log = print,
) -> dict[str, Any]:
    """One flow candidate: fetch the pinned files, train and evaluate, log a child run of the retraining.

    The child run opens before training, so the MLflow UI shows its real duration. An attempt
    first reads what earlier attempts of this candidate left: a FINISHED run is reused, not trained
    again (its result may have lived in a worker that died); a model kept on this machine but not
    yet logged (a tracking outage) is logged instead of training again; a run left RUNNING is
    closed FAILED with the reason. Returns the result's summary plus ``run_id``, the worker's
    ``pid``, ``started`` and ``finished`` (epoch seconds) and ``reused``.

    Raises:
        CandidateFailed: the candidate produced no model (its FAILED run records why).
        TrackingError: reading earlier runs or logging failed (transient: the retry logs the kept model).
    """
    from pneumo.promotion import tracking
    from pneumo.training.train import configure_thread_pools

    started = time.time()
    if settings.tf_threads:  # e.g. several Dask worker processes sharing one machine
        configure_thread_pools(1, intra_op=settings.tf_threads)
    client = mlflow_client(params.tracking_uri)
    earlier = _attempts_or_raise(client, parent_run_id, name, params.tracking_uri)
    try:
        sweep_scratch(settings.home / "runs", parent_run_id, params.tracking_uri)
    except Exception as error:  # noqa: BLE001 - tidying up never fails a training
        log(f"[{name}] old scratch folders not swept: {one_line(error)}")
    out_dir = settings.home / "runs" / parent_run_id
    candidate_dir = out_dir / name
    candidate_dir.mkdir(parents=True, exist_ok=True)
    logged = [run for run in earlier if run.info.status == "FINISHED" and tracking.TAG_SERVING_MODEL in run.data.tags]
    if logged:
        run_id = logged[0].info.run_id
        log(f"[{name}] already logged by an earlier attempt as run {run_id}: reused, not trained again")
        _close_running(client, earlier, f"an attempt of {name} was lost; run {run_id} holds its logged result", log)
        _drop_pending(candidate_dir)
        return _logged_result(client, logged[0])
    restored = _claim_pending(candidate_dir)
    if restored is not None:
        result, run_id = restored
        log(f"[{name}] logging the model trained by an earlier attempt (kept in {candidate_dir / 'pending'})")
    else:
        run_id = tracking.start_candidate(parent_run_id, name, tracking_uri=params.tracking_uri)
    _close_running(client, [run for run in earlier if run.info.run_id != run_id],
                   f"this attempt of {name} was lost (its worker died or it failed before logging); "
                   f"run {run_id} is the later attempt", log)
    if restored is None:
        try:
            result = _train(name, manifest, params, data_report, settings, out_dir, log)
        except BaseException as error:  # every way out closes the run, never leaving it RUNNING
            with suppress(Exception):
                _close_run(client, run_id, f"the attempt failed before its result was logged: {one_line(error)}")
            raise
        if result.status == "ok":
            _keep(candidate_dir, result, run_id)
    tracking.log_candidate(run_id, result, params.train, data_report=data_report,
                           class_weight=class_weights(manifest), tracking_uri=params.tracking_uri)
    _drop_pending(candidate_dir)
    if result.status != "ok":
        raise CandidateFailed(f"{name}: {result.error} (MLflow run {run_id})")
    summary = result.summary()
    summary.pop("history")
    return {**summary, "run_id": run_id, "pid": os.getpid(), "started": started, "finished": time.time(),
            "reused": False}


# ----------------------------------------------------------------------------- whether to retrain
def skip_reason(params: RetrainParams, fingerprint: str) -> str | None:
    """Why this retraining would train nothing new, or None: the last finished retraining of the same
    source in the experiment had the same dataset fingerprint, parameter digest and code version."""
    from pneumo.promotion import runs, tracking
    from pneumo.promotion.provenance import code_version, params_digest

    # Not max_results=1: the source is matched after the search, and the newest run may be another source's.
    finished = runs.finished_retrainings(params.experiment, params.source, tracking_uri=params.tracking_uri)
    if not finished:
        return None
    last = finished[0]
    ours = {tracking.TAG_FINGERPRINT: fingerprint, tracking.TAG_PARAMS_DIGEST: params_digest(params),
            tracking.TAG_CODE_VERSION: code_version()["version"]}
    if any(last.data.tags.get(tag) != value for tag, value in ours.items()):
        return None
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(last.info.start_time / 1000))
    return (f"nothing changed since retraining {last.info.run_id} ({started}): the same dataset (fingerprint "
            f"{fingerprint[:12]}), parameters and code ({ours[tracking.TAG_CODE_VERSION][:12]}); "
            "set force: true to train anyway")


def record_skipped(params: RetrainParams, fingerprint: str, reason: str, ingest_report: dict[str, Any], *,
                   flow_run_name: str | None = None, flow_run_url: str | None = None) -> str:
    """A short, finished MLflow parent run for a skipped retraining (no candidates), named after and linked
    to its Prefect flow run when there is one; returns its id."""
    from pneumo.promotion import tracking

    linked = tracking.orchestrator_tags(flow_run_name, flow_run_url)
    # The reason as the run's description too: the MLflow UI cuts tag values short.
    note = "\n\n".join(text for text in (reason, linked.get("mlflow.note.content")) if text)
    run_id = tracking.start_retraining(
        params.tracking_uri, params.experiment, params.source, fingerprint, params,
        data_report={"ingest": ingest_report, "fingerprint": fingerprint, "skipped": reason},
        run_name=tracking.retraining_run_name(flow_run_name) + "-skipped",
        tags={**linked, tracking.TAG_OUTCOME: "skipped", tracking.TAG_SKIP_REASON: reason, "mlflow.note.content": note})
    tracking.finish_retraining(run_id, status="FINISHED", tracking_uri=params.tracking_uri)
    return run_id


def dataset_changes(params: WatchParams, settings: Settings, *, log: Log = print) -> dict[str, Any]:
    """What differs at ``params.source`` from what the last finished retraining on it ingested.

    ``status`` is ``changed`` (counts per split and class in ``changes``), ``unchanged``, or
    ``settling``: two listings ``settle_seconds`` apart differ, so an upload is still going and the
    next watch looks again. Lists the source without downloading anything.

    Raises:
        TrackingError: the tracking server is unreachable or its runs cannot be read.
        StorageError: the source cannot be listed (TransientStorageError when that may pass).
    """
    from pneumo.mlflow_client import check_tracking_server
    from pneumo.promotion import runs, tracking

    check_tracking_server(params.tracking_uri)
    cache = cache_dir(settings.home, params.source)
    listing = storage.list_images(params.source, cache, endpoint_url=settings.s3_endpoint_url)
    result: dict[str, Any] = {"source": redact(params.source), "images": len(listing),
                              "fingerprint": storage.fingerprint(listing.drop(columns="md5"))}
    if params.settle_seconds:
        time.sleep(params.settle_seconds)
        moving = storage.manifest_changes(listing, storage.list_images(
            params.source, cache, endpoint_url=settings.s3_endpoint_url))
        if moving:
            summary = (f"the source changed between two listings {params.settle_seconds:g} s apart (an upload "
                       "is still going); the next watch looks again")
            log(f"dataset watch {redact(params.source)}: {summary}")
            return {**result, "status": "settling", "changes": moving, "summary": summary}
    trained = runs.finished_retrainings(params.experiment, params.source, tracking_uri=params.tracking_uri,
                                        trained=True)
    last = trained[0] if trained else None
    before = runs.ingest_manifest(last.info.run_id, tracking_uri=params.tracking_uri) if last else None
    if last is not None:
        result.update(previous_run_id=last.info.run_id,
                      previous_fingerprint=last.data.tags.get(tracking.TAG_FINGERPRINT, ""))
    changes = storage.manifest_changes(before if before is not None else listing.iloc[:0], listing)
    totals = {kind: sum(counts.get(kind, 0) for classes in changes.values() for counts in classes.values())
              for kind in ("added", "removed", "changed")}
    since = ("no finished retraining" if last is None else f"retraining {last.info.run_id}"
             + ("" if before is not None else ", which logged no ingest manifest"))
    summary = (f"{totals['added']} added, {totals['removed']} removed, {totals['changed']} changed since {since}"
               if changes else f"unchanged since {since} ({len(listing)} images)")
    log(f"dataset watch {redact(params.source)}: {summary}")
    return {**result, **totals, "status": "changed" if changes else "unchanged", "changes": changes,
            "summary": summary}


# ----------------------------------------------------------------------------- promotion
def promote_best(
    params: RetrainParams, parent_run_id: str, run_ids: Sequence[str], test_manifest: pd.DataFrame,
    settings: Settings, *, dry_run: bool = False, approval: dict[str, Any] | None = None, withhold: str | None = None,
) -> Any:
    """Evaluate this retraining's best candidate on the test split and gate it against the champion.

    ``approval`` (a person's sign-off, :mod:`pneumo.promotion.approval`) is recorded on the version;
    ``withhold`` (why nobody signed off) keeps it a challenger whatever the gate says.
    """
    from pneumo.evaluation.holdout import read_test_set
    from pneumo.promotion import registry

    # Held while scoring: the test files are read a chunk at a time, so no sync may change them meanwhile.
    with materialized(test_manifest, params.source, settings) as root:
        test = read_test_set(root, test_manifest, min_per_class=params.min_images_per_class)
        return registry.promote(parent_run_id, test, gate=params.gate,
                                run_ids=run_ids, tracking_uri=params.tracking_uri,
                                model_name=params.registered_model, dry_run=dry_run, approval=approval,
                                withhold=withhold)
