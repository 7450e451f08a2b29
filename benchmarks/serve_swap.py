"""``pneumo serve`` under load while the alias moves twice (promote, then rollback).

Starts an ``mlflow server`` (sqlite, local artifacts), registers two versions of an untrained seed
model (``--model``, default cnn_deep at 120 px) as our served pyfunc, and a ``pneumo serve`` process
polling every ``--poll-seconds``. ``--clients`` threads send batches of real-size JPEGs for the
whole run; the alias moves 1 → 2 (promote) and 2 → 1 (rollback). Reports requests, failures,
p50/p99 latency steady vs during each swap (from the alias move until the first answer from the
new version plus one second), the time from alias move to the first answer from the new version,
the server's load time per version, and the server's peak RSS against "2 models + 10 %".

    .venv/bin/python benchmarks/serve_swap.py                     # cnn_deep, 8 clients, poll 5 s
    .venv/bin/python benchmarks/serve_swap.py --model cnn --json
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import requests  # noqa: E402

from tests.plugins.mlflow_server import MlflowServer  # noqa: E402
from tests.plugins.processes import free_port, stop_process, wait_http  # noqa: E402


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def register_versions(uri: str, name: str, model_name: str, image_size: int) -> float:
    """Versions 1 and 2: the same untrained network (seeded), thresholds 0.3 and 0.7, each from its own run.

    Returns one model's weights in MB (float32), the unit of the memory goal.
    """
    import keras

    from pneumo.mlflow_client import mlflow_client
    from pneumo.serving.packaging import log_serving_model
    from pneumo.training.models import build_model

    client = mlflow_client(uri)
    experiment = client.create_experiment(name)
    client.create_registered_model(name)
    for threshold in (0.3, 0.7):
        keras.utils.set_random_seed(1)
        run_id = client.create_run(experiment).info.run_id
        network = build_model(model_name, image_size)
        source = log_serving_model(client, run_id, network, threshold=threshold,
                                   image_size=image_size, candidate=model_name)
        client.create_model_version(name, source=source, run_id=run_id, model_id=source.removeprefix("models:/"))
    client.set_registered_model_alias(name, "champion", "1")
    return 4 * network.count_params() / 2**20


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cnn_deep")
    parser.add_argument("--image-size", type=int, default=120)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="images per request")
    parser.add_argument("--poll-seconds", type=float, default=5.0)
    parser.add_argument("--steady-seconds", type=float, default=15.0, help="load before, between and after the moves")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from pneumo.data.synthetic import generate_dataset

    with tempfile.TemporaryDirectory(prefix="serve-swap-") as tmp:
        work = Path(tmp)
        generate_dataset(work / "data", seed=7, scale=0.01, image_kind="real")
        batch = [base64.b64encode(p.read_bytes()).decode("ascii")
                 for p in sorted((work / "data" / "chest_xray").rglob("*.jpeg"))[:args.batch]]
        mlflow = MlflowServer.start(work / "mlflow", str(work / "artifacts"), {}, workers=1)
        try:
            model_mb = register_versions(mlflow.uri, "bench", args.model, args.image_size)
            return run(args, mlflow.uri, batch, work, model_mb)
        finally:
            mlflow.stop()


def run(args: argparse.Namespace, uri: str, batch: list[str], work: Path, model_mb: float) -> int:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "serve.log"
    with log.open("wb") as sink:
        server = subprocess.Popen([sys.executable, "-m", "pneumo.cli", "serve", "--model", "bench", "--tracking-uri", uri,
                                   "--port", str(port), "--poll-seconds", str(args.poll_seconds)],
                                  stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        wait_http(f"{url}/ping", server, timeout=300, log=log)
        return measure(args, uri, url, batch, server.pid, model_mb)
    finally:
        stop_process(server)


def measure(args: argparse.Namespace, uri: str, url: str, batch: list[str], pid: int, model_mb: float) -> int:
    from pneumo.mlflow_client import mlflow_client

    client = mlflow_client(uri)
    results: list[tuple[float, float, int, str]] = []  # (start, seconds, status, version)
    stop = threading.Event()
    rss: list[tuple[float, float]] = []
    load_seconds = {"1": requests.get(f"{url}/health", timeout=30).json()["load_seconds"]}

    def client_loop() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    response = session.post(f"{url}/invocations", json={"inputs": {"image": batch}}, timeout=120)
                    results.append((started, time.monotonic() - started, response.status_code,
                                    response.headers.get("X-Model-Version", "")))
                except requests.RequestException:
                    results.append((started, time.monotonic() - started, 0, ""))

    def sample_rss() -> None:
        while not stop.is_set():
            rss.append((time.monotonic(), rss_mb(pid)))
            time.sleep(0.1)

    threads = [threading.Thread(target=client_loop) for _ in range(args.clients)] + [threading.Thread(target=sample_rss)]
    for thread in threads:
        thread.start()
    moves: list[tuple[str, float]] = []
    try:
        time.sleep(args.steady_seconds)
        for version in ("2", "1"):  # promote, then roll back
            moves.append((version, time.monotonic()))
            client.set_registered_model_alias("bench", "champion", version)
            deadline = time.monotonic() + 300
            while requests.get(f"{url}/version", timeout=30).json()["version"] != version and time.monotonic() < deadline:
                time.sleep(0.05)
            load_seconds.setdefault(version, requests.get(f"{url}/health", timeout=30).json()["load_seconds"])
            time.sleep(args.steady_seconds)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=180)

    first_new = {version: min((s + d for s, d, status, v in results if v == version and s >= moved), default=float("nan"))
                 for version, moved in moves}
    windows = [(moved, first_new[version] + 1.0) for version, moved in moves]
    during = [d for s, d, status, _ in results if status == 200 and any(a <= s <= b for a, b in windows)]
    steady = [d for s, d, status, _ in results if status == 200 and not any(a <= s <= b for a, b in windows)]
    peak = max(mb for t, mb in rss if any(a <= t <= b for a, b in windows))
    steady_rss = statistics.median(mb for t, mb in rss if t < moves[0][1])
    report = {
        "model": args.model, "image_size": args.image_size, "clients": args.clients, "batch": args.batch,
        "poll_seconds": args.poll_seconds, "requests": len(results), "failures": sum(r[2] != 200 for r in results),
        "p50_steady_ms": 1000 * percentile(steady, 50), "p99_steady_ms": 1000 * percentile(steady, 99),
        "p50_during_swap_ms": 1000 * percentile(during, 50), "p99_during_swap_ms": 1000 * percentile(during, 99),
        "requests_during_swap": len(during),
        "move_to_new_version_s": {version: first_new[version] - moved for version, moved in moves},
        "load_seconds": load_seconds, "rss_steady_mb": steady_rss, "rss_peak_during_swap_mb": peak,
        "model_weights_mb": model_mb, "rss_growth_during_swap_mb": peak - steady_rss,
    }
    report["p99_ratio"] = report["p99_during_swap_ms"] / report["p99_steady_ms"]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key:>24}: {value:.3f}" if isinstance(value, float) else f"{key:>24}: {value}")
    return 0 if report["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
