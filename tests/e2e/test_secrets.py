"""No credential in any output: a credentialed tracking URI reaches no log, error, param, tag or artifact."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from pneumo.data.synthetic import generate_dataset
from pneumo.errors import has_credentials, redact
from pneumo.cli import main
from pneumo.params import RetrainParams, WatchParams

SECRET = "SECRET42xyz"


@pytest.mark.parametrize(("uri", "shown"), [
    (f"https://u:{SECRET}@127.0.0.1:9", "https://***@127.0.0.1:9"),
    (f"postgresql://u:{SECRET}@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    (f"http://127.0.0.1:5000/?password={SECRET}&x=1", "http://127.0.0.1:5000/?password=***&x=1"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    # #25: passwords holding '@' or '/', and libpq's and API-key parameters.
    (f"https://u:p@ss{SECRET}@127.0.0.1:9/x", "https://***@127.0.0.1:9/x"),
    (f"https://u:pa/ss{SECRET}@127.0.0.1:9", "https://***@127.0.0.1:9"),
    (f"postgresql://db/m?sslpassword={SECRET}&api_key={SECRET}", "postgresql://db/m?sslpassword=***&api_key=***"),
    ("s3://bucket/chest_xray/img@2x.png", "s3://bucket/chest_xray/img@2x.png"),  # a key, not a credential
    # #25 item 1d: every scheme, and the "scheme:/" that str(Path("file://...")) collapses a URI to.
    (f"file://u:{SECRET}@host/x", "file://***@host/x"),
    (f"file://{SECRET}@localhost/x", "file://***@localhost/x"),
    (str(Path(f"file://u:{SECRET}@host/x")), "file:/***@host/x"),
    (f"smb://{SECRET}@nas/share", "smb://***@nas/share"),
    ("file:///data/img@2x/chest_xray", "file:///data/img@2x/chest_xray"),
])
def test_redact_removes_user_info_and_password_parameters(uri: str, shown: str) -> None:
    assert redact(uri) == shown and has_credentials(uri) == (uri != shown)


def test_a_credentialed_tracking_uri_parameter_is_refused() -> None:
    with pytest.raises(ValidationError, match="must not carry credentials") as raised:
        RetrainParams(tracking_uri=f"http://u:{SECRET}@127.0.0.1:5000")
    assert SECRET not in str(raised.value)


@pytest.mark.parametrize("params", [RetrainParams, WatchParams])
@pytest.mark.parametrize("source", [f"file://u:{SECRET}@host/x", f"file://{SECRET}@localhost/x",
                                    f"s3://AKIA:{SECRET}@bucket/x", f"s3://bucket/x?X-Amz-Signature={SECRET}"])
def test_a_credentialed_source_parameter_is_refused(params: type, source: str) -> None:
    # #25 item 1d: `source: file://u:SECRET@host/x` was accepted (stored in Prefect and MLflow) and echoed.
    with pytest.raises(ValidationError, match="source must not carry credentials") as raised:
        params(source=source)
    assert SECRET not in str(raised.value)


def test_a_credentialed_dataset_folder_is_not_echoed_by_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    # The CLI takes --data/DATA as a path: "file://u:p@host/x" reaches errors as "file:/u:p@host/x".
    assert main(["manifest", f"file://u:{SECRET}@host/x"]) == 2
    err = capsys.readouterr().err
    assert "pneumo: error:" in err and "file:/***@host/x" in err and SECRET not in err


@pytest.mark.parametrize("uri", [f"https://u:{SECRET}@127.0.0.1:9", f"postgresql://u:{SECRET}@127.0.0.1:9/db"])
def test_cli_errors_never_show_the_password(uri: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pneumo.cli", "champion"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri, "PATH": "/usr/bin:/bin",
                                                            "HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 2 and "pneumo: error:" in result.stderr
    assert "127.0.0.1:9" in result.stderr and SECRET not in result.stdout + result.stderr


@pytest.mark.slow
def test_a_retraining_stores_the_secret_nowhere(prefect_server, prefect_api, mlflow_server, unique_name,
                                                tmp_path: Path) -> None:
    from mlflow import MlflowClient

    source = tmp_path / "data"
    generate_dataset(source, seed=5, scale=0.015, image_kind="small")
    host = mlflow_server.uri.removeprefix("http://")
    experiment = unique_name("secret-exp")
    params = RetrainParams(source=str(source), candidates=["dense"], experiment=experiment,
                           registered_model=unique_name("secret-model"), min_images_per_class=1,
                           train={"epochs": 1, "image_size": 40, "batch_size": 16}, gate={"min_recall": 0.0})
    # A worker's own process, as a deployment runs it: everything it prints is what an operator sees.
    # Its environment may carry credentials (MLflow passes them to the server); parameters may not.
    code = ("import sys, json; from flows.retrain import retrain; from pneumo.params import RetrainParams; "
            "result = retrain(params=RetrainParams.model_validate_json(sys.argv[1])); "
            "print('VERSION', result['decision']['version'])")
    env = {**os.environ, **prefect_server.env, "MLFLOW_TRACKING_URI": f"http://pneumo:{SECRET}@{host}",
           "PNEUMO_HOME": str(tmp_path / "home"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run([sys.executable, "-c", code, params.model_dump_json()], capture_output=True, text=True,
                         env=env, cwd=Path(__file__).resolve().parents[2], timeout=900)
    assert run.returncode == 0 and "VERSION" in run.stdout, run.stderr[-3000:]
    assert SECRET not in run.stdout + run.stderr

    # MLflow: every param, tag and artifact of every run of the retraining.
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 2
    for run in runs:
        assert SECRET not in json.dumps(run.data.params) + json.dumps(run.data.tags)
        folder = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id)))
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix in (".json", ".md", ".txt", ".yaml", ""):
                assert SECRET.encode() not in path.read_bytes(), path
        assert SECRET not in json.dumps(run.data.tags)
    # Prefect: the stored flow parameters, every log line and every artifact of the run.
    asyncio.run(_check_prefect(experiment))  # prefect_api points this process's client at the same server


async def _check_prefect(experiment: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter, FlowRunFilterId, LogFilter

    async with get_client() as client:
        runs = await client.read_flow_runs(limit=200, sort="START_TIME_DESC")
        [flow_run] = [run for run in runs if experiment in json.dumps(run.parameters, default=str)]
        assert SECRET not in json.dumps(flow_run.parameters, default=str)
        # The line naming the tracking server is where a leak would show; wait for the worker's logs to land.
        for _ in range(60):
            logs = await client.read_logs(LogFilter(flow_run_id={"any_": [flow_run.id]}), limit=200)
            if any("MLflow parent run" in log.message for log in logs):
                break
            await asyncio.sleep(0.5)
        [server_line] = [log.message for log in logs if "MLflow parent run" in log.message]
        assert "127.0.0.1" in server_line
        assert not [log.message for log in logs if SECRET in log.message]
        artifacts = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
                                                artifact_filter=ArtifactFilter())
        assert {artifact.key for artifact in artifacts} >= {"leaderboard", "promotion-decision"}
        assert not [a.key for a in artifacts if SECRET in json.dumps(a.data, default=str)]


def test_a_failed_candidates_error_is_stored_and_shown_without_its_secret(tmp_path) -> None:
    # #25 item 1b: a candidate's str(error) went unredacted into its leaderboard row and the pneumo.error tag.
    from mlflow import MlflowClient

    from flows.retrain import _failed
    from pneumo.promotion import tracking

    error = RuntimeError(f"API request to http://u:{SECRET}@127.0.0.1:5000/api failed")
    row = _failed("cnn", error)
    assert SECRET not in row["error"] and "http://***@127.0.0.1:5000" in row["error"]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.start_retraining(uri, "secrets", "data", "f" * 64, {"epochs": 1})
    tracking.finish_retraining(run_id, status="FAILED", error=str(error), tracking_uri=uri)
    tag = MlflowClient(uri).get_run(run_id).data.tags[tracking.TAG_ERROR]
    assert SECRET not in tag and tag.startswith("API request to http://***@127.0.0.1:5000")
