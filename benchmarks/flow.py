"""Retraining flow: orchestration overhead, and four candidates in parallel vs one after another.

Usage: python benchmarks/flow.py [--scale 0.08] [--epochs 4] [--image-size 64] [--workdir DIR]

Starts a Prefect server on 127.0.0.1 (its own PREFECT_HOME under the work folder), tracks to a
sqlite MLflow store, and runs the `retrain` flow on the demo configuration twice:
  1. sequential: the thread runner with one worker, so candidates train one after another;
     overhead = flow wall time − the sum of the task bodies (timed inside each task);
  2. parallel: a local Dask cluster of two worker processes, each declaring GPU=1 (one candidate
     per worker at a time), TensorFlow limited to 1 thread per worker so they share the cores.
Prints the figures and the ratios.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on a free loopback port; returns the process and its API URL."""
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("wb")
    process = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                                "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                return process, f"http://127.0.0.1:{port}/api"
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("prefect server did not start; see " + str(home / "server.log"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.08)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="pneumo-flow-bench-"))).resolve()
    (workdir / "prefect").mkdir(parents=True, exist_ok=True)
    server, api_url = start_prefect_server(workdir / "prefect")
    os.environ.update({"PREFECT_API_URL": api_url, "PREFECT_HOME": str(workdir / "prefect"),
                       "PNEUMO_HOME": str(workdir / "home"), "TF_CPP_MIN_LOG_LEVEL": "2",
                       "PREFECT_LOGGING_LEVEL": "WARNING"})
    sys.path.insert(0, str(REPO))
    try:
        run(args, workdir)
    finally:
        server.terminate()
        server.wait(timeout=30)


def run(args: argparse.Namespace, workdir: Path) -> None:
    from distributed import LocalCluster
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.retrain import retrain
    from pneumo.config import RetrainParams
    from pneumo.synthetic import generate_dataset

    data = workdir / "data"
    if not (data / "chest_xray").is_dir():
        generate_dataset(data, seed=0, scale=args.scale, image_kind="small")

    def params(tag: str) -> RetrainParams:
        return RetrainParams(source=str(data), epochs=args.epochs, image_size=args.image_size, vgg16_weights="none",
                             min_recall=0.0, tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}",
                             experiment=f"flow-bench-{tag}", registered_model=f"flow-bench-{tag}")

    started = time.perf_counter()
    sequential = retrain.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))(params=params("seq"))
    sequential_wall = time.perf_counter() - started
    bodies = sum(sequential["task_seconds"].values())

    os.environ["PNEUMO_TF_THREADS"] = "1"  # two worker processes on 2 cores: one TF thread each
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, resources={"GPU": 1},
                      dashboard_address=None, host="127.0.0.1") as cluster:
        started = time.perf_counter()
        parallel = retrain.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(
            params=params("par"))
        parallel_wall = time.perf_counter() - started

    print(f"demo config: scale {args.scale}, {args.image_size}px, {args.epochs} epochs, 4 candidates, "
          f"{os.cpu_count()} cores")
    print("sequential task bodies (s): " + ", ".join(f"{k} {v:.1f}" for k, v in sequential["task_seconds"].items()))
    print(f"sequential flow wall {sequential_wall:.1f} s, task bodies {bodies:.1f} s, "
          f"orchestration overhead {sequential_wall - bodies:.1f} s = {(sequential_wall - bodies) / sequential_wall:.1%}")
    print(f"parallel (2 Dask workers, GPU=1 each) flow wall {parallel_wall:.1f} s; "
          f"sequential / parallel = {sequential_wall / parallel_wall:.2f}×")
    for name, result in (("sequential", sequential), ("parallel", parallel)):
        print(f"{name}: " + ", ".join(f"{c['name']} {c['status']}" for c in result["candidates"]))


if __name__ == "__main__":
    main()
