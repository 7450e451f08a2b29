"""End to end: prefect.yaml deployed on a real Prefect server, a process worker, `prefect deployment run`.

The dataset lives on the S3-protocol test server and runs are tracked on a real `mlflow server`,
all on 127.0.0.1.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pneumo.data.synthetic import generate_dataset
from tests.plugins.prefect_server import prefect_cli, prefect_executable
from tests.plugins.processes import stop_process

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_weekly_deployment_carries_its_cron_schedule(deployed: dict[str, str]) -> None:
    out = prefect_cli(deployed, "deployment", "inspect", "retrain/retrain-weekly").stdout
    assert "0 3 * * 1" in out and "UTC" in out
    assert "pneumo-process" in out


def test_bad_parameters_are_refused_by_deployment_run(deployed: dict[str, str]) -> None:
    result = subprocess.run(
        [prefect_executable(), "deployment", "run", "retrain/retrain-on-demand",
         "--param", 'params={"train": {"epochs": 0}}'],
        cwd=REPO, env=deployed, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "params.train.epochs" in output and "minimum of 1" in output  # named before any run exists


def test_deployment_run_trains_registers_and_reports(deployed, s3_server, s3_env, mlflow_server, unique_name,
                                                     tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from pneumo.data import storage

    bucket = s3_server.make_bucket("e2e")
    model_name, experiment = unique_name("e2e-model"), unique_name("e2e-exp")

    worker_env = {**deployed, **s3_server.env, "PNEUMO_S3_ENDPOINT_URL": s3_server.endpoint_url,
                  "MLFLOW_TRACKING_URI": mlflow_server.uri, "PNEUMO_HOME": str(tmp_path / "worker-home"),
                  "PNEUMO_REPO_DIR": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen([prefect_executable(), "worker", "start", "--pool", "pneumo-process"],
                              cwd=tmp_path, env=worker_env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        # While the worker starts (seconds): the dataset, on the bucket before any run exists.
        local = tmp_path / "dataset"
        generate_dataset(local, seed=11, scale=0.015, image_kind="small")
        storage.upload_tree(local, f"s3://{bucket}/kaggle", endpoint_url=s3_server.endpoint_url)
        params = {"source": f"s3://{bucket}/kaggle", "min_images_per_class": 1,
                  "train": {"epochs": 1, "image_size": 36, "batch_size": 16, "vgg16_weights": "none"},
                  "gate": {"min_recall": 0.0}, "registered_model": model_name, "experiment": experiment}
        run = subprocess.run(
            [prefect_executable(), "deployment", "run", "retrain/retrain-on-demand",
             "--param", f"params={json.dumps(params)}", "--watch", "--watch-timeout", "600"],
            cwd=REPO, env=deployed, capture_output=True, text=True, timeout=660)
        worker_log = (tmp_path / "worker.log").read_text(errors="replace")
        assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-2000:]}\nworker:\n{worker_log[-6000:]}"
        assert "Completed" in run.stdout
    finally:
        stop_process(worker)
        log.close()

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.tags.get("pneumo.candidate") for r in children) == ["cnn", "cnn_deep", "dense", "vgg16"]
    # The run a version came from is marked in its name, the others keep the candidate's name (#27 item 4).
    assert sorted(r.info.run_name for r in children if r.info.run_name != r.data.tags["pneumo.candidate"]) == [
        f"{r.data.tags['pneumo.candidate']} (registered v1)" for r in children if "pneumo.registered_version" in r.data.tags]
    champion = client.get_model_version_by_alias(model_name, "champion")
    assert champion.run_id in {r.info.run_id for r in children}

    # The leaderboard artifact is on the Prefect server, with every candidate in it.
    artifact = prefect_cli(deployed, "artifact", "inspect", "leaderboard").stdout
    assert "table" in artifact
    for name in ("dense", "cnn_deep", "vgg16", "selected"):
        assert name in artifact
