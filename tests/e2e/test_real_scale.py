"""The retraining at the real dataset's counts (5,856 images, Kaggle's split sizes) with small pixels:
ingest from the S3-protocol server, validation, two candidates, promotion, and a second retraining
gated against the first one's champion on the full 624-image test split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pneumo.data.synthetic import REAL_COUNTS, generate_dataset
from pneumo.params import RetrainParams


@pytest.fixture(scope="module")
def real_counts_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("real-counts")
    report = generate_dataset(root, seed=21, scale=1.0, image_kind="small")
    assert report.images == 5856 and report.counts == REAL_COUNTS
    return root


@pytest.mark.slow
def test_a_real_size_retraining_promotes_and_the_next_one_is_gated_against_it(
        prefect_api, mlflow_server, s3_server, s3_env, real_counts_source: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, unique_name) -> None:
    from mlflow import MlflowClient

    from flows.retrain import retrain
    from pneumo.data.storage import upload_tree
    from pneumo.serving.pyfunc import DEFAULT_MAX_BATCH_IMAGES

    bucket = s3_server.make_bucket("real")
    upload_tree(real_counts_source / "chest_xray", f"s3://{bucket}/chest_xray", endpoint_url=s3_server.endpoint_url)
    monkeypatch.setenv("PNEUMO_S3_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("PNEUMO_HOME", str(tmp_path / "home"))
    model_name, experiment = unique_name("real-model"), unique_name("real-exp")

    def run(seed: int, candidates: list[str]) -> dict:
        return retrain(params=RetrainParams(
            source=f"s3://{bucket}/chest_xray", candidates=candidates, registered_model=model_name,
            experiment=experiment, tracking_uri=mlflow_server.uri, gate={"min_recall": 0.0},
            train={"epochs": 1, "image_size": 32, "batch_size": 64, "seed": seed}))

    first = run(seed=1, candidates=["dense", "cnn"])  # two candidates: the estimate counts both in parallel
    assert first["decision"]["n_test_images"] == 624 > DEFAULT_MAX_BATCH_IMAGES  # the split #21 could not score
    assert first["decision"]["version"] == "1"
    assert first["decision"]["outcome"] in ("promoted", "challenger")  # a one-epoch model may miss the floors
    client = MlflowClient(mlflow_server.uri)
    parent = client.get_run(first["parent_run_id"])
    report = json.loads(Path(client.download_artifacts(parent.info.run_id, "data_report.json", str(tmp_path)))
                        .read_text())
    assert report["images"] == 5856 and report["ingest"]["downloaded"] == 5856
    assert {split: sum(counts.values()) for split, counts in report["splits"].items()} == \
        {"train": 5216, "val": 16, "test": 624}
    assert report["memory_estimate"]["images"] == 5856 and report["memory_estimate"]["parallel"] == 2

    # One candidate is enough for the gate: it scores the champion of the first on the same 624 images.
    second = run(seed=2, candidates=["dense"])
    assert second["decision"]["version"] == "2" and second["decision"]["n_test_images"] == 624
    if first["decision"]["outcome"] == "promoted":  # the second is compared with that champion, image by image
        assert second["decision"]["champion_version"] == "1" and second["decision"]["score_diff"] is not None
    versions = sorted(v.version for v in client.search_model_versions(f"name = '{model_name}'"))
    assert versions == ["1", "2"]
