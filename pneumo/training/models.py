"""The seed article's four architectures, in a registry of builders looked up by name."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pneumo.errors import ModelError

if TYPE_CHECKING:  # Keras imports TensorFlow (seconds): the registry itself is read without it.
    import keras

VGG16_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
VGG16_FIRST_TRAINABLE = "block4_conv1"  # the seed fine-tunes blocks 4-5 and freezes 1-3


@dataclass(frozen=True)
class ModelSpec:
    """How to build one candidate: the architecture and the seed's optimizer for it."""

    builder: Callable[..., keras.Model]  # (image_size, weights=…) -> uncompiled keras.Model
    optimizer: str  # a keras.optimizers class
    learning_rate: float
    min_image_size: int = 16


# Keras reads the global dtype policy when a layer is created; builds hold this lock so a
# mixed-precision build in one thread cannot leak its policy into another thread's build.
_POLICY_LOCK = threading.Lock()


def list_models() -> list[str]:
    """Names of the registered architectures, in the seed article's order."""
    return list(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; ModelError listing the valid names if there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(_REGISTRY)}") from None


def _inputs(image_size: int) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """Float 0..255 RGB input and its 1/255 rescaling, so callers feed raw decoded pixels."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    return inputs, layers.Rescaling(1.0 / 255, name="rescale")(inputs)


def _output(x: keras.KerasTensor) -> keras.KerasTensor:
    from keras import layers

    # float32 output even under mixed precision: a float16 sigmoid saturates and its loss overflows.
    return layers.Dense(1, activation="sigmoid", dtype="float32", name="pneumonia_probability")(x)


def dense(image_size: int, **_: object) -> keras.Model:
    """The seed's fully connected baseline: Flatten → Dense 256-128-64-64."""
    import keras
    from keras import layers

    inputs, x = _inputs(image_size)
    x = layers.Flatten()(x)
    for units in (256, 128, 64, 64):
        x = layers.Dense(units, activation="relu")(x)
    return keras.Model(inputs, _output(x), name="dense")


