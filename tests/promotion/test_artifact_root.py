"""#27 item 6: with the default settings, a new experiment's artifacts go under the PNEUMO home, not ./mlruns."""

from __future__ import annotations

from pathlib import Path

from pneumo.config import Settings
from pneumo.promotion import tracking


def test_the_default_artifact_root_lies_under_the_pneumo_home(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    for name in ("PNEUMO_HOME", "PNEUMO_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    (tmp_path / settings.home).mkdir(parents=True, exist_ok=True)
    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment(tracking._experiment_id(client, "pneumonia"))
    root = Path(experiment.artifact_location.removeprefix("file://"))
    assert root.is_relative_to((tmp_path / settings.home).resolve()), root
    assert tracking.default_artifact_location("http://mlflow:5000") is None  # a server chooses its own
