"""Retraining flow: orchestration overhead, and how busy the cores are while four candidates train.

Usage: python benchmarks/flow.py [--layouts sequential,parallel] [--workdir DIR] [demo overrides]

Starts a Prefect server on 127.0.0.1 (its own PREFECT_HOME under the work folder), tracks to a
sqlite MLflow store, and runs the `retrain` flow on the demo's dataset and parameters
(flows/demo.py) once per layout:
  sequential  the thread runner with one worker: candidates train one after another (baseline);
  parallel    the flow's default: the thread runner with one worker per candidate, all in one
              process sharing TensorFlow's thread pools;
  dask        a local Dask cluster of two worker processes (GPU=1 each, one candidate per worker).
For each it prints the flow's wall time, the orchestration overhead (wall − the sum of the task
bodies, timed inside each task) and the process CPU time ÷ wall time over the training phase
(first candidate start → last candidate end), sampled every 0.25 s; on a machine with N cores
N is the most that ratio can reach. Ratios are against the sequential layout of the same run.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

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


class CpuSampler:
    """Process CPU seconds (this process and its children) sampled against wall-clock time."""

    def __init__(self, period: float = 0.25) -> None:
        self.samples: list[tuple[float, float]] = []
        self._period, self._stop = period, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _cpu(self) -> float:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self._cpu()))
            self._stop.wait(self._period)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.time(), self._cpu()))

    def ratio(self, start: float, end: float) -> float:
        """CPU seconds ÷ wall seconds between two wall-clock times (nearest samples)."""
        inside = [(t, c) for t, c in self.samples if start <= t <= end] or self.samples
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else float("nan")


def measure(layout: str, params: Any, dask_worker_env: dict[str, str]) -> dict[str, Any]:
    """Run the flow once in ``layout``; wall time, overhead and the training phase's CPU ÷ wall."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.retrain import retrain

    if layout == "dask":
        from distributed import LocalCluster
        from prefect_dask import DaskTaskRunner

        os.environ.update(dask_worker_env)
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, resources={"GPU": 1},
                          dashboard_address=None, host="127.0.0.1") as cluster, CpuSampler() as cpu:
            started = time.perf_counter()
            result = retrain.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(
                params=params)
            wall = time.perf_counter() - started
        for key in dask_worker_env:
            os.environ.pop(key, None)
    else:
        workers = 1 if layout == "sequential" else len(params.candidates)
        with CpuSampler() as cpu:
            started = time.perf_counter()
            result = retrain.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))(params=params)
            wall = time.perf_counter() - started
    trained = [c for c in result["candidates"] if c["status"] == "ok"]
    phase_start, phase_end = min(c["started"] for c in trained), max(c["finished"] for c in trained)
    return {"wall": wall, "bodies": sum(result["task_seconds"].values()), "train_phase": phase_end - phase_start,
            "cpu_ratio": cpu.ratio(phase_start, phase_end), "tasks": result["task_seconds"],
            "statuses": {c["name"]: c["status"] for c in result["candidates"]},
            "auc": {c["name"]: round(c["test"]["roc_auc"], 3) for c in trained}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="sequential,parallel", help="comma list of sequential, parallel, dask")
    parser.add_argument("--epochs", type=int, help="override the demo's epochs")
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
    from flows.demo import demo_params, generate_demo_dataset

    data = workdir / "data"
    generate_demo_dataset(data)
    cores = os.cpu_count() or 1
    results = {}
    for layout in args.layouts.split(","):
        params = demo_params(data).model_copy(update={
            "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}", "experiment": f"flow-bench-{layout}",
            "registered_model": f"flow-bench-{layout}"})
        if args.epochs:
            params = params.model_copy(update={"train": params.train.model_copy(update={"epochs": args.epochs})})
        # Two Dask worker processes on this machine: each gets its share of TensorFlow's threads.
        results[layout] = measure(layout, params, {"PNEUMO_TF_THREADS": str(max(1, cores // 2))})
        found = results[layout]
        print(f"{layout:<11} wall {found['wall']:6.1f} s  overhead {found['wall'] - found['bodies']:5.1f} s "
              f"({(found['wall'] - found['bodies']) / found['wall']:.1%})  training phase {found['train_phase']:6.1f} s  "
              f"CPU ÷ wall {found['cpu_ratio']:.2f} (of {cores})", flush=True)
        print("            tasks: " + ", ".join(f"{k} {v:.1f}" for k, v in found["tasks"].items()))
        print("            test AUC: " + ", ".join(f"{k} {v}" for k, v in found["auc"].items()))
    if "sequential" in results:
        base = results["sequential"]["wall"]
        for layout, found in results.items():
            print(f"sequential ÷ {layout} wall: {base / found['wall']:.2f}×")


if __name__ == "__main__":
    main()