def cnn(image_size: int, **_: object) -> keras.Model:
    """The seed's small CNN: Conv32-Pool ×2 → Dense128."""
    import keras
    from keras import layers

    inputs, x = _inputs(image_size)
    for _block in range(2):
        x = layers.Conv2D(32, 3, activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    return keras.Model(inputs, _output(x), name="cnn")


def cnn_deep(image_size: int, **_: object) -> keras.Model:
    """The seed's deeper CNN with dropout (its best model): (Conv×2-Pool) 32/64/128 → Dense 1024-512-128."""
    import keras
    from keras import layers

    inputs, x = _inputs(image_size)
    for filters in (32, 64, 128):
        x = layers.Conv2D(filters, 3, activation="relu")(x)
        x = layers.Conv2D(filters, 3, activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    for units in (1024, 512, 128):
        x = layers.Dense(units, activation="relu")(x)
        x = layers.Dropout(0.3)(x)
    return keras.Model(inputs, _output(x), name="cnn_deep")


def resolve_vgg16_weights(weights: str | Path | None) -> str | None:
    """Turn the ``vgg16_weights`` setting into a local file path (or None for random init).

    Nothing is downloaded: ``"imagenet"`` means Keras's cache file, which must already exist
    (ModelError naming the file expected otherwise); ``"auto"`` uses it when present, else random init.
    """
    if weights is None or str(weights).lower() == "none":
        return None
    spec = str(weights).lower()
    if spec in ("imagenet", "auto"):
        cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
        path = cache / VGG16_NOTOP_FILE
        if spec == "auto" and not path.is_file():
            return None  # the demo's choice: ImageNet when the file is at hand, else random init
        hint = f"place {VGG16_NOTOP_FILE} in {cache} or set vgg16_weights to its path"
    else:
        path = Path(weights).expanduser()
        hint = f"expected the Keras no-top VGG16 weights file ({VGG16_NOTOP_FILE})"
    if not path.is_file():
        raise ModelError(f"VGG16 ImageNet weights not found at {path}: {hint} (nothing is downloaded)")
    return str(path)


def vgg16(image_size: int, weights: str | Path | None = "imagenet", **_: object) -> keras.Model:
    """The seed's VGG16 transfer model: ImageNet base without top, layers before block4 frozen → Dense 512-128."""
    import keras
    from keras import layers

    inputs, x = _inputs(image_size)
    weights_file = resolve_vgg16_weights(weights)
    base = keras.applications.VGG16(include_top=False, weights=weights_file, input_shape=(image_size, image_size, 3))
    if weights_file is None:
        # Keras' default (Glorot) init halves the activations at each ReLU, so after 13 convolutions
        # every prediction sits within 1e-5 of 0.5 and the model cannot learn; He init keeps their scale.
        initializer = keras.initializers.HeUniform(seed=0)
        for layer in base.layers:
            if isinstance(layer, keras.layers.Conv2D):
                layer.kernel.assign(initializer(layer.kernel.shape))
    trainable = False
    for layer in base.layers:
        trainable = trainable or layer.name == VGG16_FIRST_TRAINABLE
        layer.trainable = trainable
    x = base(x)
    x = layers.Flatten()(x)
    for units in (512, 128):
        x = layers.Dense(units, activation="relu")(x)
        x = layers.Dropout(0.3)(x)
    return keras.Model(inputs, _output(x), name="vgg16")


_REGISTRY: dict[str, ModelSpec] = {  # in the seed article's order
    "dense": ModelSpec(dense, "SGD", 0.01),
    "cnn": ModelSpec(cnn, "Adam", 0.001),
    "cnn_deep": ModelSpec(cnn_deep, "Adam", 0.001, min_image_size=36),  # three (conv, conv, pool) stages
    "vgg16": ModelSpec(vgg16, "RMSprop", 1e-5, min_image_size=32),  # Keras's VGG16 refuses smaller inputs
}


def build_model(
    name: str, image_size: int = 120, *, learning_rate: float | None = None,
    vgg16_weights: str | Path | None = "imagenet", mixed_precision: bool = False, compile: bool = True,
) -> keras.Model:
    """Build one of the registered architectures; ``compile`` attaches the seed's optimizer, loss and metrics.

    ``mixed_precision`` builds with the ``mixed_float16`` policy (GPUs only); ``learning_rate``
    overrides the seed's. Raises ModelError for an unknown name or a missing VGG16 weights file.
    """
    import keras

    spec = model_spec(name)
    if image_size < spec.min_image_size:
        raise ModelError(f"{name} needs image_size >= {spec.min_image_size}, got {image_size}")
    with _POLICY_LOCK:
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy("mixed_float16" if mixed_precision else "float32")
        try:
            model = spec.builder(image_size, weights=vgg16_weights)
        finally:
            keras.config.set_dtype_policy(previous)
    if compile:
        rate = learning_rate if learning_rate is not None else spec.learning_rate
        model.compile(
            optimizer=getattr(keras.optimizers, spec.optimizer)(learning_rate=rate),
            loss="binary_crossentropy",
            metrics=[
                keras.metrics.BinaryAccuracy(name="accuracy"),
                keras.metrics.AUC(name="auc"),
                keras.metrics.Recall(name="recall"),
                keras.metrics.Precision(name="precision"),
            ],
        )
    return model


def model_params(model: keras.Model) -> dict[str, str]:
    """Parameters read off a compiled Keras model: optimizer, learning rate, frozen layers, sizes."""
    params: dict[str, str] = {}
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        params["optimizer"] = type(optimizer).__name__
        try:
            params["learning_rate"] = f"{float(optimizer.learning_rate):.6g}"
        except (TypeError, ValueError):
            pass
    frozen = [layer.name for layer in _leaf_layers(model) if not layer.trainable and layer.weights]
    params["frozen_layers"] = str(len(frozen))
    if frozen:
        params["frozen_layer_names"] = ",".join(frozen)[:6000]  # MLflow's limit on a param value
    params["trainable_params"] = str(sum(int(w.numpy().size) for w in model.trainable_weights))
    params["non_trainable_params"] = str(sum(int(w.numpy().size) for w in model.non_trainable_weights))
    params["input_shape"] = str(tuple(model.input_shape[1:]))
    return params


def _leaf_layers(model: keras.Layer) -> list[keras.Layer]:
    """Layers including those of nested models (VGG16's base), leaves only."""
    leaves = []
    for layer in getattr(model, "layers", []):
        leaves.extend(_leaf_layers(layer) if getattr(layer, "layers", None) else [layer])
    return leaves
