"""Tracking against a real mlflow server: parent/child runs, params, metrics, artifacts, models, failures."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pneumo.config import TrainConfig
from pneumo.errors import PneumoError, TrackingError
from pneumo.evaluation import metrics as evaluate_metrics
from pneumo.evaluation.calibration import brier_score, expected_calibration_error
from pneumo.evaluation.stats import metric_intervals
from pneumo.mlflow_client import check_tracking_server
from pneumo.pipeline import CandidateResult
from pneumo.promotion import tracking
from pneumo.promotion.runs import candidate_runs
from tests.plugins.mlflow_server import labelled_images
from tests.plugins.s3 import free_port

IMAGE_SIZE = 32
FINGERPRINT = "0123456789abcdef" * 4  # 64 hex digits, as storage.fingerprint returns
PNG_ARTIFACTS = {"confusion_matrix.png", "roc.png", "pr.png", "training_curves.png"}


@pytest.fixture(scope="module")
def trained() -> dict:
    """A real seed CNN at 32 px, fitted 2 epochs on a few random images (history with val_ keys)."""
    import keras

    from pneumo.training.models import build_model

    keras.utils.set_random_seed(0)
    model = build_model("cnn", IMAGE_SIZE)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")
    y = np.array([0, 1] * 4, dtype="float32")
    fit = model.fit(x, y, validation_data=(x, y), epochs=2, batch_size=4, verbose=0)
    return {"model": model, "history": {k: [float(v) for v in vals] for k, vals in fit.history.items()}}


def _candidate_files(out: Path, name: str, history: dict) -> tuple[dict, dict]:
    """Metrics and plots the way the pipeline makes them, from fixed probabilities."""
    y_true = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    y_prob = np.array([0.1, 0.4, 0.6, 0.7, 0.8, 0.9, 0.35, 0.2])
    threshold, _ = evaluate_metrics.tune_threshold(y_true, y_prob, 0.95)
    metrics = {**evaluate_metrics.compute_metrics(y_true, y_prob, threshold),
               "selection_score": evaluate_metrics.selection_score(0.75, 0.75), "ece": expected_calibration_error(
                   y_true, y_prob), "brier": brier_score(y_true, y_prob),
               "ece_uncalibrated": expected_calibration_error(y_true, y_prob)}
    found = metric_intervals(y_true, y_prob, threshold, [f"p{i}" for i in range(len(y_true))], replicates=200)
    metrics["intervals"] = {name: [interval.low, interval.high] for name, interval in found.items()}
    folder = out / name
    artifacts = {
        "confusion_matrix": evaluate_metrics.plot_confusion_matrix(metrics, folder / "confusion_matrix.png"),
        "roc": evaluate_metrics.plot_roc(y_true, y_prob, folder / "roc.png"),
        "pr": evaluate_metrics.plot_pr(y_true, y_prob, folder / "pr.png"),
        "training_curves": evaluate_metrics.plot_history(history, folder / "training_curves.png"),
    }
    return metrics, artifacts


def _manifest() -> pd.DataFrame:
    return pd.DataFrame({
        "path": [f"chest_xray/train/NORMAL/IM-{i:04d}-0001.jpeg" for i in range(6)],
        "split": ["train"] * 6, "label": [0, 1] * 3, "patient_id": [f"IM-{i:04d}" for i in range(6)],
        "bytes": [1000] * 6, "width": [64] * 6, "height": [48] * 6,
    })


def test_parent_and_children_hold_everything(mlflow_uri, unique_name, trained, tmp_path):
    from mlflow.tracking import MlflowClient

    config = TrainConfig(image_size=IMAGE_SIZE, epochs=2, batch_size=4, vgg16_weights="none")
    report = {"images": 6, "skipped": {"hidden-file": 2}}
    parent = tracking.start_retraining(
        mlflow_uri, unique_name("exp"), "s3://xray-bucket/chest_xray", FINGERPRINT, config,
        data_report=report, manifest=_manifest(),
    )
    metrics, artifacts = _candidate_files(tmp_path, "cnn", trained["history"])
    intervals = metrics.pop("intervals")

    # Two candidates logged from two threads at once: explicit run ids keep them apart.
    children: dict[str, str] = {}
    errors: list[BaseException] = []

    def log(name: str, score: float) -> None:
        try:
            run_id = tracking.start_candidate(parent, name)
            result = CandidateResult(
                name=name, status="ok", threshold=metrics["threshold"], threshold_reached=True, score=score,
                validation=metrics, test=metrics, intervals={"validation": intervals, "test": intervals},
                history=trained["history"], params={"epochs_run": 2},
                seconds=12.5, images_per_second=40.0, artifacts={k: str(v) for k, v in artifacts.items()},
                model=trained["model"],
            )
            tracking.log_candidate(run_id, result, config, data_report=report, class_weight={0: 1.5, 1: 0.75})
            children[name] = run_id
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=log, args=(name, score)) for name, score in (("cnn", 0.8), ("dense", 0.6))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    tracking.finish_retraining(parent)

    client = MlflowClient(mlflow_uri)
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.tags[tracking.TAG_FINGERPRINT] == FINGERPRINT
    assert parent_run.data.tags[tracking.TAG_SOURCE] == "s3://xray-bucket/chest_xray"
    assert parent_run.data.tags[tracking.TAG_VERSION]
    assert parent_run.data.params["image_size"] == str(IMAGE_SIZE)  # a TrainConfig's own fields
    [dataset_input] = parent_run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == FINGERPRINT[:36]  # MLflow's digest column holds 36
    profile = json.loads(dataset_input.dataset.profile)
    assert profile["num_rows"] == 6 and profile["fingerprint"] == FINGERPRINT
    assert "patient_id" in dataset_input.dataset.schema
    parent_files = {item.path for item in client.list_artifacts(parent)}
    assert {"config.json", "data_report.json"} <= parent_files

    assert {run.info.run_id for run in candidate_runs(parent, tracking_uri=mlflow_uri)} == set(children.values())
    # Every logged model belongs to the retraining's experiment (MLflow's default would be experiment 0).
    logged = client.search_logged_models(experiment_ids=[parent_run.info.experiment_id])
    assert sorted(model.source_run_id for model in logged) == sorted(list(children.values()) * 2)
    for name, run_id in children.items():
        run = client.get_run(run_id)
        assert run.data.tags[tracking.PARENT_RUN_TAG] == parent
        assert run.data.tags[tracking.TAG_CANDIDATE] == name
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert params["optimizer"] == "Adam" and float(params["learning_rate"]) == pytest.approx(1e-3)
        assert params["frozen_layers"] == "0" and int(params["trainable_params"]) > 0
        assert params["image_size"] == str(IMAGE_SIZE) and params["class_weight_0"] == "1.5"
        assert params["epochs"] == "2" and params["epochs_run"] == "2"
        data = run.data.metrics
        # A small ordered set a person compares (#27 item 3), rounded to 4 digits; the rest is in metrics.json.
        assert set(data) == {*tracking.HEADLINE, *(f"{key}.ci_{side}" for key in tracking.HEADLINE_WITH_INTERVALS
                                                   for side in ("low", "high")),
                             "threshold", "train_seconds", "images_per_second"} and len(data) <= 20
        assert all(value == round(value, 4) for value in data.values()), data
        assert data["validation.selection_score"] == (0.8 if name == "cnn" else 0.6)
        assert data["threshold"] == pytest.approx(metrics["threshold"], abs=5e-5)
        assert data["test.recall"] == pytest.approx(metrics["recall"], abs=5e-5)
        assert data["test.recall.ci_low"] <= data["test.recall"] <= data["test.recall.ci_high"]
        # Measured figures are metrics (sortable in the UI), not params.
        assert data["train_seconds"] == 12.5 and data["images_per_second"] == 40.0
        files = {item.path for item in client.list_artifacts(run_id)}
        assert {"metrics.json", "data_report.json", "plots"} <= files
        assert {Path(item.path).name for item in client.list_artifacts(run_id, "plots")} == PNG_ARTIFACTS
        [child_input] = run.inputs.dataset_inputs
        assert child_input.dataset.digest == FINGERPRINT[:36]
        assert {tag.value for tag in child_input.tags} == {"training"}
        stored = json.loads(Path(client.download_artifacts(run_id, "metrics.json", str(tmp_path))).read_text())
        assert stored["selection_score"] == data["validation.selection_score"]
        for key in ("loss", "val_loss", "auc", "val_auc"):  # the per-epoch curves, in full
            assert stored["history"][key] == pytest.approx(trained["history"][key])
        assert {"tn", "fp", "ece_uncalibrated", "brier"} <= set(stored["test"]) and stored["intervals"]["validation"]

    # Both logged models load back: the Keras flavor (with a signature) and the pyfunc.
    import mlflow

    run = client.get_run(children["cnn"])
    keras_uri = run.data.tags[tracking.TAG_KERAS_MODEL]
    info = mlflow.models.get_model_info(keras_uri)
    assert "keras" in info.flavors and list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 32, 32, 3]
    assert info.saved_input_example_info is not None
    pixels = np.full((2, IMAGE_SIZE, IMAGE_SIZE, 3), 100.0, dtype="float32")
    np.testing.assert_allclose(mlflow.keras.load_model(keras_uri).predict_on_batch(pixels),
                               trained["model"].predict_on_batch(pixels), rtol=1e-6)
    served = mlflow.pyfunc.load_model(run.data.tags[tracking.TAG_SERVING_MODEL])
    images, _ = labelled_images(1, 1)
    prediction = served.predict(images)
    assert list(prediction.columns) == ["probability", "label"] and len(prediction) == 2
    assert set(prediction["label"]) <= {"NORMAL", "PNEUMONIA"}


def test_unreachable_server_fails_fast_with_the_uri(unique_name):
    port = free_port()  # nothing listens here
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(TrackingError, match=rf"127.0.0.1:{port} is unreachable \(\[Errno 111\] Connection refused\)"):
        check_tracking_server(uri, timeout=2)
    with pytest.raises(TrackingError, match=f"127.0.0.1:{port}") as raised:
        tracking.start_retraining(uri, unique_name("exp"), "local", FINGERPRINT, {"epochs": 1})
    assert isinstance(raised.value, PneumoError) and "\n" not in str(raised.value)


def test_a_server_that_is_not_mlflow_is_rejected(s3_server):
    # The S3 test server answers HTTP but is not MLflow: a plausible misconfiguration.
    with pytest.raises(TrackingError, match=f"{s3_server.endpoint_url} does not answer like an MLflow"):
        check_tracking_server(s3_server.endpoint_url, timeout=5)


def test_bad_store_uris_are_rejected(tmp_path):
    with pytest.raises(TrackingError, match="empty"):
        check_tracking_server("  ")
    (tmp_path / "a-file").write_text("not a folder")
    bad = f"sqlite:///{tmp_path}/a-file/mlflow.db"  # the database cannot be created under a file
    with pytest.raises(TrackingError, match="a-file/mlflow.db"):
        check_tracking_server(bad)
    with pytest.raises(TrackingError, match="nosuchscheme://x"):
        check_tracking_server("nosuchscheme://x")


def test_a_listening_socket_that_never_answers_times_out():
    with socket.socket() as silent:  # accepts connections (backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(TrackingError, match=r"unreachable \(no answer within 0.5 s\)"):
            check_tracking_server(uri, timeout=0.5)


def test_config_flattening_is_json_friendly():
    flat = tracking.flatten({"train": TrainConfig(epochs=3), "models": ["cnn", "dense"], "scale": 0.1})
    assert flat["train.epochs"] == "3" and flat["models"] == '["cnn", "dense"]' and flat["scale"] == "0.1"


def test_a_retraining_run_whose_artifacts_cannot_be_written_is_closed_failed(tmp_path):
    # #25: the parent run was created, then the artifact write failed, and it stayed RUNNING.
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # artifacts under it cannot be written, even as root
    client = MlflowClient(uri)
    experiment = client.create_experiment("unwritable", artifact_location=(blocker / "artifacts").as_uri())
    with pytest.raises(TrackingError, match="cannot start the retraining run"):
        tracking.start_retraining(uri, "unwritable", "data", "f" * 64, {"epochs": 1})
    [run] = client.search_runs([experiment])
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.TAG_ERROR].startswith("cannot start the retraining run")
