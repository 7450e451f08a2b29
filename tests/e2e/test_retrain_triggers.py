"""The three ways a retraining starts, on a real Prefect server with a process worker: new data in
the S3-protocol bucket (watch-dataset's event and retrain-on-new-data's trigger), a schedule that
comes due, and a skip when nothing changed.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from pneumo.data import storage
from pneumo.data.synthetic import generate_dataset
from tests.plugins.prefect_server import prefect_cli, prefect_executable
from tests.plugins.processes import stop_process

REPO = Path(__file__).resolve().parents[2]
TRAIN = {"epochs": 1, "image_size": 32, "batch_size": 16, "vgg16_weights": "none"}
pytestmark = pytest.mark.slow


class Api:
    """The Prefect server's REST API, for what the CLI does not show (runs by deployment, events)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, body: Any = None) -> Any:
        response = requests.request(method, f"{self.url}{path}", json=body, timeout=30)
        assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text[:500]}"
        return response.json() if response.content else None

    def deployment(self, name: str) -> dict[str, Any]:
        return self.call("GET", f"/deployments/name/{name}")

    def runs(self, deployment_id: str) -> list[dict[str, Any]]:
        return self.call("POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})

    def events(self, name: str, resource: str) -> list[dict[str, Any]]:
        body = {"filter": {"event": {"name": [name]}, "resource": {"id": [resource]}}, "limit": 50}
        return self.call("POST", "/events/filter", body)["events"]


def _wait(what: str, check: Callable[[], Any], timeout: float, diagnose: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.5)
    pytest.fail(f"no {what} within {timeout:.0f} s\n{diagnose()}")


def test_unchanged_data_is_skipped_in_seconds_and_one_changed_parameter_trains(
        prefect_api, mlflow_server, unique_name, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from flows.retrain import retrain
    from pneumo.params import RetrainParams

    monkeypatch.setenv("PNEUMO_HOME", str(tmp_path / "home"))
    generate_dataset(tmp_path / "data", seed=7, scale=0.015, image_kind="small")
    experiment, model_name = unique_name("skip-exp"), unique_name("skip-model")
    params = RetrainParams(source=str(tmp_path / "data"), candidates=["dense"], experiment=experiment,
                           registered_model=model_name, tracking_uri=mlflow_server.uri, train=TRAIN,
                           gate={"min_recall": 0.0}, min_images_per_class=1)
    client = MlflowClient(mlflow_server.uri)

    def candidate_runs() -> int:
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        return sum(run.data.tags.get("pneumo.kind") == "candidate" for run in runs)

    assert retrain(params=params)["outcome"] == "trained"
    assert candidate_runs() == 1 and len(client.search_model_versions(f"name = '{model_name}'")) == 1

    started = time.perf_counter()
    state = retrain(params=params, return_state=True)
    skipped, seconds = state.result(), time.perf_counter() - started
    assert skipped["outcome"] == "skipped" and "nothing changed since retraining" in skipped["reason"]
    assert state.is_completed() and state.name == "Skipped" and state.message.startswith("Skipped: nothing changed")
    assert candidate_runs() == 1 and len(client.search_model_versions(f"name = '{model_name}'")) == 1
    parent = client.get_run(skipped["parent_run_id"])
    assert parent.data.tags["pneumo.outcome"] == "skipped" and parent.info.status == "FINISHED"
    assert parent.data.tags["pneumo.skip_reason"] == skipped["reason"]
    # The description: the reason, then the link to the Prefect flow run (the MLflow UI renders it as Markdown).
    assert parent.data.tags["mlflow.note.content"].startswith(skipped["reason"] + "\n\nRetraining run by Prefect flow run [")
    print(f"skipped in {seconds:.1f} s")  # the closing note quotes it; speed is not asserted
    artifacts = Api(prefect_api.api_url).call("POST", "/artifacts/filter", {"artifacts": {
        "key": {"any_": ["retraining-skipped"]}, "flow_run_id": {"any_": [str(state.state_details.flow_run_id)]}}})
    assert [skipped["reason"] in artifact["data"] for artifact in artifacts] == [True]

    changed = params.model_copy(update={"train": params.train.model_copy(update={"epochs": 2})})
    assert retrain(params=changed)["outcome"] == "trained"  # one parameter differs: it trains
    assert candidate_runs() == 2
    forced = retrain(params=changed.model_copy(update={"force": True}))
    assert forced["outcome"] == "trained" and candidate_runs() == 3


def test_a_watch_that_cannot_reach_the_source_or_the_tracking_server_fails_and_emits_nothing(
        prefect_api, mlflow_server, s3_env, unique_name, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.watch import watch_dataset
    from pneumo.errors import StorageError, TrackingError
    from pneumo.params import WatchParams
    from tests.plugins.processes import free_port

    monkeypatch.setenv("PNEUMO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PNEUMO_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    experiment = unique_name("watch-down")
    source = "s3://no-store-here/chest_xray"
    with pytest.raises(StorageError, match="no-store-here"):
        watch_dataset(params=WatchParams(source=source, experiment=experiment, tracking_uri=mlflow_server.uri,
                                         settle_seconds=0))
    generate_dataset(tmp_path / "data", seed=3, scale=0.01, image_kind="small")
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match="unreachable"):
        watch_dataset(params=WatchParams(source=str(tmp_path / "data"), experiment=experiment, tracking_uri=down,
                                         settle_seconds=0))
    api = Api(prefect_api.api_url)
    for resource in (source, str(tmp_path / "data")):
        assert api.events("pneumo.dataset.changed", f"pneumo.dataset.{resource}") == []


def test_a_source_still_being_uploaded_is_left_for_the_next_watch(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from pneumo import pipeline
    from pneumo.config import Settings
    from pneumo.params import WatchParams

    generate_dataset(tmp_path / "data", seed=4, scale=0.01, image_kind="small")
    folder = tmp_path / "data" / "chest_xray" / "train" / "NORMAL"
    params = WatchParams(source=str(tmp_path / "data"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                         experiment="watched", settle_seconds=30)
    settings = Settings(home=tmp_path / "home")

    def upload_during_the_wait(seconds: float) -> None:  # the watch's wait between its two listings
        assert seconds == 30
        (folder / "IM-9999-0001.jpeg").write_bytes(next(folder.glob("*.jpeg")).read_bytes())

    with monkeypatch.context() as patch:
        patch.setattr(pipeline.time, "sleep", upload_during_the_wait)
        settling = pipeline.dataset_changes(params, settings, log=lambda _: None)
    assert settling["status"] == "settling" and settling["changes"] == {"train": {"NORMAL": {"added": 1}}}
    assert "upload is still going" in settling["summary"]

    settled = pipeline.dataset_changes(params.model_copy(update={"settle_seconds": 0}), settings, log=lambda _: None)
    assert settled["status"] == "changed" and "previous_run_id" not in settled  # no retraining yet: all is new
    assert settled["added"] == settled["images"] and settled["removed"] == settled["changed"] == 0


def test_the_skip_finds_its_source_behind_a_newer_retraining_of_another(tmp_path: Path) -> None:
    from pneumo import pipeline
    from pneumo.params import RetrainParams
    from pneumo.promotion import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ours = RetrainParams(source="s3://bucket-a/x", candidates=["dense"], experiment="shared", tracking_uri=uri)
    other = ours.model_copy(update={"source": "s3://bucket-b/y"})
    for params in (ours, other):  # the other source's retraining is the newest in the experiment
        run_id = tracking.start_retraining(uri, "shared", params.source, "f" * 64, params)
        tracking.finish_retraining(run_id, tracking_uri=uri)
        time.sleep(0.01)  # distinct start times
    assert "nothing changed since retraining" in pipeline.skip_reason(ours, "f" * 64)
    assert pipeline.skip_reason(ours, "e" * 64) is None  # one image differs: it trains


# ----------------------------------------------------------------------------- new images, on a schedule
# This test waits for a cron's minute (up to 60 s), then for the watch and the retraining it triggers, on a
# worker process. Its set-up (`watched`) runs when this module starts, when the test is collected, so that the
# wait and those runs overlap the module's other tests; the test itself is last in the file.


@dataclass
class Watched:
    """The watch and retrain-on-new-data deployments pointed at one bucket, a schedule due at ``due``, a worker."""

    api: Api
    source: str
    experiment: str
    model_name: str
    watch: dict[str, Any]
    on_new_data: dict[str, Any]
    schedule: dict[str, Any]
    due: datetime  # the schedule's one time in the next day: a whole minute, 20 to 80 s after it was made
    worker: subprocess.Popen[bytes]
    log_path: Path

    def diagnose(self) -> str:
        states = {name: [r["state_type"] for r in self.api.runs(d["id"])] for name, d in
                  (("watch", self.watch), ("on-new-data", self.on_new_data))}
        return f"runs: {states}\nworker:\n{self.log_path.read_text(errors='replace')[-6000:]}"


@pytest.fixture(scope="module")
def watched(deployed, prefect_server, s3_server, mlflow_server,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watched]:
    api = Api(prefect_server.api_url)
    tmp_path = tmp_path_factory.mktemp("watched")
    bucket = s3_server.make_bucket("watched")
    source = f"s3://{bucket}/kaggle"
    suffix = uuid.uuid4().hex[:10]
    experiment, model_name = f"watch-exp-{suffix}", f"watch-model-{suffix}"

    # The deployments as prefect.yaml defines them, pointed at this test's bucket, experiment and a tiny training.
    watch, on_new_data = api.deployment("watch-dataset/watch-dataset"), api.deployment("retrain/retrain-on-new-data")
    api.call("PATCH", f"/deployments/{watch['id']}",
             {"parameters": {"params": {"source": source, "experiment": experiment, "settle_seconds": 1}}})
    api.call("PATCH", f"/deployments/{on_new_data['id']}", {"parameters": {"params": {
        "source": source, "experiment": experiment, "registered_model": model_name, "candidates": ["dense"],
        "train": TRAIN, "gate": {"min_recall": 0.0}, "min_images_per_class": 1}}})
    # A cron schedule that comes due once during the test (one minute of the day): the server creates the run,
    # the worker executes it. Made first, so that the wait for its minute overlaps the upload and the worker's
    # start; the run cannot start before both are done (no worker polls the pool until then).
    due = (datetime.now(UTC) + timedelta(seconds=20)).replace(second=0, microsecond=0) + timedelta(minutes=1)
    [schedule] = api.call("POST", f"/deployments/{watch['id']}/schedules", [
        {"schedule": {"cron": f"{due.minute} {due.hour} * * *", "timezone": "UTC"}, "active": True}])
    local = tmp_path / "dataset"
    generate_dataset(local, seed=5, scale=0.015, image_kind="small")
    with pytest.MonkeyPatch.context() as patch:  # what s3_env sets, for this upload only
        for name, value in {**s3_server.env, "AWS_CONFIG_FILE": os.devnull,
                            "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
            patch.setenv(name, value)
        storage.upload_tree(local, source, endpoint_url=s3_server.endpoint_url)

    worker_env = {**deployed, **s3_server.env, "PNEUMO_S3_ENDPOINT_URL": s3_server.endpoint_url,
                  "MLFLOW_TRACKING_URI": mlflow_server.uri, "PNEUMO_HOME": str(tmp_path / "worker-home"),
                  "PNEUMO_REPO_DIR": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", "PREFECT_WORKER_QUERY_SECONDS": "2"}
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [prefect_executable(), "worker", "start", "--pool", "pneumo-process", "--limit", "2"], cwd=tmp_path,
            env=worker_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield Watched(api, source, experiment, model_name, watch, on_new_data, schedule, due, worker, log_path)
    finally:
        stop_process(worker)
        requests.delete(f"{api.url}/deployments/{watch['id']}/schedules/{schedule['id']}", timeout=30)


@pytest.fixture(scope="module", autouse=True)
def _watch_set_up_first(request: pytest.FixtureRequest) -> None:
    name = "test_new_images_start_exactly_one_retraining_and_a_quiet_watch_emits_nothing"
    if any(getattr(item, "module", None) is request.module and getattr(item, "originalname", None) == name
           for item in request.session.items):
        request.getfixturevalue("watched")


def test_new_images_start_exactly_one_retraining_and_a_quiet_watch_emits_nothing(
        watched: Watched, deployed, mlflow_server) -> None:
    from mlflow import MlflowClient

    api, watch, on_new_data, diagnose = watched.api, watched.watch, watched.on_new_data, watched.diagnose
    assert on_new_data["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    try:
        [scheduled] = _wait("scheduled watch run", lambda: [
            r for r in api.runs(watch["id"]) if r["state_type"] == "COMPLETED"], 180, diagnose)
        due = datetime.fromisoformat(scheduled["expected_start_time"].replace("Z", "+00:00"))
        assert scheduled["auto_scheduled"] and (due.second, due.microsecond) == (0, 0)  # on the cron's minute
        assert due == watched.due
        api.call("DELETE", f"/deployments/{watch['id']}/schedules/{watched.schedule['id']}")  # and its future runs
        resource = f"pneumo.dataset.{watched.source}"
        [event] = _wait("pneumo.dataset.changed event", lambda: api.events("pneumo.dataset.changed", resource),
                        60, diagnose)
        assert event["payload"]["added"] > 0 and event["payload"]["removed"] == event["payload"]["changed"] == 0
        assert event["payload"]["changes"]["train"]["PNEUMONIA"]["added"] > 0

        finished = _wait("finished retrain-on-new-data run", lambda: [
            r for r in api.runs(on_new_data["id"]) if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")], 420,
            diagnose)
        assert [r["state_type"] for r in finished] == ["COMPLETED"], diagnose()

        # Nothing changed since that retraining: a watch run by hand emits nothing, and no retraining starts.
        run = prefect_cli(deployed, "deployment", "run", "watch-dataset/watch-dataset", "--watch",
                       "--watch-timeout", "180", timeout=240)
        assert "Completed" in run.stdout, run.stdout[-2000:]
        time.sleep(5)  # time for a (wrong) trigger to act
        assert len(api.events("pneumo.dataset.changed", resource)) == 1
        assert [r["state_type"] for r in api.runs(on_new_data["id"])] == ["COMPLETED"], diagnose()
    finally:
        stop_process(watched.worker)

    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name(watched.experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("pneumo.kind") == "retraining"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert client.get_model_version_by_alias(watched.model_name, "champion").version == "1"
    assert parents[0].data.tags["pneumo.code_version"] and parents[0].data.tags["pneumo.params_digest"]
