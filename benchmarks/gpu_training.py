"""Training throughput and FLOP utilization per model, float32 vs mixed precision, any Keras backend.

Usage: python benchmarks/gpu_training.py [--images 1024] [--size 120] [--batch-size 32]
                                         [--models dense,cnn,cnn_deep,vgg16] [--repeats 1]

Self-contained: the only project import is ``pneumo.training.models.build_model`` (pure Keras 3), so it runs
under whichever backend ``KERAS_BACKEND`` selects (tensorflow, jax, torch). The training set is
generated in memory: uint8 images converted to float32 in 0..255, label 1 marked by a bright disc
on a noisy background (learnable), labels float32. For each model it builds a fresh network
(random VGG16 weights: speed does not depend on them), runs one untimed warm-up ``fit`` on two
batches (tracing/compilation and first allocations), then times ``fit(x, y, epochs=1)`` over the
whole set (best of ``--repeats``). The image count is rounded down to a whole number of batches so
the timed epoch has no ragged last batch (which would make JAX compile a second step function).
Mixed precision (``mixed_float16``) is measured only where a GPU is present; the GPU is detected
through the backend in use (jax.devices(), torch.cuda, tf.config).

FLOP utilization. Training FLOPs per image are counted from the built model's layers, walking
nested models such as VGG16's base: a Conv2D or Dense layer costs ``2 · (output positions) ·
(kernel size)`` forward, i.e. ``2·H_out·W_out·k_h·k_w·C_in·C_out`` for a convolution and
``2·in·out`` for a dense layer. Training adds, per layer, one more forward-sized product for the
weight gradient if the layer is trainable, and one for the input gradient if any trainable layer
comes before it (autodiff computes nothing else). So frozen layers before the first trainable
layer cost 1× forward, the first trainable layer 2× (no gradient flows into the data), and every
layer after it 3× — the usual "training ≈ 3× forward" with the frozen prefix and the first
layer's input gradient left out. Bias adds, activations, pooling, rescaling, dropout, the loss,
metrics and the optimizer update are not counted (about 2 % for dense's SGD update spread over a
32-image batch, under 1 % for the others).
Achieved GFLOP/s = images/s × training GFLOP per image; it is divided by a dense matmul rate
measured with ``keras.ops.matmul`` (best of 3, synchronised by reading one element back to the
host) right before that model's timed epochs, so both see the same machine load: float32 for the
float32 column, float16 for the mixed one. On a CPU shared with other work, measure when it is
otherwise idle: re-measuring the reference per model follows slow changes in load, but load that
changes during a model's timing skews the ratio (it can even pass 100 %). On recent NVIDIA GPUs
the backends may run float32 matmuls and convolutions as TF32 on tensor cores; the reference is
measured under the same defaults, so the ratio compares like with like.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def generated_set(n: int, size: int, seed: int = 0):
    """``n`` float32 images (0..255, NHWC, RGB) and float32 labels (n, 1); label 1 has a bright disc."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.5).astype(np.float32)
    images = np.clip(rng.normal(90, 25, size=(n, size, size, 1)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    radius = max(2, size // 8)
    for i in np.flatnonzero(labels):
        cy, cx = rng.integers(radius, size - radius, size=2)
        images[i, (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2, 0] = rng.integers(200, 256)
    images = np.repeat(images, 3, axis=-1)  # gray X-ray-like pictures, fed as RGB like the real set
    return images.astype(np.float32), labels[:, None]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"CPU {line.split(':', 1)[1].strip()} ×{os.cpu_count()}"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} ×{os.cpu_count()}"


def detect_device() -> tuple[bool, str, str]:
    """``(gpu present, device name, backend library and version)`` for the active Keras backend."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        devices = jax.devices()  # the default platform: the GPU when jax's CUDA plugin works
        gpu = devices[0].platform == "gpu"
        return gpu, (devices[0].device_kind if gpu else _cpu_name()), f"jax {jax.__version__}"
    if backend == "torch":
        import torch

        gpu = torch.cuda.is_available()
        return gpu, (torch.cuda.get_device_name(0) if gpu else _cpu_name()), f"torch {torch.__version__}"
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else _cpu_name()
        return bool(gpus), name, f"tensorflow {tf.__version__}"
    return False, _cpu_name(), backend


def _sync(tensor) -> None:
    """Wait for ``tensor`` (and the work queued before it) by reading one element back to the host."""
    import keras

    keras.ops.convert_to_numpy(keras.ops.reshape(tensor, (-1,))[:1])


def matmul_gflops(n: int, dtype: str, repeats: int = 5) -> float:
    """Best-of-``repeats`` rate of one ``n×n @ n×n`` ``keras.ops.matmul`` in GFLOP/s (2·n³ FLOPs)."""
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    a = keras.ops.convert_to_tensor(rng.standard_normal((n, n), dtype=np.float32), dtype=dtype)
    b = keras.ops.convert_to_tensor(rng.standard_normal((n, n), dtype=np.float32), dtype=dtype)
    _sync(keras.ops.matmul(a, b))  # warm-up: kernel selection, first allocation
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        _sync(keras.ops.matmul(a, b))
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def _counted_layers(layer, parent_trainable: bool = True):
    """The leaf layers of ``layer`` in graph order, nested models expanded, with effective trainability."""
    trainable = parent_trainable and layer.trainable
    inner = getattr(layer, "layers", None)
    if inner:  # a nested model (VGG16's base): its layers, in topological order
        for sub in inner:
            yield from _counted_layers(sub, trainable)
    else:
        yield layer, trainable


def training_flops_per_image(model) -> tuple[float, float]:
    """``(forward, training)`` FLOPs per image from the model's Conv2D/Dense layers (see module doc)."""
    import keras

    forward = training = 0.0
    gradient_flows = False  # does some trainable layer come before this one?
    for layer, trainable in _counted_layers(model):
        has_weights = bool(layer.weights)
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            positions = math.prod(int(d) for d in layer.output.shape[1:-1])
            flops = 2.0 * positions * math.prod(int(d) for d in layer.kernel.shape)
            forward += flops
            training += flops * (1 + (1 if trainable else 0) + (1 if gradient_flows else 0))
        elif has_weights:
            raise ValueError(f"no FLOP rule for layer {layer.name} ({type(layer).__name__}) with weights")
        gradient_flows = gradient_flows or (trainable and has_weights)
    return forward, training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024, help="training images (generated in memory)")
    parser.add_argument("--size", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models", default="dense,cnn,cnn_deep,vgg16")
    parser.add_argument("--repeats", type=int, default=1, help="timed epochs per model and mode (best of)")
    parser.add_argument("--matmul-size", type=int, help="matmul reference side (default 2048 CPU, 8192 GPU)")
    args = parser.parse_args()

    import keras

    from pneumo.training.models import build_model

    gpu, device, library = detect_device()
    n = max(args.batch_size, args.images - args.images % args.batch_size)
    x, y = generated_set(n, args.size)
    modes = (False, True) if gpu else (False,)
    side = args.matmul_size or (8192 if gpu else 2048)

    print(f"backend {keras.backend.backend()} ({library}), keras {keras.__version__}, device {device}")
    print(f"{n} generated images, {args.size}px, batch {args.batch_size}, best of {args.repeats} timed epoch(s); "
          f"matmul reference {side}×{side}, measured before each timing")
    if not gpu:
        print("no GPU: float32 only (mixed precision is measured on GPUs only)")
    print(f"{'model':<10}{'fp32 img/s':>12}{'mixed img/s':>13}{'mixed÷fp32':>12}{'GFLOP/img':>11}"
          f"{'fp32 GFLOP/s':>14}{'f32 matmul':>12}{'fp32 util':>11}"
          f"{'mixed GFLOP/s':>15}{'f16 matmul':>12}{'mixed util':>12}")
    for name in args.models.split(","):
        rates, references, flops = [], [], None
        for mixed in modes:
            keras.utils.set_random_seed(0)
            model = build_model(name, args.size, vgg16_weights=None, mixed_precision=mixed)
            if flops is None:
                flops = training_flops_per_image(model)[1]
            warm = 2 * args.batch_size
            model.fit(x[:warm], y[:warm], batch_size=args.batch_size, epochs=1, verbose=0)
            references.append(matmul_gflops(side, "float16" if mixed else "float32", repeats=3))
            best = math.inf
            for _ in range(args.repeats):
                started = time.perf_counter()
                model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0)
                _sync(model.trainable_weights[-1].value)  # the last update has really happened
                best = min(best, time.perf_counter() - started)
            rates.append(n / best)
            del model
            keras.backend.clear_session()
            gc.collect()
        gflop = flops / 1e9
        cells = [f"{name:<10}{rates[0]:>12,.0f}"]
        cells.append(f"{rates[1]:>13,.0f}{rates[1] / rates[0]:>12.2f}" if gpu else f"{'-':>13}{'-':>12}")
        cells.append(f"{gflop:>11.3f}{rates[0] * gflop:>14,.1f}{references[0]:>12,.0f}"
                     f"{rates[0] * gflop / references[0]:>11.1%}")
        if gpu:
            cells.append(f"{rates[1] * gflop:>15,.0f}{references[1]:>12,.0f}"
                         f"{rates[1] * gflop / references[1]:>12.1%}")
        else:
            cells.append(f"{'-':>15}{'-':>12}{'-':>12}")
        print("".join(cells), flush=True)

if __name__ == "__main__":
    main()
