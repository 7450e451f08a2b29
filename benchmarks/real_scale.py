"""A retraining at the real dataset's size: every stage's wall and CPU time, peak memory, and the seed's schedule.

Usage: python benchmarks/real_scale.py [--epochs 1] [--image-size 120] [--workdir DIR]
       [--scale 1.0 --image-kind real]  (smaller values only to try the script)

Generates real-size images (900-2,000 px, scale 1.0: 5,856 images in Kaggle's split sizes) once
under the work folder, then runs the retraining's own steps one after another, as the flow runs
them (pneumo.pipeline; no Prefect, so each stage is timed alone): ingest into the cache, image
validation and the patient-grouped split, the memory estimate, the four candidates trained in
parallel threads of one process (each: epochs, then evaluation; then model logging to a sqlite
MLflow store), and promotion (the gate scores the 624-image test split). For each stage it prints
wall seconds, CPU seconds of the process, CPU ÷ wall (2.0 is the most on 2 cores) and the peak RSS
so far; per model, training images/s and the epoch time measured while all four share the
machine, and the wall time of the seed's schedule (dense 50, cnn 20, cnn_deep 20, vgg16 40 epochs)
projected from it. One epoch is enough to measure an epoch; the projection is an estimate.
vgg16 starts from random weights ('vgg16_weights: none': nothing is downloaded); an epoch costs
the same as with ImageNet weights (blocks 1-3 frozen, 4-5 trained either way).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SEED_EPOCHS = {"dense": 50, "cnn": 20, "cnn_deep": 20, "vgg16": 40}


class Stages:
    """Wall and process CPU per stage, with the peak RSS when each ended."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float, float]] = []

    def run(self, name: str, call: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        result = call()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB on Linux
        self.rows.append((name, wall, cpu, peak_gib))
        print(f"  {name:<28} wall {wall:8.1f} s   cpu {cpu:8.1f} s   cpu/wall {cpu / max(wall, 1e-9):4.2f}   "
              f"peak RSS {peak_gib:5.2f} GiB", flush=True)
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=120)
    parser.add_argument("--workdir", type=Path, default=REPO / ".pneumo" / "bench-real-scale")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--image-kind", default="real", choices=["real", "small"])
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ["PNEUMO_HOME"] = str(args.workdir / "home")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from pneumo import pipeline
    from pneumo.config import Settings
    from pneumo.data.synthetic import generate_dataset
    from pneumo.params import RetrainParams
    from pneumo.promotion import tracking

    data = args.workdir / f"data-{args.scale}-{args.image_kind}"
    if not (data / "chest_xray").is_dir():
        print(f"generating the real-size dataset under {data} (once) ...", flush=True)
        started = time.perf_counter()
        report = generate_dataset(data, seed=0, scale=args.scale, image_kind=args.image_kind)
        print(f"  {report.images} images in {time.perf_counter() - started:.0f} s", flush=True)

    with tempfile.TemporaryDirectory(prefix="pneumo-bench-mlflow-") as store:
        params = RetrainParams(source=str(data), tracking_uri=f"sqlite:///{store}/mlflow.db",
                               experiment="real-scale-benchmark", registered_model="real-scale-benchmark",
                               train={"epochs": args.epochs, "image_size": args.image_size,
                                      "vgg16_weights": "none"}).resolved(Settings())
        settings = Settings()
        stages = Stages()
        cores = os.cpu_count() or 1
        print(f"real-scale retraining: {', '.join(params.candidates)} at {args.image_size} px, {args.epochs} "
              f"epoch(s), {cores} cores (vgg16 without ImageNet weights: same cost per epoch)", flush=True)
        from pneumo.training.train import configure_thread_pools

        stages.run("start (TensorFlow, pools)", lambda: configure_thread_pools(len(params.candidates)))
        ingested = stages.run("ingest", lambda: pipeline.ingest(params.source, settings))
        prepared = stages.run("validation", lambda: pipeline.prepare_data(
            ingested.root, ingested.frame, params.train, log=lambda _: None))
        estimate = stages.run("memory estimate", lambda: pipeline.check_memory(
            params.candidates, params.train, len(prepared.frame), log=lambda _: None))
        report = {**prepared.report, "fingerprint": ingested.fingerprint, "memory_estimate": estimate}
        parent = tracking.start_retraining(params.tracking_uri, params.experiment, params.source,
                                           ingested.fingerprint, params, data_report=report, manifest=prepared.frame)

        def train_all() -> list[dict[str, Any]]:
            with ThreadPoolExecutor(len(params.candidates)) as pool:
                futures = [pool.submit(pipeline.train_and_log, name, prepared.frame, params, parent, report, settings,
                                       log=lambda _: None) for name in params.candidates]
                return [future.result() for future in futures]

        results = stages.run("train 4 in parallel + log", train_all)
        test = prepared.frame[prepared.frame["subset"] == "test"]
        decision = stages.run("promotion (gate on test)", lambda: pipeline.promote_best(
            params, parent, [r["run_id"] for r in results], test, settings))
        tracking.finish_retraining(parent, status="FINISHED", tracking_uri=params.tracking_uri)

    train_images = int((prepared.frame["subset"] == "train").sum())
    print(f"\nper model (all {len(results)} sharing the machine; {train_images} training images):")
    projected = {}
    for result in results:
        logging_s = result["finished"] - result["started"] - result["seconds"]
        epoch_s = train_images / result["images_per_second"]
        projected[result["name"]] = epoch_s * SEED_EPOCHS[result["name"]]
        print(f"  {result['name']:<9} {result['images_per_second']:7.1f} images/s   epoch {epoch_s:7.1f} s   "
              f"train+evaluate {result['seconds']:7.1f} s   model logging {logging_s:5.1f} s   "
              f"seed schedule ({SEED_EPOCHS[result['name']]} epochs) ≈ {projected[result['name']] / 3600:5.2f} h")
    wall = sum(row[1] for row in stages.rows)
    cpu = sum(row[2] for row in stages.rows)
    peak = max(row[3] for row in stages.rows)
    print(f"\ntotal: wall {wall:.0f} s, cpu {cpu:.0f} s, cpu/wall {cpu / wall:.2f}, peak RSS {peak:.2f} GiB "
          f"(estimated before training: {estimate['total'] / 1024**3:.2f} GiB)")
    print(f"promotion: {decision.outcome}, version {decision.version}, {decision.n_test_images} test images")
    print(f"seed schedule projected: the slowest model alone {max(projected.values()) / 3600:.2f} h with all four "
          f"sharing the machine (an upper bound: a model speeds up once the others finish)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
