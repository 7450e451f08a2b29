"""A candidate's attempts: runs left RUNNING are closed, scratch of finished retrainings is swept, and
the retraining's promotion task retries transient failures only (#25 items 5, 7, 14)."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

from pneumo import pipeline
from pneumo.promotion import tracking


def _parent(uri: str, experiment: str) -> str:
    return tracking.start_retraining(uri, experiment, "data", "f" * 64, {"epochs": 1})


def test_candidate_runs_left_running_are_closed_failed_with_the_reason(mlflow_server, unique_name) -> None:
    from mlflow import MlflowClient

    uri, client = mlflow_server.uri, MlflowClient(mlflow_server.uri)
    parent = _parent(uri, unique_name("abandoned"))
    lost = tracking.start_candidate(parent, "cnn", tracking_uri=uri)  # its worker died: nobody closes it
    done = tracking.start_candidate(parent, "dense", tracking_uri=uri)
    client.set_terminated(done, status="FINISHED")
    assert pipeline.close_abandoned_candidates(parent, uri, log=lambda _: None) == [lost]
    run = client.get_run(lost)
    assert run.info.status == "FAILED" and "worker was lost" in run.data.tags[tracking.TAG_ERROR]
    assert run.data.tags["mlflow.note.content"] == run.data.tags[tracking.TAG_ERROR]
    assert client.get_run(done).info.status == "FINISHED"


@contextmanager
def _held(candidate_dir: Path):
    """Hold a candidate folder's lock as a writing attempt does."""
    import fcntl

    with open(candidate_dir / "pending.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def _scratch(runs: Path, run_id: str, name: str = "cnn") -> Path:
    pending = runs / run_id / name / "pending"
    pending.mkdir(parents=True)
    (pending / "model.keras").write_bytes(b"kept model")
    return pending.parent


def test_scratch_of_retrainings_that_are_over_is_swept_but_never_one_being_written(
        mlflow_server, unique_name, tmp_path: Path) -> None:
    # #25: kept models (pending folders) were never cleaned up.
    from mlflow import MlflowClient

    uri, client, runs = mlflow_server.uri, MlflowClient(mlflow_server.uri), tmp_path / "runs"
    experiment = unique_name("sweep")
    finished, running, writing, current = (_parent(uri, experiment) for _ in range(4))
    for run_id in (finished, writing):
        client.set_terminated(run_id, status="FAILED")
    old_unknown, new_unknown = "a" * 32, "b" * 32  # not runs of this server (another one's, or deleted)
    folders = {run_id: _scratch(runs, run_id) for run_id in (finished, running, writing, current, old_unknown,
                                                             new_unknown)}
    week_ago = time.time() - pipeline.STALE_SCRATCH_SECONDS - 60
    for path in [runs / old_unknown, *(runs / old_unknown).rglob("*")]:
        os.utime(path, (week_ago, week_ago))
    with _held(folders[writing]):  # an attempt (a lost worker's, say) is writing it right now
        removed = pipeline.sweep_scratch(runs, current, uri)
    assert sorted(removed) == sorted([folders[finished], folders[old_unknown]])
    assert not (runs / finished).exists() and not (runs / old_unknown).exists()
    for kept in (running, writing, current, new_unknown):
        assert (folders[kept] / "pending" / "model.keras").is_file(), kept


def test_what_a_crashed_attempt_half_wrote_is_removed_before_training_again(tmp_path: Path) -> None:
    candidate = tmp_path / "cnn"
    pending = candidate / "pending"
    pending.mkdir(parents=True)
    (pending / "model.keras").write_bytes(b"cut off mid-save")  # no result.json: the attempt crashed
    (pending / "result.tmp").write_text('{"name": "cnn"')
    assert pipeline._claim_pending(candidate) is None
    assert not pending.exists()


def test_the_promotion_task_retries_transient_failures_only() -> None:
    # #25 item 7: select-and-promote had no retries; a blip failed the whole retraining.
    from mlflow.exceptions import MlflowException
    from prefect.states import Failed

    from flows.retrain import select_and_promote
    from pneumo.errors import PromotionError, TransientStorageError

    def retried(error: BaseException) -> bool:
        return bool(select_and_promote.retries) and select_and_promote.retry_condition_fn(
            select_and_promote, None, Failed(data=error))

    assert retried(TransientStorageError("test images: 503 after every retry"))
    assert retried(ConnectionResetError("tracking server reset the connection"))
    assert not retried(PromotionError("champion version 3 cannot be compared: checksum mismatch"))
    assert not retried(MlflowException("Run 'x' not found", error_code="RESOURCE_DOES_NOT_EXIST"))
    assert not retried(KeyError("a bug"))
