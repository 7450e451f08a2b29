"""Benchmark: pneumo.data.storage.sync vs a sequential boto3 list-and-get loop against a loopback S3 server.

Runs moto's S3 server in its own process, seeds it with ``--objects`` small objects in the Kaggle
layout, then for each endpoint (direct, and through a proxy adding ``--latency-ms`` per request as
a stand-in for a real object store's first-byte latency) measures, in one run:

* baseline: one boto3 client, paginated list, then get_object + write, one object at a time;
* first sync: ``sync()`` into an empty cache;
* re-sync: ``sync()`` again with nothing changed.

Prints objects/s and the ratios (first sync vs baseline; re-sync vs first sync).

    .venv/bin/python benchmarks/ingest.py [--objects 2000] [--workers 16] [--latency-ms 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the S3 server and latency proxy are the test harness's

from pneumo.data.storage import sync, upload_tree  # noqa: E402
from tests.plugins.s3 import TEST_CREDENTIALS, FaultProxy, S3Server  # noqa: E402


def _seed_files(folder: Path, count: int, size: int) -> None:
    """``count`` objects of ``size`` bytes spread over the layout's splits and classes."""
    cells = [(s, c) for s in ("train", "val", "test") for c in ("NORMAL", "PNEUMONIA")]
    for i in range(count):
        split, cls = cells[i % len(cells)]
        name = f"IM-{i:05d}-0001.jpeg" if cls == "NORMAL" else f"person{i}_bacteria_1.jpeg"
        path = folder / "chest_xray" / split / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(i.to_bytes(4, "big") + os.urandom(size - 4))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc); 0.0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class _CpuMeter:
    """CPU seconds spent by the server, the proxy and this process over a block."""

    def __init__(self, server: S3Server, proxy: FaultProxy) -> None:
        self.pids = {"server": server.process.pid, "proxy": proxy.process.pid}
        self.spent: dict[str, float] = {}

    def __enter__(self) -> _CpuMeter:
        self.start = {name: _cpu_seconds(pid) for name, pid in self.pids.items()}
        self.start["client"] = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        now = {name: _cpu_seconds(pid) for name, pid in self.pids.items()}
        now["client"] = time.process_time()
        self.spent = {name: now[name] - self.start[name] for name in now}


def _sequential(server: S3Server, endpoint: str, bucket: str, out: Path) -> tuple[int, float]:
    """The naive loop: list everything, then get and write one object at a time."""
    client = server.client(endpoint_url=endpoint)
    started = time.perf_counter()
    keys = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for item in page.get("Contents", [])]
    for key in keys:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        target = out / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
    return len(keys), time.perf_counter() - started


def _measure(server: S3Server, proxy: FaultProxy, endpoint: str, bucket: str, workers: int,
             scratch: Path) -> dict[str, Any]:
    count, baseline = _sequential(server, endpoint, bucket, scratch / "baseline")
    cache = scratch / "cache"
    with _CpuMeter(server, proxy) as meter:
        first = sync(f"s3://{bucket}", cache, endpoint_url=endpoint, workers=workers)
    again = sync(f"s3://{bucket}", cache, endpoint_url=endpoint, workers=workers)
    assert first.report.downloaded == count and again.report.downloaded == 0
    assert first.fingerprint == again.fingerprint
    shutil.rmtree(scratch / "baseline")
    shutil.rmtree(cache)
    return {
        "objects": count,
        "baseline_s": baseline,
        "first_sync_s": first.report.seconds,
        "resync_s": again.report.seconds,
        "baseline_obj_per_s": count / baseline,
        "first_sync_obj_per_s": count / first.report.seconds,
        "resync_obj_per_s": count / again.report.seconds,
        "first_sync_vs_baseline": baseline / first.report.seconds,
        "resync_vs_first_sync": first.report.seconds / again.report.seconds,
        # Where the first sync's CPU went, per object: on loopback the CPUs, not the network, cap it.
        "first_sync_cpu_ms_per_object": {name: 1000 * spent / count for name, spent in meter.spent.items()},
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--size", type=int, default=4096, help="bytes per object")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    os.environ.update(TEST_CREDENTIALS)

    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    server = S3Server.start()
    proxy = FaultProxy.start(server.endpoint_url, latency_ms=args.latency_ms)
    results: dict[str, Any] = {"objects": args.objects, "size": args.size, "workers": args.workers,
                               "latency_ms": args.latency_ms, "cpus": os.cpu_count(), "runs": {},
                               "load_average": [round(x, 2) for x in load]}
    try:
        with tempfile.TemporaryDirectory(prefix="pneumo-bench-") as tmp:
            scratch = Path(tmp)
            _seed_files(scratch / "seed", args.objects, args.size)
            bucket = server.make_bucket("bench")
            started = time.perf_counter()
            upload_tree(scratch / "seed", f"s3://{bucket}", endpoint_url=server.endpoint_url, workers=args.workers)
            results["seed_upload_s"] = time.perf_counter() - started
            # Warm-up (imports, botocore model loading) so neither side pays one-off costs in the timing.
            warm = server.make_bucket("warmup")
            _seed_files(scratch / "warm", 24, args.size)
            upload_tree(scratch / "warm", f"s3://{warm}", endpoint_url=server.endpoint_url)
            _sequential(server, server.endpoint_url, warm, scratch / "warm-seq")
            sync(f"s3://{warm}", scratch / "warm-cache", endpoint_url=server.endpoint_url)
            for name, endpoint in (("direct", server.endpoint_url), (f"latency_{args.latency_ms:g}ms", proxy.endpoint_url)):
                results["runs"][name] = _measure(server, proxy, endpoint, bucket, args.workers, scratch)
    finally:
        proxy.stop()
        server.stop()

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"seeded with upload_tree in {results['seed_upload_s']:.1f} s; load average before: "
          f"{results['load_average']}")
    print(f"{args.objects} objects of {args.size} B, {args.workers} workers, moto server in its own process, "
          f"{os.cpu_count()} CPUs")
    print(f"{'endpoint':<16}{'sequential':>14}{'first sync':>14}{'re-sync':>14}{'first/seq':>11}{'first/re-sync':>15}")
    for name, r in results["runs"].items():
        print(f"{name:<16}{r['baseline_obj_per_s']:>10.0f} o/s{r['first_sync_obj_per_s']:>10.0f} o/s"
              f"{r['resync_obj_per_s']:>10.0f} o/s{r['first_sync_vs_baseline']:>10.1f}x"
              f"{r['resync_vs_first_sync']:>14.1f}x")
    for name, r in results["runs"].items():
        cpu = r["first_sync_cpu_ms_per_object"]
        print(f"first sync CPU per object, {name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in cpu.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
