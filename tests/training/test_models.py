"""The registry of the seed's four architectures: build, shapes, and layer-by-layer match."""

from __future__ import annotations

import threading

import keras
import numpy as np
import pytest

from pneumo.errors import ModelError
from pneumo.training.models import VGG16_NOTOP_FILE, build_model, list_models


def _layers(model: keras.Model, kind: type) -> list:
    return [layer for layer in model.layers if isinstance(layer, kind)]


def test_registry_lists_the_seed_models_in_order() -> None:
    assert list_models() == ["dense", "cnn", "cnn_deep", "vgg16"]


@pytest.mark.parametrize("name", ["dense", "cnn", "cnn_deep", "vgg16"])
def test_every_model_builds_and_predicts(name: str) -> None:
    model = build_model(name, image_size=40, vgg16_weights=None)
    batch = np.random.default_rng(0).uniform(0, 255, (3, 40, 40, 3)).astype("float32")
    out = np.asarray(model(batch, training=False))
    assert out.shape == (3, 1)
    assert np.all(np.isfinite(out)) and np.all((out >= 0) & (out <= 1))
    assert model.loss == "binary_crossentropy"


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ModelError, match="dense, cnn, cnn_deep, vgg16"):
        build_model("resnet", image_size=32)


def test_too_small_input_is_refused_clearly() -> None:
    with pytest.raises(ModelError, match="cnn_deep needs image_size >= 36, got 32"):
        build_model("cnn_deep", image_size=32)


def test_dense_architecture() -> None:
    model = build_model("dense", image_size=32)
    assert [layer.units for layer in _layers(model, keras.layers.Dense)] == [256, 128, 64, 64, 1]
    assert isinstance(model.optimizer, keras.optimizers.SGD)


def test_cnn_architecture() -> None:
    model = build_model("cnn", image_size=32)
    assert [layer.filters for layer in _layers(model, keras.layers.Conv2D)] == [32, 32]
    assert len(_layers(model, keras.layers.MaxPooling2D)) == 2
    assert [layer.units for layer in _layers(model, keras.layers.Dense)] == [128, 1]
    assert isinstance(model.optimizer, keras.optimizers.Adam)


def test_cnn_deep_architecture() -> None:
    model = build_model("cnn_deep", image_size=40)
    assert [layer.filters for layer in _layers(model, keras.layers.Conv2D)] == [32, 32, 64, 64, 128, 128]
    assert len(_layers(model, keras.layers.MaxPooling2D)) == 3
    assert [layer.units for layer in _layers(model, keras.layers.Dense)] == [1024, 512, 128, 1]
    assert [layer.rate for layer in _layers(model, keras.layers.Dropout)] == [0.3, 0.3, 0.3]


def test_vgg16_freezes_blocks_1_to_3_and_trains_4_and_5() -> None:
    model = build_model("vgg16", image_size=32, vgg16_weights="none")
    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    convs = [layer for layer in base.layers if isinstance(layer, keras.layers.Conv2D)]
    trainable = [layer.name for layer in convs if layer.trainable]
    frozen = [layer.name for layer in convs if not layer.trainable]
    assert trainable == ["block4_conv1", "block4_conv2", "block4_conv3",
                         "block5_conv1", "block5_conv2", "block5_conv3"]
    assert len(frozen) == 7 and all(name.startswith(("block1", "block2", "block3")) for name in frozen)
    assert [layer.units for layer in _layers(model, keras.layers.Dense)] == [512, 128, 1]
    assert isinstance(model.optimizer, keras.optimizers.RMSprop)
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-5)


def test_vgg16_missing_imagenet_file_names_the_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(ModelError, match=VGG16_NOTOP_FILE) as error:
        build_model("vgg16", image_size=32, vgg16_weights="imagenet")
    assert "nothing is downloaded" in str(error.value)
    with pytest.raises(ModelError, match="no-top.h5"):
        build_model("vgg16", image_size=32, vgg16_weights=str(tmp_path / "no-top.h5"))
    # "auto" falls back to random initialisation when the file is absent.
    assert build_model("vgg16", image_size=32, vgg16_weights="auto").count_params() > 0


def test_mixed_precision_keeps_float32_output_and_does_not_leak() -> None:
    results = {}

    def build(kind: str, mixed: bool) -> None:
        results[kind] = build_model("cnn", image_size=32, mixed_precision=mixed)

    threads = [threading.Thread(target=build, args=(f"m{i}", i % 2 == 0)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["m0"].layers[-1].dtype_policy.name == "float32"
    assert results["m0"].layers[2].dtype_policy.name == "mixed_float16"
    assert results["m1"].layers[2].dtype_policy.name == "float32"
    assert keras.config.dtype_policy().name == "float32"


def test_learning_rate_override() -> None:
    model = build_model("cnn", image_size=32, learning_rate=0.0123)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.0123)
