"""Where a model looks: class activation maps (conv models) or input-gradient saliency (dense), and plots."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from pneumo.evaluation.metrics import _figure, _save

KINDS = ("true_positive", "false_positive", "true_negative", "false_negative")
TARGETS = ("predicted", "pneumonia", "normal")
# "hirescam" (Draelos & Carin, 2020) is Grad-CAM without averaging the gradient over space. All
# four pneumo models end in Flatten → Dense, whose weights differ per location; averaging them
# can cancel or flip the sign: on a bright-corner toy task (tests/evaluation/test_explain.py) Grad-CAM put
# none of the map on the corner the model used in 4 of 8 seeds; HiResCAM put ≥ 90% there in all 8.
CAM_METHODS = ("hirescam", "gradcam")
SALIENCY_PERCENTILE = 99.0  # a few extreme pixel gradients would otherwise wash the whole map out
_BATCH = 32
_TOLERANCE = 1e-4


def _chain(model: keras.Model, prefix: str = "") -> list[tuple[str, keras.layers.Layer]]:
    """The model's layers in order, nested models expanded, each with its ``outer/inner`` path."""
    chain = []
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if isinstance(layer, keras.Model):
            chain.extend(_chain(layer, prefix=f"{path}/"))
        elif not isinstance(layer, keras.layers.InputLayer):
            chain.append((path, layer))
    return chain


def last_conv_layer(model: keras.Model) -> str | None:
    """Path of the last 2-D convolution, e.g. ``"conv2d_3"`` or ``"vgg16/block5_conv3"``; None for dense."""
    convolutions = [path for path, layer in _chain(model) if isinstance(layer, keras.layers.Conv2D)]
    return convolutions[-1] if convolutions else None


def _replay(chain: list[tuple[str, keras.layers.Layer]], x: keras.KerasTensor) -> keras.KerasTensor:
    for _, layer in chain:
        x = layer(x)
    return x


def _split(model: keras.Model, layer_path: str | None) -> tuple[keras.Model | None, keras.Model]:
    """``image → activations`` and ``activations → PNEUMONIA logit`` models sharing ``model``'s weights.

    The layers are called again on fresh inputs: a nested layer's own ``.output`` lives in the
    nested base's graph, but a replayed chain reaches inside it. The head skips its sigmoid, whose
    gradient is zero when saturated. With ``layer_path=None`` the logit model takes the image.
    """
    chain = _chain(model)
    paths = [path for path, _ in chain]
    if layer_path is not None and layer_path not in paths[:-1]:
        raise ValueError(f"{model.name} has no layer {layer_path!r} before its output layer")
    head = chain[-1][1]
    if not isinstance(head, keras.layers.Dense) or head.activation is not keras.activations.sigmoid:
        raise ValueError(f"{model.name} does not end in a sigmoid Dense layer")
    cut = paths.index(layer_path) + 1 if layer_path is not None else 0
    image = keras.Input(shape=model.input_shape[1:], name="image")
    features = None
    try:
        x = _replay(chain[:cut], image)
        if cut:
            features = keras.Model(image, x, name=f"{model.name}_features")
            x = keras.Input(shape=x.shape[1:], name="activations")
        start = x
        x = _replay(chain[cut:-1], x)
    except Exception as error:  # Keras raises various types, e.g. for a merge layer handed one tensor
        raise ValueError(f"{model.name} is not a plain chain of layers; cannot replay it: {error}") from error
    logit = keras.ops.matmul(keras.ops.cast(x, head.kernel.dtype), head.kernel) + head.bias
    return features, keras.Model(start, logit, name=f"{model.name}_logit")


def gradcam_model(model: keras.Model, layer_path: str | None = None) -> keras.Model:
    """A functional model ``image → [activations of layer_path, PNEUMONIA logit]`` sharing ``model``'s weights.

    ``layer_path`` defaults to :func:`last_conv_layer` and may be nested (``vgg16/block5_conv3``).
    Raises ValueError for no such layer, no sigmoid head, or a model that is not a plain chain.
    """
    layer_path = layer_path or last_conv_layer(model)
    if layer_path is None:
        raise ValueError(f"{model.name} has no convolution; name a layer")
    features, logit = _split(model, layer_path)
    image = keras.Input(shape=model.input_shape[1:], name="image")
    activations = features(image)
    explainer = keras.Model(image, [activations, logit(activations)], name=f"{model.name}_gradcam")
    _check_replay(model, lambda batch: explainer(batch, training=False)[1])
    return explainer


