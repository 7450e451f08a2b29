"""The retraining flow against real servers: failure policy, all-fail, and Dask GPU-resource placement."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from pneumo.data.synthetic import generate_dataset
from pneumo.params import RetrainParams

TINY_TRAIN = {"epochs": 1, "image_size": 40, "batch_size": 16}
TINY = {"gate": {"min_recall": 0.0}, "min_images_per_class": 1}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"candidates": ["resnet"]}, "unknown model 'resnet'; choose one of: dense, cnn, cnn_deep, vgg16"),
        ({"candidates": []}, "candidates"),
        ({"candidates": ["cnn", "cnn"]}, "must not repeat"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"train": {"image_size": 8}}, "train.image_size"),
        ({"train": {"image_size": 33}}, "cnn_deep needs ≥ 36"),  # fits cnn, not the deeper model
        ({"train": {"recall_target": 1.5}}, "train.recall_target"),
        ({"gate": {"margin": float("nan")}}, "gate.margin"),
        ({"gate": {"min_recall": float("inf")}}, "gate.min_recall"),
        ({"registered_model": "bad name/with slash"}, "registered_model"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_parameters_are_rejected_before_any_work(bad: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RetrainParams(**bad)


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-source")
    generate_dataset(root, seed=5, scale=0.015, image_kind="small")
    return root


@pytest.fixture
def flow_env(prefect_api, mlflow_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PNEUMO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    return mlflow_server


@pytest.mark.slow
def test_failed_candidate_is_reported_and_survivor_promoted(flow_env, tiny_source: Path, tmp_path: Path,
                                                             unique_name) -> None:
    from mlflow import MlflowClient

    from flows.retrain import retrain

    model_name = unique_name("flow-model")
    params = RetrainParams(source=str(tiny_source), candidates=["cnn", "vgg16"], registered_model=model_name,
                           train={**TINY_TRAIN, "vgg16_weights": str(tmp_path / "missing-weights.h5")},
                           experiment=unique_name("flow-exp"), tracking_uri=flow_env.uri, **TINY)
    result = retrain(params=params)
    by_model = {row["model"]: row for row in result["leaderboard"]}
    assert by_model["vgg16"]["status"] == "failed" and "missing-weights.h5" in by_model["vgg16"]["error"]
    assert by_model["cnn"]["status"].startswith("selected")
    assert result["decision"]["candidate"] == "cnn"
    client = MlflowClient(flow_env.uri)
    assert client.get_model_version_by_alias(model_name, "champion").version == str(result["decision"]["version"])


@pytest.mark.slow
def test_all_candidates_failing_fails_the_run_and_moves_no_alias(flow_env, tiny_source: Path, tmp_path: Path,
                                                                 unique_name) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from flows.retrain import retrain

    model_name = unique_name("flow-none")
    params = RetrainParams(source=str(tiny_source), candidates=["vgg16"], registered_model=model_name,
                           train={**TINY_TRAIN, "vgg16_weights": str(tmp_path / "missing.h5")}, tracking_uri=flow_env.uri,
                           experiment=unique_name("flow-exp"), **TINY)
    with pytest.raises(RuntimeError, match="every candidate failed"):
        retrain(params=params)
    with pytest.raises(MlflowException):
        MlflowClient(flow_env.uri).get_registered_model(model_name)


def test_unreachable_tracking_server_fails_before_ingest(prefect_api, tiny_source: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.retrain import retrain
    from pneumo.errors import PneumoError
    from tests.plugins.s3 import free_port

    monkeypatch.setenv("PNEUMO_HOME", str(tmp_path / "home"))
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PneumoError, match=uri.replace(".", r"\.")):
        retrain(params=RetrainParams(source=str(tiny_source), tracking_uri=uri, train=TINY_TRAIN, **TINY))
    assert not (tmp_path / "home" / "cache").exists()  # nothing was ingested


@pytest.mark.slow
def test_dask_cluster_runs_one_candidate_per_gpu_worker(flow_env, tiny_source: Path, unique_name) -> None:
    from distributed import Client, LocalCluster
    from prefect_dask import DaskTaskRunner

    from flows.retrain import retrain

    def import_training() -> int:
        """What a candidate's task imports first (TensorFlow, Keras, MLflow)."""
        import pneumo.pipeline  # noqa: F401
        import pneumo.promotion.tracking  # noqa: F401
        import pneumo.training.train  # noqa: F401

        return os.getpid()

    # Two worker processes, each declaring one GPU: at most two candidates may run at once.
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, resources={"GPU": 1},
                      dashboard_address=None, host="127.0.0.1") as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        worker_pids = set(client.run(os.getpid).values())
        # Each worker imports TensorFlow while the flow ingests and validates here (no GPU resource taken,
        # so the candidates' placement is as before); the candidates then start on warm workers.
        warm = [client.submit(import_training, key=f"import-training-{n}", workers=[address], allow_other_workers=False)
                for n, address in enumerate(client.scheduler_info()["workers"])]
        params = RetrainParams(source=str(tiny_source), candidates=["dense", "cnn", "cnn_deep", "vgg16"],
                               train={**TINY_TRAIN, "image_size": 36, "vgg16_weights": "none"},  # cnn_deep's least
                               registered_model=unique_name("dask-model"),
                               experiment=unique_name("dask-exp"), tracking_uri=flow_env.uri, **TINY)
        result = retrain.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(params=params)
        assert set(client.gather(warm)) == worker_pids
    runs = result["candidates"]
    assert [c["status"] for c in runs] == ["ok"] * 4, json.dumps(runs, default=str)[:2000]
    assert {c["pid"] for c in runs} <= worker_pids and os.getpid() not in {c["pid"] for c in runs}
    events = sorted([(c["started"], 1) for c in runs] + [(c["finished"], -1) for c in runs])
    running, most = 0, 0
    for _, change in events:
        running += change
        most = max(most, running)
    assert most <= 2


