"""Train one candidate from a config: device selection, class weights, early stopping, NaN guard."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from pneumo.config import TrainConfig
from pneumo.errors import TrainingDiverged
from pneumo.training.models import build_model

Log = Callable[[str], None]


@dataclass
class TrainResult:
    """A trained model, its per-epoch history, how fast it trained, and run params (epochs run, device)."""

    name: str
    model: keras.Model
    history: dict[str, list[float]]
    images_per_second: float
    params: dict[str, object] = field(default_factory=dict)


def configure_thread_pools(concurrent_tasks: int, intra_op: int | None = None) -> bool:
    """Size TensorFlow's CPU thread pools for ``concurrent_tasks`` trainings sharing this process.

    The intra-op pool (arithmetic) stays at every core unless ``intra_op`` caps it (several worker
    processes on one machine): shared by the process's threads, it keeps the cores busy between
    concurrent candidates. The inter-op pool (threads that schedule ops and wait on them) gets a few
    per task: one as small as the core count can starve when several threads run parallel loops.
    TensorFlow fixes its pools when its runtime starts: after the first op this changes nothing and returns False.
    """
    try:
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(max(1, intra_op))
        tf.config.threading.set_inter_op_parallelism_threads(max(4, 4 * concurrent_tasks))
        return True
    except RuntimeError:
        return False


class _EpochLog(keras.callbacks.Callback):
    """One progress line per epoch (Keras's own bar is unreadable in flow logs)."""

    def __init__(self, name: str, epochs: int, log: Log) -> None:
        super().__init__()
        self._name, self._epochs, self._log = name, epochs, log
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        shown = " ".join(f"{key}={value:.4f}" for key, value in sorted((logs or {}).items())
                         if key in ("loss", "val_loss", "auc", "val_auc", "val_recall"))
        self._log(f"[{self._name}] epoch {epoch + 1}/{self._epochs} {shown} "
                  f"({time.perf_counter() - self._started:.1f}s)")


def train_candidate(
    name: str, train_ds: tf.data.Dataset, val_ds: tf.data.Dataset, config: TrainConfig, *, train_images: int,
    class_weight: dict[int, float] | None = None, log: Log = print,
) -> TrainResult:
    """Build and fit one registered model (``train_images`` counts the images, for images/s).

    On a GPU with ``config.mixed_precision`` the model computes in float16 (output in float32).
    ``keras.utils.set_random_seed`` is process-wide, so runs are reproducible when candidates
    train one per process (as on Dask/Prefect workers). Raises TrainingDiverged when the loss or
    the weights become NaN/inf, ModelError for an unknown model or missing VGG16 weights.
    """
    gpus = len(tf.config.list_physical_devices("GPU"))
    mixed = bool(config.mixed_precision and gpus)
    keras.utils.set_random_seed(config.seed)
    model = build_model(name, config.image_size, learning_rate=config.learning_rate,
                        vgg16_weights=config.vgg16_weights, mixed_precision=mixed)
    callbacks: list[keras.callbacks.Callback] = [keras.callbacks.TerminateOnNaN(), _EpochLog(name, config.epochs, log)]
    if config.early_stopping:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=config.patience, restore_best_weights=True))
    device = "GPU" if gpus else "CPU"
    log(f"[{name}] training {config.epochs} epochs at {config.image_size}px on {device}"
        f"{' with mixed precision' if mixed else ''}")
    started = time.perf_counter()
    with warnings.catch_warnings():
        # Our datasets are finite and pre-shuffled; Keras warns about both on every epoch.
        warnings.filterwarnings("ignore", message=".*ran out of data.*")
        warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
        fit = model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, callbacks=callbacks,
                        class_weight=class_weight if config.class_weights else None, verbose=0)
    seconds = time.perf_counter() - started
    history = {key: [float(v) for v in values] for key, values in fit.history.items()}
    losses = history.get("loss", [])
    if not losses or not all(math.isfinite(v) for v in losses):
        raise TrainingDiverged(f"{name}: training loss became NaN/inf at epoch {len(losses)}; "
                               "lower the learning rate or check the inputs")
    # The loss can stay finite while weights go NaN (ReLU maps NaN to 0, the loss clips its input).
    if not all(np.all(np.isfinite(weight.numpy())) for weight in model.trainable_weights):
        raise TrainingDiverged(f"{name}: weights became NaN/inf during training; "
                               "lower the learning rate or check the inputs")
    epochs_run = len(losses)
    return TrainResult(name=name, model=model, history=history,
                       images_per_second=train_images * epochs_run / seconds if seconds else 0.0,
                       params={"epochs_run": epochs_run, "device": device, "mixed_precision": mixed})