def _check_replay(model: keras.Model, logit_of: Callable[[np.ndarray], tf.Tensor]) -> None:
    """A branching model can replay wrongly without any error; compare its logit with the original's.

    Logits, because two different networks can both saturate to a probability of 1; probabilities
    only when the head sits inside a nested model, where its input is not in the outer graph.
    """
    probe = np.random.default_rng(0).uniform(0, 255, (1, *model.input_shape[1:])).astype("float32")
    replayed = np.asarray(logit_of(probe), dtype=np.float64).ravel()
    head = _chain(model)[-1][1]
    try:
        before_head = keras.Model(model.inputs[0], head.input)
    except ValueError:  # the head sits inside a nested model
        expected = np.asarray(model(probe, training=False), dtype=np.float64).ravel()
        replayed = 1 / (1 + np.exp(-replayed))
    else:
        features = np.asarray(before_head(probe, training=False), dtype=np.float64)
        expected = (features @ np.asarray(head.kernel, np.float64) + np.asarray(head.bias, np.float64)).ravel()
    if not np.allclose(replayed, expected, rtol=_TOLERANCE, atol=_TOLERANCE):
        raise ValueError(f"{model.name} is not a plain chain of layers; replaying it gives another output")


def _direction(logit: tf.Tensor, target: str) -> tf.Tensor:
    """+1 to explain PNEUMONIA, −1 to explain NORMAL, per image."""
    if target == "predicted":  # the class the model chose at 0.5
        return tf.where(logit >= 0, 1.0, -1.0)
    return tf.ones_like(logit) if target == "pneumonia" else -tf.ones_like(logit)


