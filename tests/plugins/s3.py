"""Shared S3 test harness: moto's server in its own process, plus a fault/latency proxy.

Fixtures:
    s3_server (session): a running moto S3 server on 127.0.0.1; see :class:`S3Server`.
    s3_env (function): test credentials (and nothing else) in ``os.environ`` for code that uses
        boto3's standard credential chain; the endpoint is *not* set, pass ``s3_server.endpoint_url``.
    fault_proxy (function): factory ``fault_proxy(fail_rate=0.2, latency_ms=0, faults=...)`` that
        starts a :class:`FaultProxy` in front of ``s3_server`` (stopped after the test).

The proxy is also a script (used by benchmarks/ingest.py):
    python tests/plugins/s3.py proxy --upstream http://127.0.0.1:PORT --latency-ms 20
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.plugins.processes import free_port, stop_process, wait_http

TEST_CREDENTIALS: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "pneumo-test-access-key",
    "AWS_SECRET_ACCESS_KEY": "pneumo-test-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}
FAULT_KINDS: tuple[str, ...] = ("503", "500", "drop", "truncate")  # what a flaky store does
# "corrupt" (a GET body with one byte flipped, same length) is opt-in: only content checks catch it.
ALL_FAULT_KINDS: tuple[str, ...] = (*FAULT_KINDS, "corrupt")


# moto's S3 app alone, served by werkzeug like ``moto.server`` does, but:
#  * without moto's all-services dispatcher, which per request lists moto's package folder and
#    tries hundreds of URL patterns under one lock (measured: ~40 % of the server's CPU per GET);
#  * without werkzeug's per-request access log (through colorama: about a sixth of the CPU).
_MOTO_S3_MAIN = (
    "import logging, sys; logging.getLogger('werkzeug').setLevel(logging.WARNING); "
    "from werkzeug.serving import run_simple; "
    "from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app; "
    "run_simple(sys.argv[1], int(sys.argv[2]), create_backend_app('s3'), threaded=True, "
    "request_handler=MotoRequestHandler)"
)


class S3Server:
    """A moto S3 server in its own process (so tests may fault-inject or kill clients freely).

    Attributes:
        endpoint_url: ``http://127.0.0.1:PORT``.
        env: credentials plus ``AWS_ENDPOINT_URL_S3`` and ``MLFLOW_S3_ENDPOINT_URL`` pointing here,
            for subprocesses (MLflow server, Prefect workers, flows).
    """

    def __init__(self, process: subprocess.Popen[Any], port: int) -> None:
        self.process = process
        self.port = port
        self.endpoint_url = f"http://127.0.0.1:{port}"
        self.env: dict[str, str] = {**TEST_CREDENTIALS, "AWS_ENDPOINT_URL_S3": self.endpoint_url,
                                    "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url}

    @classmethod
    def start(cls, attempts: int = 3) -> S3Server:
        """Start moto's S3 server on a free loopback port and wait until it answers."""
        last: Exception | None = None
        for _ in range(attempts):
            port = free_port()
            env = {**os.environ, **TEST_CREDENTIALS}
            process = subprocess.Popen(
                [sys.executable, "-c", _MOTO_S3_MAIN, "127.0.0.1", str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            try:
                wait_http(f"http://127.0.0.1:{port}/", process)  # ListBuckets
                return cls(process, port)
            except RuntimeError as exc:  # port taken between free_port() and bind: try another
                last = exc
                stop_process(process)
        raise RuntimeError(f"could not start moto server: {last}")

    def stop(self) -> None:
        """Terminate the server process."""
        stop_process(self.process)

    def client(self, endpoint_url: str | None = None, **config: Any) -> Any:
        """A boto3 S3 client with the test credentials, talking to this server (or ``endpoint_url``)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def make_bucket(self, prefix: str = "test") -> str:
        """Create a bucket with a unique name (the server is shared by the whole session)."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}".lower()
        self.client().create_bucket(Bucket=name)
        return name

    def put_tree(self, bucket: str, files: dict[str, bytes], prefix: str = "") -> None:
        """Upload ``{key: content}`` (keys relative to ``prefix``) sequentially."""
        client = self.client()
        for key, body in files.items():
            client.put_object(Bucket=bucket, Key=prefix + key, Body=body)

    def delete_keys_containing(self, bucket: str, fragment: str) -> list[str]:
        """Delete every key of ``bucket`` that contains ``fragment`` (all pages: a listing stops at 1,000)."""
        client = self.client()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        keys = [item["Key"] for page in pages for item in page.get("Contents", []) if fragment in item["Key"]]
        for key in keys:
            client.delete_object(Bucket=bucket, Key=key)
        return keys


class FaultProxy:
    """An HTTP proxy process in front of an S3 endpoint that injects faults and/or latency.

    Attributes:
        endpoint_url: where clients should connect.
    """

    def __init__(self, process: subprocess.Popen[str], port: int) -> None:
        self.process = process
        self.endpoint_url = f"http://127.0.0.1:{port}"

    @classmethod
    def start(
        cls,
        upstream: str,
        *,
        fail_rate: float = 0.0,
        latency_ms: float = 0.0,
        faults: tuple[str, ...] = FAULT_KINDS,
        methods: tuple[str, ...] = ("GET", "HEAD"),
        seed: int = 0,
        deny: str = "",
        only: str = "",
        sse: str = "",
        fail_first: int = 0,
    ) -> FaultProxy:
        """Start the proxy (``python -m tests.plugins.s3 proxy``) and wait for it to answer.

        Args:
            upstream: the S3 endpoint to forward to.
            fail_rate: share of requests (with a method in ``methods``) that get a fault.
            latency_ms: delay added before forwarding every request.
            faults: kinds to draw from: "503", "500" (error replies), "drop" (connection closed
                without a reply), "truncate" (GET bodies cut in half, then the connection closed),
                "corrupt" (GET body with one byte flipped; not in the default set).
            methods: HTTP methods that may get faults.
            seed: seeds the fault draws.
            deny: requests whose path contains this text get a permanent 403 AccessDenied.
            only: when set, faults hit only requests whose path contains this text (e.g. object
                GETs but not listings).
            sse: make the store look like a bucket encrypted by default, as S3 does it:
                "aws:kms" (SSE-KMS) or "sse-c" (customer keys). Every object reply then carries
                the encryption header and, like real SSE-KMS/SSE-C objects, a 32-hex ETag that is
                *not* the content MD5 (the MD5's hex digits reversed, in listings too; If-Match
                and If-None-Match are mapped back before forwarding). moto itself returns the
                MD5 ETag whatever the encryption.
            fail_first: the first this many requests that may get faults all get the first kind of
                ``faults``, whatever ``fail_rate`` (a deterministic blip); later ones follow ``fail_rate``.
        """
        process = subprocess.Popen(
            [
                sys.executable, "-m", "tests.plugins.s3", "proxy",
                "--upstream", upstream, "--fail-rate", str(fail_rate),
                "--latency-ms", str(latency_ms), "--faults", ",".join(faults),
                "--methods", ",".join(methods), "--seed", str(seed), "--deny", deny,
                "--only", only, "--sse", sse, "--fail-first", str(fail_first),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=Path(__file__).resolve().parents[2],  # the repository root, so `tests.` imports resolve
        )
        assert process.stdout is not None
        line = process.stdout.readline()  # the proxy binds port 0 and prints it: no port race
        if not line.startswith("PORT "):
            stop_process(process)
            raise RuntimeError(f"fault proxy did not start (said {line!r})")
        proxy = cls(process, int(line.split()[1]))
        wait_http(proxy.endpoint_url + "/__proxy__/stats", process)
        return proxy

    def stats(self) -> dict[str, Any]:
        """Requests seen and faults injected so far, by kind."""
        with urllib.request.urlopen(self.endpoint_url + "/__proxy__/stats", timeout=5) as response:
            return dict(json.load(response))

    def stop(self) -> None:
        """Terminate the proxy process."""
        stop_process(self.process)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------- proxy server
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, upstream: str, fail_rate: float, latency: float, faults: list[str],
                 methods: set[str], seed: int, deny: str = "", only: str = "", sse: str = "",
                 fail_first: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        host, _, port = upstream.removeprefix("http://").rstrip("/").partition(":")
        self.upstream = (host, int(port or 80))
        self.fail_rate = fail_rate
        self.latency = latency
        self.faults = faults
        self.methods = methods
        self.deny = deny
        self.only = only
        self.sse = sse
        self.fail_first = fail_first
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def pick_fault(self, method: str, path: str) -> str | None:
        with self.lock:
            self.counts["requests"] += 1
            if self.deny and self.deny in path:
                self.counts["denied"] += 1
                return "deny"
            if method not in self.methods or not self.faults or (self.only and self.only not in path):
                return None
            if self.fail_first > 0:
                self.fail_first -= 1
                self.counts[self.faults[0]] += 1
                return self.faults[0]
            if self.rng.random() >= self.fail_rate:
                return None
            fault = self.rng.choice(self.faults)
            if fault in ("truncate", "corrupt") and method != "GET":
                fault = "drop"
            self.counts[fault] += 1
            return fault


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer
    _upstream: http.client.HTTPConnection | None = None

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without NODELAY, Nagle + delayed ACK add ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if self.server.sse:
            headers = {k: _reverse_etags(v) if k.lower() in ("if-match", "if-none-match") else v
                       for k, v in headers.items()}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in range(2):  # the kept-alive upstream connection may have been closed
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(*self.server.upstream, timeout=60)
                self._upstream.connect()
                self._upstream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self._upstream.request(self.command, self.path, body=body or None, headers=headers)
                response = self._upstream.getresponse()
                data = response.read()
                return response.status, response.getheaders(), data
            except (OSError, http.client.HTTPException):
                self._upstream.close()
                self._upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _send_error_xml(self, status: int, code: str) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>injected by the test proxy</Message></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _handle(self) -> None:
        body = self._read_body()
        if self.path == "/__proxy__/stats":
            with self.server.lock:
                data = json.dumps(dict(self.server.counts)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if self.server.latency:
            time.sleep(self.server.latency)  # stand-in for a real object store's first-byte latency
        fault = self.server.pick_fault(self.command, self.path)
        if fault == "deny":
            return self._send_error_xml(403, "AccessDenied")
        if fault == "drop":
            return self._drop()
        if fault == "503":
            return self._send_error_xml(503, "SlowDown")
        if fault == "500":
            return self._send_error_xml(500, "InternalError")
        status, headers, data = self._forward(body)
        if self.server.sse:
            headers, data = _encrypted_view(self.server.sse, self.path, headers, data)
        self.send_response_only(status)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        length = dict((k.lower(), v) for k, v in headers).get("content-length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "corrupt" and data and status == 200:
            flip = len(data) // 2
            data = data[:flip] + bytes([data[flip] ^ 0xFF]) + data[flip + 1 :]
        if fault == "truncate" and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])  # headers promised more: the client sees a cut body
            self.wfile.flush()
            return self._drop()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


_ETAG_HEX = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f-])")  # plain MD5 ETags, not multipart ones
_LIST_ETAG = re.compile(r"(<ETag>(?:&quot;|&#34;|\")?)([0-9a-f]{32})((?:&quot;|&#34;|\")?</ETag>)")
_SSE_HEADERS: dict[str, list[tuple[str, str]]] = {
    "aws:kms": [("x-amz-server-side-encryption", "aws:kms"),
                ("x-amz-server-side-encryption-aws-kms-key-id", "arn:aws:kms:us-east-1:000000000000:key/test")],
    "sse-c": [("x-amz-server-side-encryption-customer-algorithm", "AES256"),
              ("x-amz-server-side-encryption-customer-key-MD5", "dGVzdC1rZXktbWQ1LXZhbHVlLi4=")],
}


def _reverse_etags(value: str) -> str:
    """Each plain MD5 ETag in a header reversed: store -> fake on replies, fake -> store on requests."""
    return _ETAG_HEX.sub(lambda m: m.group(0)[::-1], value)


def _encrypted_view(sse: str, path: str, headers: list[tuple[str, str]],
                    data: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """A reply as an SSE-KMS / SSE-C bucket would send it: encryption headers, ETags that are no MD5."""
    out = [(k, _reverse_etags(v) if k.lower() == "etag" else v) for k, v in headers
           if not k.lower().startswith("x-amz-server-side-encryption")]
    is_object = "/" in path.split("?", 1)[0].strip("/")  # /bucket/key, not a bucket-level listing
    if is_object:
        out += _SSE_HEADERS[sse]
    elif b"<ETag>" in data:
        data = _LIST_ETAG.sub(lambda m: m.group(1) + m.group(2)[::-1] + m.group(3),
                              data.decode("utf-8")).encode("utf-8")
    return out, data


def _proxy_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="s3.py proxy")
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--faults", default=",".join(FAULT_KINDS))
    parser.add_argument("--methods", default="GET,HEAD")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deny", default="")
    parser.add_argument("--only", default="")
    parser.add_argument("--sse", default="", choices=["", *_SSE_HEADERS])
    parser.add_argument("--fail-first", type=int, default=0)
    args = parser.parse_args(argv)
    server = _ProxyServer(
        args.upstream, args.fail_rate, args.latency_ms / 1000.0,
        [f for f in args.faults.split(",") if f], set(args.methods.split(",")), args.seed, args.deny,
        args.only, args.sse, args.fail_first,
    )
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


# ----------------------------------------------------------------------------- pytest fixtures
if "pytest" in sys.modules:  # imported as a plugin; the proxy script must not need pytest
    import pytest

    @pytest.fixture(scope="session")
    def s3_server() -> Iterator[S3Server]:
        """A moto S3 server (own process) on 127.0.0.1 shared by the session; use unique buckets."""
        server = S3Server.start()
        try:
            yield server
        finally:
            server.stop()

    @pytest.fixture
    def s3_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
        """Test credentials in the environment, isolated from any ~/.aws files and endpoint variables."""
        empty = tmp_path_factory.mktemp("aws") / "none"
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                     "PNEUMO_S3_ENDPOINT_URL"):
            monkeypatch.delenv(name, raising=False)
        for name, value in {**TEST_CREDENTIALS, "AWS_CONFIG_FILE": str(empty),
                            "AWS_SHARED_CREDENTIALS_FILE": str(empty)}.items():
            monkeypatch.setenv(name, value)
        return dict(TEST_CREDENTIALS)

    @pytest.fixture
    def fault_proxy(s3_server: S3Server) -> Iterator[Any]:
        """Factory for :class:`FaultProxy` processes in front of ``s3_server``; all stopped afterwards."""
        started: list[FaultProxy] = []

        def start(**kwargs: Any) -> FaultProxy:
            proxy = FaultProxy.start(s3_server.endpoint_url, **kwargs)
            started.append(proxy)
            return proxy

        yield start
        for proxy in started:
            proxy.stop()


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "proxy":
        sys.exit("usage: s3.py proxy --upstream URL [--fail-rate F] [--latency-ms MS] ...")
    _proxy_main(sys.argv[2:])
