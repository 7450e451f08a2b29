"""Served-model speed: pyfunc (decode + model) vs the bare Keras model on preprocessed arrays, same run.

Measures, for the pyfunc model that downstream apps load (``pneumo.serving``):
  * latency of one image (p50, p99), and
  * throughput for batches of 64 encoded JPEGs,
against calling the bare Keras model on already-decoded float arrays, and prints the ratios.

    .venv/bin/python benchmarks/inference.py                      # cnn at 120 px, 1024-px JPEGs
    .venv/bin/python benchmarks/inference.py --model cnn_deep --source-size 96 --json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402


def xray_like_jpegs(count: int, size: int, seed: int = 0) -> list[bytes]:
    """Gray JPEGs with smooth structure plus noise (compress like radiographs, not like white noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    height, width = int(size * 0.8), size
    y, x = np.mgrid[0:height, 0:width]
    images = []
    for _ in range(count):
        cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
        body = 150 * np.exp(-(((x - cx) / (0.35 * width)) ** 2 + ((y - cy) / (0.4 * height)) ** 2))
        pixels = np.clip(body + rng.normal(40, 12, (height, width)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "L").save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def time_calls(fn: Any, repeats: int) -> list[float]:
    """Seconds per call, after two warm-up calls (graph tracing, thread pools)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", help="architecture from pneumo.models (weights random)")
    parser.add_argument("--image-size", type=int, default=120, help="model input side")
    parser.add_argument("--source-size", type=int, default=1024, help="width of the JPEGs fed to the pyfunc")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--single-repeats", type=int, default=200)
    parser.add_argument("--batch-repeats", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)

    import keras
    import mlflow.pyfunc
    import tensorflow as tf

    from pneumo import serving
    from pneumo.models import build_model

    keras.utils.set_random_seed(0)
    model = build_model(args.model, args.image_size, vgg16_weights="none")
    images = xray_like_jpegs(args.batch, args.source_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = serving.save_serving_model(Path(tmp) / "model", model, threshold=0.5,
                                          image_size=args.image_size, candidate=args.model)
        pyfunc = mlflow.pyfunc.load_model(str(path))
        keras_model = pyfunc.unwrap_python_model().model  # the very Keras model the pyfunc calls
        # Baseline: the fastest plain way to call it, a traced forward pass, on decoded arrays.
        size = args.image_size
        forward = tf.function(lambda x: keras_model(x, training=False),
                              input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        arrays = tf.constant(serving.preprocess(images, size))  # the baseline gets decoding for free
        one = arrays[:1]

        single_pyfunc = time_calls(lambda: pyfunc.predict([images[0]]), args.single_repeats)
        single_bare = time_calls(lambda: forward(one).numpy(), args.single_repeats)
        batch_pyfunc = time_calls(lambda: pyfunc.predict(images), args.batch_repeats)
        batch_bare = time_calls(lambda: forward(arrays).numpy(), args.batch_repeats)

    result = {
        "model": args.model, "image_size": args.image_size, "source_jpeg": f"{args.source_size}x{int(args.source_size * 0.8)}",
        "mean_jpeg_kb": round(statistics.mean(len(i) for i in images) / 1024, 1), "batch": args.batch,
        "cpus": os.cpu_count(), "gpu": bool(tf.config.list_physical_devices("GPU")),
        "single_ms": {
            "pyfunc_p50": 1000 * percentile(single_pyfunc, 50), "pyfunc_p99": 1000 * percentile(single_pyfunc, 99),
            "bare_p50": 1000 * percentile(single_bare, 50), "bare_p99": 1000 * percentile(single_bare, 99),
        },
        "batch_images_per_s": {
            "pyfunc": args.batch / statistics.median(batch_pyfunc),
            "bare": args.batch / statistics.median(batch_bare),
        },
    }
    result["batch_throughput_ratio"] = result["batch_images_per_s"]["pyfunc"] / result["batch_images_per_s"]["bare"]
    result["single_p50_ratio"] = result["single_ms"]["pyfunc_p50"] / result["single_ms"]["bare_p50"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        s, b = result["single_ms"], result["batch_images_per_s"]
        print(f"{args.model} @ {args.image_size}px, JPEGs {result['source_jpeg']} (~{result['mean_jpeg_kb']} KB), "
              f"{result['cpus']} CPUs, GPU={result['gpu']}")
        print(f"one image   pyfunc p50 {s['pyfunc_p50']:.1f} ms  p99 {s['pyfunc_p99']:.1f} ms   |   "
              f"bare p50 {s['bare_p50']:.1f} ms  p99 {s['bare_p99']:.1f} ms   (p50 ratio {result['single_p50_ratio']:.2f}x)")
        print(f"batch {args.batch:<4} pyfunc {b['pyfunc']:.0f} img/s   |   bare {b['bare']:.0f} img/s   "
              f"(pyfunc/bare throughput {result['batch_throughput_ratio']:.2f}x; target >= 0.67)")
    return result


if __name__ == "__main__":
    main()
