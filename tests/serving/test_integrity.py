"""The served model refuses what the artifact store could have changed: bad settings, changed files."""

from __future__ import annotations

import math

import pytest

from pneumo.errors import ModelError
from pneumo.serving.packaging import save_serving_model
from pneumo.serving.pyfunc import model_settings

SIZE = 32
GOOD = {"threshold": 0.4, "image_size": SIZE, "calibration": {"method": "temperature", "temperature": 1.5, "bias": 0.1}}


def test_good_settings_are_read():
    threshold, size, calibrator = model_settings(GOOD)
    assert (threshold, size, calibrator.temperature, calibrator.bias) == (0.4, SIZE, 1.5, 0.1)


@pytest.mark.parametrize("change, message", [
    ({"threshold": math.nan}, "threshold nan is outside [0, 1]"),
    ({"threshold": 1.5}, "threshold 1.5 is outside [0, 1]"),
    ({"threshold": "high"}, "threshold 'high' is not a number"),
    ({"image_size": 0}, "image_size 0 is not an integer"),
    ({"image_size": 32.5}, "image_size 32.5 is not an integer"),
    ({"image_size": 100_000}, "image_size 100000 is not an integer"),
    ({"calibration": {"method": "temperature", "temperature": -1.0}}, "calibration"),
    ({"calibration": {"method": "voodoo"}}, "calibration"),
    ({"threshold": None, "image_size": None}, "not a number"),
])
def test_out_of_range_settings_are_refused(change, message):
    with pytest.raises(ModelError, match="model config") as caught:
        model_settings({**GOOD, **change})
    assert message in str(caught.value)


def test_missing_settings_are_named():
    with pytest.raises(ModelError, match="lacks threshold, image_size"):
        model_settings({})


def test_a_nan_threshold_written_into_mlmodel_refuses_the_load(tmp_path):
    import mlflow.pyfunc

    from pneumo.training.models import build_model

    path = save_serving_model(tmp_path / "model", build_model("dense", SIZE), threshold=0.5, image_size=SIZE,
                              candidate="dense")
    mlmodel = path / "MLmodel"
    text = mlmodel.read_text()
    assert "threshold: 0.5" in text
    mlmodel.write_text(text.replace("threshold: 0.5", "threshold: .nan"))
    with pytest.raises(ModelError, match="threshold nan is outside"):
        mlflow.pyfunc.load_model(str(path))
