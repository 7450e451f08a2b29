"""A Dask worker killed mid-retraining: no candidate run stays RUNNING, none is trained twice (#25 item 5)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from pneumo.params import RetrainParams

pytestmark = pytest.mark.slow


def _runs(client, parent: str) -> list:
    experiment = client.get_run(parent).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def test_a_killed_worker_leaves_no_running_and_no_duplicate_candidate_runs(
        mlflow_server, tmp_path: Path, unique_name) -> None:
    import dask
    from distributed import Client, LocalCluster
    from mlflow import MlflowClient

    from pneumo import pipeline
    from pneumo.config import Settings
    from pneumo.data.synthetic import generate_dataset
    from pneumo.promotion import tracking

    generate_dataset(tmp_path / "data", seed=5, scale=0.015, image_kind="small")
    settings = Settings(home=tmp_path / "home", tf_threads=1)
    params = RetrainParams(source=str(tmp_path / "data"), candidates=["dense"], tracking_uri=mlflow_server.uri,
                           train={"epochs": 1, "image_size": 32, "batch_size": 16}, min_images_per_class=1,
                           ).resolved(settings)
    ingested = pipeline.ingest(params.source, settings)
    data = pipeline.prepare_data(ingested.root, ingested.frame, params.train, min_per_class=1, log=lambda _: None)
    parent = tracking.start_retraining(mlflow_server.uri, unique_name("lost-worker"), params.source,
                                       ingested.fingerprint, params)
    mlflow = MlflowClient(mlflow_server.uri)
    # No work stealing: both candidates go to worker A, one after the other, until A is gone.
    with dask.config.set({"distributed.scheduler.work-stealing": False}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                         host="127.0.0.1") as cluster, Client(cluster) as client:
        a = sorted(client.scheduler_info()["workers"])[0]
        pid_a = client.run(os.getpid, workers=[a])[a]
        futures = {name: client.submit(pipeline.train_and_log, name, data.frame, params, parent, data.report,
                                       settings, key=f"train-{name}", workers=[a], allow_other_workers=True)
                   for name in ("dense", "cnn")}
        first = futures["dense"].result(timeout=120)  # its result now lives in A's memory
        deadline = time.monotonic() + 120
        while not [run for run in _runs(mlflow, parent) if run.data.tags.get("pneumo.candidate") == "cnn"]:
            assert time.monotonic() < deadline, "cnn never started on worker A"
            time.sleep(0.2)
        os.kill(pid_a, signal.SIGKILL)  # mid-way through cnn: Dask reruns cnn, and dense, whose result was lost
        results = {name: future.result(timeout=180) for name, future in futures.items()}

    runs = _runs(mlflow, parent)
    assert not [run.info.run_id for run in runs if run.info.status == "RUNNING"]
    by_name = {name: [run for run in runs if run.data.tags.get("pneumo.candidate") == name] for name in futures}
    for name, found in by_name.items():
        assert [run.info.status for run in found].count("FINISHED") == 1, (name, [r.info.status for r in found])
    # dense was not trained again: the rerun reused its logged run.
    assert [run.info.run_id for run in by_name["dense"]] == [first["run_id"]] == [results["dense"]["run_id"]]
    [lost] = [run for run in by_name["cnn"] if run.info.status == "FAILED"]
    assert "was lost" in lost.data.tags[tracking.TAG_ERROR] and results["cnn"]["run_id"] in lost.data.tags["mlflow.note.content"]
