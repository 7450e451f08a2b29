"""Training throughput per model at 120×120, float32 vs mixed precision, on a generated dataset.

Usage: python benchmarks/gpu_training.py [--images 1024] [--size 120] [--batch-size 32]

Meant for a GPU machine (one prepared run: each of the four models, one timed epoch each way);
on a CPU-only machine it runs float32 only and says so (mixed precision is a GPU feature here).
The decoded images are cached before timing, and one untimed warm-up epoch absorbs graph
tracing, so the timed epoch measures training, not JPEG decoding or compilation.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")  # our dataset is pre-shuffled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024, help="training images (generated)")
    parser.add_argument("--size", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models", default="dense,cnn,cnn_deep,vgg16")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from pneumo.data import build_manifest, make_dataset
    from pneumo.models import build_model
    from pneumo.synthetic import generate_dataset

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pneumo-gpu-bench-"))
    if not (workdir / "chest_xray").is_dir():
        generate_dataset(workdir, seed=3, scale=min(1.0, args.images / 5216), image_kind="small")
    frame = build_manifest(workdir).frame
    frame = frame[frame["split"] == "train"].head(args.images)
    dataset = make_dataset(workdir, frame["path"].tolist(), frame["label"].tolist(), image_size=args.size,
                           batch_size=args.batch_size, training=True)
    for _ in dataset:  # fill the cache: the timed epochs read decoded images from memory
        pass

    gpus = tf.config.list_physical_devices("GPU")
    device = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else "CPU"
    modes = (False, True) if gpus else (False,)
    print(f"{len(frame)} images, {args.size}px, batch {args.batch_size}, device {device}, TensorFlow {tf.__version__}")
    if not gpus:
        print("no GPU: float32 only (mixed precision is applied on GPUs only)")
    print(f"{'model':<10}{'float32 img/s':>15}{'mixed img/s':>13}{'mixed ÷ fp32':>14}")
    for name in args.models.split(","):
        rates = []
        for mixed in modes:
            keras.utils.set_random_seed(0)
            model = build_model(name, args.size, vgg16_weights=None, mixed_precision=mixed)
            model.fit(dataset.take(2), epochs=1, verbose=0)  # warm-up: tracing and first allocations
            started = time.perf_counter()
            model.fit(dataset, epochs=1, verbose=0)
            rates.append(len(frame) / (time.perf_counter() - started))
            keras.backend.clear_session()
        mixed_rate = f"{rates[1]:>13.0f}{rates[1] / rates[0]:>14.2f}" if len(rates) > 1 else f"{'-':>13}{'-':>14}"
        print(f"{name:<10}{rates[0]:>15.0f}{mixed_rate}", flush=True)


if __name__ == "__main__":
    main()
