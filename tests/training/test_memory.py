"""The memory estimate a retraining is checked against before it trains."""

from __future__ import annotations

from pathlib import Path

import pytest

from pneumo.config import TrainConfig
from pneumo.errors import ConfigError
from pneumo.params import RetrainParams
from pneumo.training.memory import GIB, check_fits, estimate_memory, worker_memory_limit

ALL = ["dense", "cnn", "cnn_deep", "vgg16"]


@pytest.fixture
def each_build_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build each (model, side, options) once in the test, and clear Keras's session without a garbage
    collection each time: the estimate's reference builds are deterministic, so the five estimates below
    measure the same eight models (28 builds and 28 collections took ~11 s on two cores; the numbers match)."""
    import keras

    from pneumo.training import models

    build, clear, built = models.build_model, keras.backend.clear_session, {}

    def build_model(name: str, image_size: int = 120, **options: object) -> object:
        key = (name, image_size, tuple(sorted(options.items())))
        if key not in built:
            built[key] = build(name, image_size, **options)
        return built[key]

    monkeypatch.setattr(models, "build_model", build_model)
    monkeypatch.setattr(keras.backend, "clear_session", lambda free_memory=True: clear(free_memory=False))


@pytest.mark.usefixtures("each_build_once")
def test_512_px_with_four_candidates_is_refused_with_the_numbers_and_120_px_fits() -> None:
    big = estimate_memory(ALL, TrainConfig(image_size=512), 5856, limit=16 * GIB, parallel=4)
    assert big.cache == 4 * 5856 * 512 * 512 * 3  # ~17.2 GiB of uint8 cache alone
    assert not big.fits
    with pytest.raises(ConfigError, match=r"~\d+\.\d GiB .* at 512 px \(tf\.data cache 17\.2 GiB.*"
                                          r"the worker has 16\.0 GiB\. Lower train\.image_size"):
        check_fits(big)
    small = estimate_memory(ALL, TrainConfig(image_size=120), 5856, limit=16 * GIB, parallel=4)
    check_fits(small)
    assert small.fits and small.total < big.total / 5
    # Parts grow as they should: the cache with the pixels, activations with the batch, parallel with the runner.
    assert estimate_memory(["cnn"], TrainConfig(image_size=120, batch_size=64), 100, limit=GIB, parallel=1) \
        .activations == pytest.approx(2 * estimate_memory(["cnn"], TrainConfig(image_size=120), 100,
                                                          limit=GIB, parallel=1).activations, rel=1e-6)
    one = estimate_memory(ALL, TrainConfig(image_size=120), 5856, limit=16 * GIB, parallel=1)
    assert one.parallel == 1 and one.cache == small.cache / 4


def test_the_weights_fit_meets_a_model_built_at_that_size() -> None:
    """Weights are fitted from two small builds; at a third size they match the real count."""
    from pneumo.training.memory import WEIGHT_BYTES
    from pneumo.training.models import build_model

    estimate = estimate_memory(["cnn"], TrainConfig(image_size=96), 10, limit=GIB, parallel=1)
    built = build_model("cnn", 96, compile=False).count_params()
    assert estimate.weights == pytest.approx(built * WEIGHT_BYTES, rel=0.05)


def test_the_limit_comes_from_the_setting_or_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNEUMO_MEMORY_LIMIT_GB", "1.5")
    assert worker_memory_limit() == int(1.5 * GIB)
    for bad in ("lots", "0", "-2", "nan"):
        monkeypatch.setenv("PNEUMO_MEMORY_LIMIT_GB", bad)
        with pytest.raises(ConfigError, match="PNEUMO_MEMORY_LIMIT_GB must be a positive number"):
            worker_memory_limit()
    monkeypatch.delenv("PNEUMO_MEMORY_LIMIT_GB")
    physical = Path("/proc/meminfo").read_text().split()[1]  # MemTotal in kB
    assert 0 < worker_memory_limit() <= int(physical) * 1024


@pytest.mark.slow
def test_the_flow_refuses_a_retraining_that_cannot_fit_before_training(prefect_api, mlflow_server, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         unique_name) -> None:
    from mlflow import MlflowClient

    from flows.retrain import retrain
    from pneumo.data.synthetic import generate_dataset

    generate_dataset(tmp_path / "data", seed=3, scale=0.015, image_kind="small")
    monkeypatch.setenv("PNEUMO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PNEUMO_MEMORY_LIMIT_GB", "0.5")  # less than the runtime alone
    experiment = unique_name("memory-exp")
    params = RetrainParams(source=str(tmp_path / "data"), candidates=["cnn"], experiment=experiment,
                           tracking_uri=mlflow_server.uri, train={"epochs": 1, "image_size": 40},
                           min_images_per_class=1)
    with pytest.raises(ConfigError, match=r"the worker has 0\.5 GiB\. Lower train\.image_size"):
        retrain(params=params)
    assert MlflowClient(mlflow_server.uri).get_experiment_by_name(experiment) is None  # no run was opened