@pytest.mark.slow
def test_a_promotion_that_fails_after_training_closes_the_parent_run(flow_env, s3_server, tiny_source: Path,
                                                                     unique_name) -> None:
    from mlflow import MlflowClient

    from flows.retrain import retrain
    from pneumo.config import Gate
    from pneumo.evaluation.holdout import TestSet
    from pneumo.promotion import registry
    from tests.plugins.mlflow_server import brightness_model, labelled_images, log_retraining, threshold_for

    # A champion whose model files were lost from the artifact store: the gate cannot evaluate it.
    model_name, experiment = unique_name("flow-broken"), unique_name("flow-exp")
    first = log_retraining(flow_env.uri, experiment, brightness_model(40), {"cnn": (threshold_for(128), 0.9)})
    images, labels = labelled_images(3, 3)
    champion = registry.promote(first, TestSet(images, labels, [str(i) for i in range(6)]),
                                gate=Gate(floors_on="point"), model_name=model_name, tracking_uri=flow_env.uri)
    client = MlflowClient(flow_env.uri)
    model_id = champion.evaluation.model_uri.removeprefix("models:/")
    assert s3_server.delete_keys_containing(flow_env.artifacts_destination.split("/")[2], model_id)

    params = RetrainParams(source=str(tiny_source), candidates=["dense"], registered_model=model_name,
                           experiment=experiment, tracking_uri=flow_env.uri, train=TINY_TRAIN, **TINY)
    with pytest.raises(Exception):  # noqa: B017 - whatever the store says, the flow fails
        retrain(params=params)
    [parent] = [run for run in client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
                if run.data.tags.get("pneumo.kind") == "retraining" and run.info.run_id != first]
    assert parent.info.status == "FAILED"  # never left RUNNING
    assert parent.data.tags["pneumo.error"]
    assert client.get_model_version_by_alias(model_name, "champion").version == champion.version


@pytest.mark.slow
def test_a_tracking_outage_after_training_keeps_the_model_and_retries_only_the_logging(
        mlflow_server, tiny_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unique_name) -> None:
    from mlflow import MlflowClient

    from pneumo import pipeline
    from pneumo.config import Settings
    from pneumo.promotion import tracking
    from tests.plugins.s3 import FaultProxy

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail now, not after minutes of back-off
    settings = Settings(home=tmp_path / "home")
    params = RetrainParams(source=str(tiny_source), candidates=["dense"], tracking_uri=mlflow_server.uri,
                           train=TINY_TRAIN, **TINY).resolved(settings)
    ingested = pipeline.ingest(params.source, settings)
    data = pipeline.prepare_data(ingested.root, ingested.frame, params.train, min_per_class=1, log=lambda _: None)
    parent = tracking.start_retraining(mlflow_server.uri, unique_name("outage"), params.source, ingested.fingerprint,
                                       params)
    lines: list[str] = []
    # The tracking server stops taking metrics and params after the candidate trained.
    with FaultProxy.start(mlflow_server.uri, fail_rate=1.0, faults=("503",), methods=("POST",),
                          only="log-batch") as proxy:
        outage = params.model_copy(update={"tracking_uri": proxy.endpoint_url})
        with pytest.raises(tracking.CandidateLoggingError) as raised:
            pipeline.train_and_log("dense", data.frame, outage, parent, data.report, settings, log=lines.append)
    assert raised.value.transient  # the flow's retry condition retries it
    assert (settings.home / "runs" / parent / "dense" / "pending" / "model.keras").is_file()
    # The retry (server back) logs the kept model: no second training.
    result = pipeline.train_and_log("dense", data.frame, params, parent, data.report, settings, log=lines.append)
    assert sum("epoch 1/1" in line for line in lines) == 1
    assert any("trained by an earlier attempt" in line for line in lines)
    run = MlflowClient(mlflow_server.uri).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and "pneumo.serving_model_uri" in run.data.tags
    assert not (settings.home / "runs" / parent / "dense" / "pending").exists()


def test_a_torn_pending_result_means_training_again_not_failing_every_retry(tmp_path: Path) -> None:
    # #25: result.json of a kept model was not written atomically; a torn one failed every retry.
    from pneumo.pipeline import _restore

    pending = tmp_path / "pending"
    pending.mkdir()
    (pending / "model.keras").write_bytes(b"kept model")
    (pending / "result.json").write_text('{"name": "dense", "status": "o')  # cut off mid-write
    assert _restore(pending) is None
