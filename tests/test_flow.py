"""The retraining flow against real servers: failure policy, all-fail, and Dask GPU-resource placement."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from pneumo.config import RetrainParams
from pneumo.synthetic import generate_dataset

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
    assert by_model["vgg16"]["status"].startswith("failed") and "missing-weights.h5" in by_model["vgg16"]["status"]
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

    # Two worker processes, each declaring one GPU: at most two candidates may run at once.
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, resources={"GPU": 1},
                      dashboard_address=None, host="127.0.0.1") as cluster, Client(cluster) as client:
        worker_pids = set(client.run(os.getpid).values())
        params = RetrainParams(source=str(tiny_source), candidates=["dense", "cnn", "cnn_deep", "vgg16"],
                               train={**TINY_TRAIN, "vgg16_weights": "none"}, registered_model=unique_name("dask-model"),
                               experiment=unique_name("dask-exp"), tracking_uri=flow_env.uri, **TINY)
        result = retrain.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(params=params)
    runs = result["candidates"]
    assert [c["status"] for c in runs] == ["ok"] * 4, json.dumps(runs, default=str)[:2000]
    assert {c["pid"] for c in runs} <= worker_pids and os.getpid() not in {c["pid"] for c in runs}
    events = sorted([(c["started"], 1) for c in runs] + [(c["finished"], -1) for c in runs])
    running, most = 0, 0
    for _, change in events:
        running += change
        most = max(most, running)
    assert most <= 2