def _normalise(maps: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Divide each map by its scale and clip to [0, 1]; a map with no signal stays all zero."""
    scale = scale.reshape(-1, *([1] * (maps.ndim - 1)))
    safe = np.where(scale > 1e-12, scale, 1.0)
    return np.clip(np.where(scale > 1e-12, maps / safe, 0.0), 0.0, 1.0).astype(np.float32)


def _gradient(logit_model: keras.Model, inputs: tf.Tensor, target: str) -> tf.Tensor:
    # Watching only the inputs, not every weight, keeps the tape to the layers after them;
    # watching the weights made VGG16's heatmaps about 2.5× slower.
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(inputs)
        logit = logit_model(inputs, training=False)
        score = tf.reduce_sum(logit * tf.stop_gradient(_direction(logit, target)))
    return tape.gradient(score, inputs)


def _cam_batch(
    features: keras.Model, logit_model: keras.Model, method: str, images: tf.Tensor, target: str
) -> np.ndarray:
    activations = tf.cast(features(images, training=False), tf.float32)
    grads = tf.cast(_gradient(logit_model, activations, target), tf.float32)
    if method == "gradcam":
        grads = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # one weight per channel
    cam = tf.nn.relu(tf.reduce_sum(grads * activations, axis=-1))  # evidence *for* the target only
    cam = tf.image.resize(cam[..., None], images.shape[1:3], method="bilinear")[..., 0].numpy()
    return _normalise(cam, cam.reshape(len(cam), -1).max(axis=1))


def _saliency_batch(logit_model: keras.Model, images: tf.Tensor, target: str) -> np.ndarray:
    grads = tf.reduce_max(tf.abs(_gradient(logit_model, images, target)), axis=-1).numpy()
    return _normalise(grads, np.percentile(grads.reshape(len(grads), -1), SALIENCY_PERCENTILE, axis=1))


def heatmaps(
    model: keras.Model, images: np.ndarray, target: str = "predicted", method: str = "hirescam"
) -> np.ndarray:
    """One ``(H, W)`` float32 heatmap in [0, 1] per ``(N, H, W, 3)`` image (0..255); all zeros without evidence.

    Convolutional models get a class activation map of their last convolution (``method``, see
    :data:`CAM_METHODS`); the dense model, with no spatial feature map, gets input-gradient saliency
    (|∂logit/∂pixel|, max over RGB, over its 99th percentile). Gradients are of the logit, so confident
    images still get a map. ``target="predicted"`` explains the class given at 0.5 (NORMAL evidence
    on negatives); ``"pneumonia"``/``"normal"`` always that class.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if method not in CAM_METHODS:
        raise ValueError(f"method must be one of {', '.join(CAM_METHODS)}, got {method!r}")
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1:] != tuple(model.input_shape[1:]):
        raise ValueError(f"expected images of shape (N, {', '.join(map(str, model.input_shape[1:]))}), "
                         f"got {images.shape}")
    features, logit_model = _split(model, last_conv_layer(model))
    if features is None:
        _check_replay(model, lambda batch: logit_model(batch, training=False))
        explain = functools.partial(_saliency_batch, logit_model)
    else:
        _check_replay(model, lambda batch: logit_model(features(batch, training=False), training=False))
        explain = functools.partial(_cam_batch, features, logit_model, method)
    maps = [explain(tf.constant(images[start:start + _BATCH]), target) for start in range(0, len(images), _BATCH)]
    return np.concatenate(maps) if maps else np.zeros(images.shape[:3], np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The ``(H, W, 3)`` or gray ``(H, W)`` image (0..255) blended with the jet-coloured heatmap, as uint8."""
    from matplotlib import colormaps  # colormaps need no display backend

    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    rgb = np.broadcast_to(image, (*image.shape[:2], 3))
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.shape != rgb.shape[:2]:
        raise ValueError(f"heatmap shape {heatmap.shape} does not match image shape {rgb.shape[:2]}")
    colour = colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3] * 255
    return np.clip((1 - alpha) * rgb + alpha * colour, 0, 255).round().astype(np.uint8)


def overlay_png(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> bytes:
    """:func:`overlay` encoded as PNG bytes, at the image's own size."""
    buffer = io.BytesIO()
    Image.fromarray(overlay(image, heatmap, alpha), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def pick_examples(
    y_true: Sequence[int], y_prob: Sequence[float], threshold: float, per_kind: int = 3
) -> dict[str, list[int]]:
    """``{kind: indices}`` of the most confident examples of each of :data:`KINDS`, ``per_kind`` (or fewer) each.

    Predicted PNEUMONIA is ``prob >= threshold``, as in :func:`pneumo.evaluation.metrics.compute_metrics`.
    Positives are ranked by highest probability, negatives by lowest, so the false ones are the
    model's most confident mistakes; ties keep index order, so the pick is deterministic.
    """
    labels = np.asarray(y_true, dtype=int).ravel()
    probs = np.asarray(y_prob, dtype=np.float64).ravel()
    if labels.shape != probs.shape:
        raise ValueError(f"{labels.size} labels but {probs.size} probabilities")
    predicted = probs >= threshold
    picks = {}
    for kind in KINDS:
        said_positive = kind.endswith("_positive")
        truly_positive = kind in ("true_positive", "false_negative")
        indices = np.flatnonzero((predicted == said_positive) & (labels == int(truly_positive)))
        confidence = probs[indices] if said_positive else -probs[indices]
        order = np.argsort(-confidence, kind="stable")
        picks[kind] = [int(i) for i in indices[order][:per_kind]]
    return picks


def contact_sheet(
    images: np.ndarray,
    heatmaps: np.ndarray,
    captions: Sequence[str],
    path: Path,
    title: str = "Heatmaps",
    columns: int = 3,
) -> Path:
    """One PNG grid of heatmap overlays, row by row, each under its caption (e.g. ``"false_negative p=0.08"``).

    Three columns with :func:`pick_examples`' default give one row per kind. Parent folders are created.
    """
    if not len(images) == len(heatmaps) == len(captions) or not len(images):
        raise ValueError(f"need as many (≥ 1) images, heatmaps and captions; got "
                         f"{len(images)}, {len(heatmaps)}, {len(captions)}")
    plt = _figure()
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, heatmap, caption in zip(axes.ravel(), images, heatmaps, captions):
        ax.imshow(overlay(image, heatmap))
        ax.set_title(caption, fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)


def explain_examples(model: keras.Model, dataset: tf.data.Dataset, labels: np.ndarray, probs: np.ndarray,
                     threshold: float, out_dir: Path, name: str) -> dict[str, Path]:
    """Heatmaps over a fixed sample of an unshuffled dataset's images (a few true/false positives/negatives each).

    Returns ``{"gradcam": contact sheet, "gradcam/<kind>_<i>": overlay PNG, …}``.
    """
    order = [(kind, index) for kind, indices in pick_examples(labels, probs, threshold).items() for index in indices]
    if not order:
        return {}
    wanted = {index for _, index in order}
    found = {i: np.asarray(image) for i, (image, _) in enumerate(dataset.unbatch()) if i in wanted}
    images = np.stack([found[index] for _, index in order])
    maps = heatmaps(model, images)
    method = "saliency" if last_conv_layer(model) is None else "HiResCAM"
    files = {"gradcam": contact_sheet(
        images, maps, [f"{kind.replace('_', ' ')} p={probs[index]:.2f}" for kind, index in order],
        out_dir / "gradcam.png", f"{name}: {method} on test images (threshold {threshold:.3f})")}
    for (kind, index), image, heatmap in zip(order, images, maps):
        path = out_dir / "gradcam" / f"{kind}_{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(overlay_png(image, heatmap))
        files[f"gradcam/{path.stem}"] = path
    return files
