"""Host memory a retraining needs before it starts, against what the worker has: refuse what cannot fit."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from pneumo.config import Settings, TrainConfig
from pneumo.errors import ConfigError

GIB = 1024**3
# TensorFlow, Keras, MLflow, Prefect and the flow's own objects. Set so that the estimate meets the
# peak RSS measured at real counts, 120 px, four candidates for one epoch on the 2-core machine
# (4.7 GB, issue #21): the parts below add up to 2.3 GiB of it.
RUNTIME_BYTES = 2 * GIB
# Bytes per float32 element kept while training: the forward activation (kept for backward) and
# its gradient.
ACTIVATION_BYTES = 2 * 4
# Per weight: the weight, its gradient and up to two optimizer slots (Adam), float32.
WEIGHT_BYTES = 4 * 4
# Models are built at these sides (cheap) and their sizes fitted as a + b·side²: convolutions keep
# their weights and grow their activations with the pixels, the first dense layer after Flatten grows
# its weights with them. Building at 512 px would allocate gigabytes of weights just to count them.
_REFERENCE_SIDES = (64, 128)


@dataclass(frozen=True)
class MemoryEstimate:
    """What one worker process holds at peak while its candidates train in parallel (bytes)."""

    image_size: int
    images: int
    parallel: int  # candidates training at once in this process
    cache: int  # decoded uint8 images, one tf.data cache per candidate and subset
    activations: int  # one training batch per parallel candidate
    weights: int  # weights, gradients, optimizer slots of the parallel candidates
    runtime: int
    limit: int | None  # what the worker has (None: unknown)

    @property
    def total(self) -> int:
        return self.cache + self.activations + self.weights + self.runtime

    @property
    def fits(self) -> bool:
        return self.limit is None or self.total <= self.limit

    def describe(self) -> str:
        """One line with every part, in GiB."""
        have = "unknown" if self.limit is None else f"{self.limit / GIB:.1f} GiB"
        return (f"~{self.total / GIB:.1f} GiB for {self.parallel} candidate(s) in parallel at {self.image_size} px "
                f"(tf.data cache {self.cache / GIB:.1f} GiB: {self.images} images per candidate, "
                f"activations {self.activations / GIB:.1f} GiB per batch, weights and optimizer "
                f"{self.weights / GIB:.1f} GiB, runtime {self.runtime / GIB:.1f} GiB); the worker has {have}")

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-ready, with the total."""
        return {**asdict(self), "total": self.total}


def _model_sizes(name: str, image_size: int) -> tuple[float, float]:
    """(activation elements per image, weights) of a candidate at ``image_size``, fitted from two small builds."""
    import keras

    from pneumo.training.models import build_model

    measured = []
    for side in _REFERENCE_SIDES:
        model = build_model(name, side, vgg16_weights="none", compile=False)
        elements = sum(int(_elements(layer.output.shape)) for layer in model.layers if hasattr(layer, "output"))
        measured.append((side * side, elements, model.count_params()))
        del model
        keras.backend.clear_session(free_memory=True)
    (a2, act_a, par_a), (b2, act_b, par_b) = measured
    pixels = image_size * image_size

    def at(low: float, high: float) -> float:
        return max(low, low + (high - low) * (pixels - a2) / (b2 - a2))

    return at(act_a, act_b), at(par_a, par_b)


def _elements(shape: tuple[int | None, ...]) -> int:
    count = 1
    for dim in shape[1:]:
        count *= int(dim or 1)
    return count


def worker_memory_limit() -> int | None:
    """Bytes this process may use: ``PNEUMO_MEMORY_LIMIT_GB``, else the cgroup limit, else physical memory."""
    if setting := os.environ.get("PNEUMO_MEMORY_LIMIT_GB"):
        try:
            value = float(setting)
        except ValueError:
            value = float("nan")
        if not value > 0:
            raise ConfigError(f"PNEUMO_MEMORY_LIMIT_GB must be a positive number of GiB, got {setting!r}")
        return int(value * GIB)
    limits = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            limits.append(int(text))
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        pass
    return min(limits) if limits else None


def parallel_candidates(candidates: int) -> int:
    """Candidates one worker process trains at once: one per Dask worker, else the thread runner's width."""
    if os.environ.get("PNEUMO_DASK_ADDRESS"):
        return 1
    return max(1, min(candidates, Settings().parallel_candidates))


def estimate_memory(candidates: list[str], config: TrainConfig, images: int, *, limit: int | None = None,
                    parallel: int | None = None) -> MemoryEstimate:
    """Peak host memory of training ``candidates`` on ``images`` images with ``config``.

    The largest candidates are assumed to run together. ``limit`` defaults to :func:`worker_memory_limit`.
    """
    parallel = parallel_candidates(len(candidates)) if parallel is None else parallel
    sizes = sorted((_model_sizes(name, config.image_size) for name in candidates),
                   key=lambda size: size[0] * config.batch_size * ACTIVATION_BYTES + size[1] * WEIGHT_BYTES,
                   reverse=True)[:parallel]
    return MemoryEstimate(
        image_size=config.image_size, images=images, parallel=len(sizes),
        cache=len(sizes) * images * config.image_size ** 2 * 3,
        activations=int(sum(elements for elements, _ in sizes) * config.batch_size * ACTIVATION_BYTES),
        weights=int(sum(weights for _, weights in sizes) * WEIGHT_BYTES), runtime=RUNTIME_BYTES,
        limit=worker_memory_limit() if limit is None else limit,
    )


def check_fits(estimate: MemoryEstimate) -> None:
    """Raise ConfigError, with the numbers and what to change, when the estimate exceeds the worker."""
    if estimate.fits:
        return
    raise ConfigError(
        f"this retraining would need {estimate.describe()}. Lower train.image_size (the cache grows with its "
        "square), train.batch_size, or the candidates trained at once (fewer candidates, "
        "PNEUMO_PARALLEL_CANDIDATES, or Dask workers with one candidate each); PNEUMO_MEMORY_LIMIT_GB sets "
        "the limit where it is not detected")
