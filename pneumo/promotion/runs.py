"""MLflow reads: a retraining's candidate runs ranked by score, the latest retraining, its dataset,
the finished retrainings of a source (what the skip and the dataset watch compare with)."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from pneumo.errors import PromotionError, TrackingError
from pneumo.mlflow_client import mlflow_client, one_line
from pneumo.promotion.gate import selection_rank
from pneumo.promotion.tracking import (
    INGEST_MANIFEST, PARENT_RUN_TAG, SCORE_METRIC, TAG_FINGERPRINT, TAG_KIND, TAG_OUTCOME, TAG_SERVING_MODEL, TAG_SOURCE
)

if TYPE_CHECKING:
    import pandas as pd

TIE_BREAK_METRIC = "validation.roc_auc"


def candidate_runs(parent_run_id: str, *, tracking_uri: str | None = None) -> list[Any]:
    """Finished candidate child runs of a retraining (failed ones excluded)."""
    client = mlflow_client(tracking_uri)
    parent = client.get_run(parent_run_id)
    return list(client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}' and attributes.status = 'FINISHED'",
        max_results=1000,
    ))


def ranked_candidates(parent_run_id: str, run_ids: Collection[str] | None = None, *,
                      tracking_uri: str | None = None) -> list[Any]:
    """A retraining's finished candidates with a served model, best first; only ``run_ids`` if given.

    Raises:
        PromotionError: no candidate of this retraining produced a model.
    """
    runs = [run for run in candidate_runs(parent_run_id, tracking_uri=tracking_uri)
            if TAG_SERVING_MODEL in run.data.tags and math.isfinite(run.data.metrics.get(SCORE_METRIC, math.nan))
            and (run_ids is None or run.info.run_id in run_ids)]
    if not runs:
        raise PromotionError(f"retraining run {parent_run_id} has no finished candidate with a logged model")
    # Best rank first; among equals the earlier-started run.
    return sorted(runs, key=lambda run: (*selection_rank(run.data.metrics[SCORE_METRIC],
                                                         run.data.metrics.get(TIE_BREAK_METRIC)),
                                         -run.info.start_time), reverse=True)


def latest_retraining(experiment: str, *, tracking_uri: str | None = None) -> str:
    """Run id of the most recent retraining (parent) run in ``experiment``.

    Raises:
        PromotionError: the experiment has no retraining run.
    """
    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'retraining'",
                              order_by=["attributes.start_time DESC"], max_results=1) if found else []
    if not runs:
        raise PromotionError(f"no retraining run in experiment {experiment!r}")
    return runs[0].info.run_id


def retraining_dataset(parent_run_id: str, *, tracking_uri: str | None = None) -> tuple[str, str]:
    """(dataset source, fingerprint) a retraining was run on, from its parent run's tags."""
    tags = mlflow_client(tracking_uri).get_run(parent_run_id).data.tags
    if TAG_SOURCE not in tags:
        raise TrackingError(f"run {parent_run_id} is not a pneumo retraining run (no {TAG_SOURCE} tag)")
    return tags[TAG_SOURCE], tags.get(TAG_FINGERPRINT, "")


def finished_retrainings(experiment: str, source: str, *, tracking_uri: str | None = None,
                         trained: bool = False, max_results: int = 50) -> list[Any]:
    """The finished retraining runs on ``source`` in ``experiment``, newest first; ``trained``: only
    those that trained (not skipped). An experiment that does not exist has none."""
    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], max_results=max_results,
                              filter_string=f"tags.`{TAG_KIND}` = 'retraining' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    # The source is compared here, not in the filter: MLflow's filter strings cannot quote every URI.
    return [run for run in runs if run.data.tags.get(TAG_SOURCE) == source
            and not (trained and run.data.tags.get(TAG_OUTCOME) == "skipped")]


def ingest_manifest(run_id: str, *, tracking_uri: str | None = None) -> pd.DataFrame | None:
    """The ingest manifest a retraining logged (path, split, label, bytes, etag), or None (older runs)."""
    import tempfile

    import pandas as pd
    from mlflow.exceptions import MlflowException

    client = mlflow_client(tracking_uri)
    if INGEST_MANIFEST not in {item.path for item in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory(prefix="pneumo-manifest-") as tmp:
        try:
            path = client.download_artifacts(run_id, INGEST_MANIFEST, tmp)
        except MlflowException as error:
            raise TrackingError(f"cannot read {INGEST_MANIFEST} of retraining {run_id}: {one_line(error)}") from None
        return pd.read_csv(path, dtype={"path": str, "split": str, "etag": str})
