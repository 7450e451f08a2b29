"""Prefect flow ``watch-dataset``: list the dataset source, compare it with the last retraining's, and
emit ``pneumo.dataset.changed`` when they differ; the ``retrain-on-new-data`` deployment's trigger
starts a retraining on that event.

The listing downloads nothing (keys, sizes and ETags; a local folder is hashed). An unreachable
source or tracking server fails the run with the reason, and nothing is emitted.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from pneumo import pipeline
from pneumo.config import Settings
from pneumo.errors import redact
from pneumo.params import WatchParams

CHANGED_EVENT = "pneumo.dataset.changed"


def dataset_resource(source: str) -> dict[str, str]:
    """The Prefect resource an event about ``source`` is about (``pneumo.dataset.<source>``)."""
    return {"prefect.resource.id": f"pneumo.dataset.{redact(source)}", "prefect.resource.name": redact(source)}


@flow(name="watch-dataset", log_prints=True)
def watch_dataset(params: WatchParams = WatchParams()) -> dict[str, Any]:
    """Compare the source's images with the last finished retraining's; emit an event when they differ."""
    logger = get_run_logger()
    params = params.resolved(Settings())
    check = pipeline.dataset_changes(params, Settings(), log=logger.info)
    if check["status"] == "changed":
        emit_event(event=CHANGED_EVENT, resource=dataset_resource(params.source), payload=check)
        logger.info("emitted %s: %s", CHANGED_EVENT, check["summary"])
    else:
        logger.info("nothing emitted: %s", check["summary"])
    create_markdown_artifact(f"**watch-dataset** `{redact(params.source)}`: {check['summary']}",
                             key="dataset-watch", description="What the dataset watch found")
    return check
