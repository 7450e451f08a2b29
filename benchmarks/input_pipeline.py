"""Input pipeline throughput: ours vs keras.utils.image_dataset_from_directory, same JPEGs, one run.

Usage: python benchmarks/input_pipeline.py [--images 400] [--size 120] [--epochs 3]
Prints images/s for the first epoch and the mean of later epochs, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _epoch_rate(dataset, images: int) -> float:
    started = time.perf_counter()
    seen = 0
    for batch, _ in dataset:
        seen += int(batch.shape[0])
    assert seen == images, f"pipeline yielded {seen} of {images} images"
    return images / (time.perf_counter() - started)


def _rates(make, images: int, epochs: int) -> tuple[float, float]:
    dataset = make()
    first = _epoch_rate(dataset, images)
    later = [_epoch_rate(dataset, images) for _ in range(epochs - 1)]
    return first, sum(later) / len(later)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="reuse a generated dataset here")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from pneumo.data.images import make_dataset, validate_images
    from pneumo.data.storage import sync
    from pneumo.data.synthetic import generate_dataset

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pneumo-bench-"))
    if not (workdir / "chest_xray").is_dir():
        # Real-size images (900-2000 px wide, like the Kaggle JPEGs); scale sized to the image count.
        generate_dataset(workdir, seed=1, scale=args.images / 5856, image_kind="real")
    manifest = sync(workdir, None).frame
    frame = validate_images(workdir, manifest[manifest["split"] == "train"]).frame  # adds width/height
    n = len(frame)
    mean_width = frame["width"].mean()
    print(f"{n} train JPEGs, mean width {mean_width:.0f} px, target {args.size}px, batch {args.batch_size}, "
          f"{os.cpu_count()} cores, TensorFlow {tf.__version__}")

    def keras_baseline():
        return keras.utils.image_dataset_from_directory(
            workdir / "chest_xray" / "train", image_size=(args.size, args.size), batch_size=args.batch_size,
            label_mode="binary", shuffle=False, verbose=False)

    def plain_cached():  # what a tf.data user writes first: full decode, resize, cache
        def load(path, label):
            image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
            return tf.image.resize(image, [args.size, args.size]), label

        files = [str(workdir / p) for p in frame["path"]]
        return (tf.data.Dataset.from_tensor_slices((files, frame["label"].to_numpy()))
                .map(load, num_parallel_calls=tf.data.AUTOTUNE).cache().batch(args.batch_size)
                .prefetch(tf.data.AUTOTUNE))

    def ours():
        return make_dataset(workdir, frame["path"].tolist(), frame["label"].tolist(), image_size=args.size,
                            batch_size=args.batch_size, training=False)

    results = {name: _rates(make, n, args.epochs) for name, make in
               (("keras image_dataset_from_directory", keras_baseline),
                ("plain map-cache-batch-prefetch", plain_cached), ("pneumo make_dataset", ours))}
    base_first, base_later = results["keras image_dataset_from_directory"]
    print(f"{'pipeline':<36}{'epoch 1 img/s':>14}{'later img/s':>13}{'× keras e1':>12}{'× keras later':>15}")
    for name, (first, later) in results.items():
        print(f"{name:<36}{first:>14.0f}{later:>13.0f}{first / base_first:>12.2f}{later / base_later:>15.2f}")


if __name__ == "__main__":
    main()
