"""Served-model speed: pyfunc (decode + model) vs the bare Keras model on preprocessed arrays, same run.

For each model, measures the pyfunc model that downstream apps load (``pneumo.serving.pyfunc``):
  * latency of one image (p50, p99), and
  * throughput for batches of 64 encoded JPEGs,
against calling the bare Keras model on already-decoded float arrays, and prints the ratios. It
also times decoding alone, which bounds what any served model can reach:
``ceiling = 1 / (1 + bare img/s ÷ decode img/s)``.

The JPEGs come from ``pneumo.data.synthetic`` (``--images real``: 900-2000 px wide, about 0.15 bytes
per pixel, like the Kaggle files' 1.2 GB over 5,856 images; ``small``: 48-96 px).

    .venv/bin/python benchmarks/inference.py                          # all four models, real-size JPEGs
    .venv/bin/python benchmarks/inference.py --models cnn --images small --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402

TARGET = 0.67  # pyfunc batch throughput ÷ bare model throughput (issue #4)


def generated_jpegs(count: int, image_kind: str, workdir: Path) -> list[bytes]:
    """``count`` JPEGs from a generated dataset (same seed, same bytes on every run)."""
    from pneumo.data.synthetic import generate_dataset

    root = workdir / f"synth-{image_kind}"
    if not (root / "chest_xray").exists():
        generate_dataset(root, seed=7, scale=max(0.01, 1.2 * count / 5856), image_kind=image_kind)
    files = sorted((root / "chest_xray").rglob("*.jpeg"))[:count]
    if len(files) < count:
        raise SystemExit(f"generated only {len(files)} JPEGs, need {count}")
    return [path.read_bytes() for path in files]


def describe(images: list[bytes]) -> dict[str, float]:
    """Mean encoded size, mean dimensions and bytes per pixel of the fed JPEGs."""
    import io

    from PIL import Image

    sizes = [Image.open(io.BytesIO(data)).size for data in images]
    pixels = sum(w * h for w, h in sizes)
    return {"mean_kb": statistics.mean(map(len, images)) / 1024,
            "mean_width": statistics.mean(w for w, _ in sizes), "mean_height": statistics.mean(h for _, h in sizes),
            "bytes_per_pixel": sum(map(len, images)) / pixels}


def time_calls(fn: Callable[[], Any], seconds: float, least: int, most: int) -> list[float]:
    """Seconds per call after two warm-up calls; repeats fill about ``seconds`` within [least, most]."""
    fn()
    started = time.perf_counter()
    fn()
    repeats = int(min(most, max(least, seconds / max(time.perf_counter() - started, 1e-6))))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def measure(name: str, images: list[bytes], pixels: np.ndarray, seconds: float, decode_rate: float,
            models_dir: Path) -> dict[str, Any]:
    """Latency and batch throughput of one architecture, pyfunc vs bare, in this process."""
    import keras
    import mlflow.pyfunc
    import tensorflow as tf

    from pneumo.serving.packaging import save_serving_model
    from pneumo.training.models import build_model

    image_size = pixels.shape[1]
    keras.utils.set_random_seed(0)
    model = build_model(name, image_size, vgg16_weights="none")  # speed does not depend on weights
    path = save_serving_model(models_dir / f"model-{name}", model, threshold=0.5,
                                      image_size=image_size, candidate=name)
    pyfunc = mlflow.pyfunc.load_model(str(path))
    keras_model = pyfunc.unwrap_python_model().model  # the very Keras model the pyfunc calls
    # Baseline: the fastest plain way to call it, a traced forward pass, on decoded arrays.
    forward = tf.function(lambda x: keras_model(x, training=False),
                          input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32)])
    arrays = tf.constant(pixels)  # the baseline gets decoding for free
    one = arrays[:1]

    single_pyfunc = time_calls(lambda: pyfunc.predict([images[0]]), seconds, 20, 200)
    single_bare = time_calls(lambda: forward(one).numpy(), seconds, 20, 200)
    batch_pyfunc = time_calls(lambda: pyfunc.predict(images), seconds, 5, 20)
    batch_bare = time_calls(lambda: forward(arrays).numpy(), seconds, 5, 20)
    pyfunc_rate = len(images) / statistics.median(batch_pyfunc)
    bare_rate = len(images) / statistics.median(batch_bare)
    return {
        "model": name,
        "single_ms": {"pyfunc_p50": 1000 * float(np.percentile(single_pyfunc, 50)),
                      "pyfunc_p99": 1000 * float(np.percentile(single_pyfunc, 99)),
                      "bare_p50": 1000 * float(np.percentile(single_bare, 50)),
                      "bare_p99": 1000 * float(np.percentile(single_bare, 99))},
        "batch_images_per_s": {"pyfunc": pyfunc_rate, "bare": bare_rate},
        "batch_throughput_ratio": pyfunc_rate / bare_rate,
        # Decoding and the model share the same cores, so their times per image add up.
        "decode_ceiling_ratio": 1.0 / (1.0 + bare_rate / decode_rate),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="dense,cnn,cnn_deep,vgg16", help="comma-separated pneumo.training.models names")
    parser.add_argument("--images", choices=("real", "small"), default="real", help="generated JPEG sizes to feed")
    parser.add_argument("--image-size", type=int, default=120, help="model input side")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=4.0, help="time budget per measurement")
    parser.add_argument("--workdir", type=Path, help="keep the generated JPEGs here between runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from pneumo.serving import pyfunc as serving

    load = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="pneumo-bench-") as tmp:
        models_dir = Path(tmp)
        workdir = args.workdir or models_dir
        workdir.mkdir(parents=True, exist_ok=True)
        images = generated_jpegs(args.batch, args.images, workdir)
        # Decoding alone, as the pyfunc does it (the training pipeline's decode, mapped in parallel).
        decode = time_calls(lambda: serving.preprocess(images, args.image_size), args.seconds, 5, 20)
        decode_rate = len(images) / statistics.median(decode)
        pixels = serving.preprocess(images, args.image_size)  # decoded once, fed to every bare model
        rows = [measure(name.strip(), images, pixels, args.seconds, decode_rate, models_dir)
                for name in args.models.split(",") if name.strip()]

    result = {"images": args.images, **{k: round(v, 3) for k, v in describe(images).items()},
              "image_size": args.image_size, "batch": args.batch, "cpus": os.cpu_count(),
              "gpu": bool(tf.config.list_physical_devices("GPU")), "load_average_before": load,
              "decode_images_per_s": decode_rate, "models": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    print(f"{args.batch} generated '{args.images}' JPEGs: mean {result['mean_width']:.0f}x{result['mean_height']:.0f} px, "
          f"{result['mean_kb']:.0f} KB, {result['bytes_per_pixel']:.3f} B/px; model input {args.image_size} px; "
          f"{result['cpus']} CPUs, GPU={result['gpu']}, load average before {load}")
    print(f"decoding alone: {decode_rate:.0f} img/s")
    print(f"{'model':<10}{'1 img p50/p99 pyfunc':>22}{'bare':>16}{'batch pyfunc':>15}{'bare':>12}"
          f"{'pyfunc/bare':>13}{'ceiling':>9}")
    for row in rows:
        s, b = row["single_ms"], row["batch_images_per_s"]
        print(f"{row['model']:<10}{s['pyfunc_p50']:>11.1f} /{s['pyfunc_p99']:>6.1f} ms"
              f"{s['bare_p50']:>7.1f} /{s['bare_p99']:>5.1f} ms{b['pyfunc']:>9.0f} img/s{b['bare']:>6.0f} img/s"
              f"{row['batch_throughput_ratio']:>12.2f}x{row['decode_ceiling_ratio']:>8.2f}x")
    print(f"target: pyfunc/bare >= {TARGET}")
    return result


if __name__ == "__main__":
    main()
