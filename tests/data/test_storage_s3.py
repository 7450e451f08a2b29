"""Sync, materialize and upload against a real moto S3 server over HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pneumo.data.storage.ingest
from pneumo.errors import CacheLockTimeout, StorageError, TransientStorageError
from pneumo.data.storage import (
    FOLDER_MARKER,
    META_DIR,
    UNICODE_DUPLICATE,
    materialize,
    materialized,
    reading,
    sync,
    upload_tree,
)
from tests.data.test_storage_unit import rewrite_in_place
from tests.plugins.s3 import ALL_FAULT_KINDS, S3Server, free_port

pytestmark = pytest.mark.usefixtures("s3_env")

IMAGES: dict[str, bytes] = {
    "chest_xray/train/NORMAL/IM-0001-0001.jpeg": b"n1" * 50,
    "chest_xray/train/NORMAL/IM-0001-0002.jpeg": b"n2" * 60,
    "chest_xray/train/NORMAL/NORMAL2-IM-0003-0001.jpeg": b"n3" * 70,
    "chest_xray/train/PNEUMONIA/person1_bacteria_1.jpeg": b"p1" * 80,
    "chest_xray/train/PNEUMONIA/person1_bacteria_2.jpeg": b"p2" * 90,
    "chest_xray/train/PNEUMONIA/person2_virus_1.jpeg": b"p3" * 40,
    "chest_xray/val/NORMAL/IM-0100-0001.jpeg": b"v1" * 30,
    "chest_xray/val/PNEUMONIA/person9_virus_1.jpeg": b"v2" * 30,
    "chest_xray/test/NORMAL/IM-0200-0001.jpeg": b"t1" * 45,
    "chest_xray/test/PNEUMONIA/person20_bacteria_4.jpeg": b"t2" * 55,
}
QUIRKS: dict[str, tuple[bytes, str]] = {
    "__MACOSX/chest_xray/train/NORMAL/._IM-0001-0001.jpeg": (b"fork", "macos-metadata"),
    "chest_xray/train/NORMAL/._IM-0001-0001.jpeg": (b"fork", "hidden-file"),
    "chest_xray/.DS_Store": (b"ds", "hidden-file"),
    "chest_xray/chest_xray/train/NORMAL/IM-0001-0001.jpeg": (b"n1" * 50, "nested-duplicate-tree"),
    "chest_xray/train/NORMAL/notes.txt": (b"txt", "not-an-image-extension"),
    "chest_xray/extra/NORMAL/IM-0009-0001.jpeg": (b"x", "outside-layout"),
}
TRAVERSAL_KEYS: list[str] = [
    "chest_xray/train/NORMAL/../../../../evil.jpeg",
    "../evil.jpeg",
    "/evil.jpeg",
    "chest_xray\\..\\..\\evil.jpeg",
    "chest_xray/train/NORMAL/%2e%2e%2f%2e%2e%2fevil.jpeg",
    "chest_xray/train/NORMAL/a\x01b.jpeg",
    "chest_xray//train/NORMAL/double-slash.jpeg",
]


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` outside our metadata folder, as {relative posix path: bytes}."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and META_DIR not in p.relative_to(root).parts
    }


def _bucket_with(s3_server: S3Server, files: dict[str, bytes], prefix: str = "") -> str:
    bucket = s3_server.make_bucket()
    s3_server.put_tree(bucket, files, prefix)
    return bucket


def test_pagination_over_1000_objects_and_upload_tree(s3_server: S3Server, tmp_path: Path) -> None:
    # ListObjectsV2 returns at most 1,000 keys per page: 2,011 keys (1,010 images in one folder,
    # 1,001 quirk files) take three pages.
    local = tmp_path / "local"
    expected: dict[str, bytes] = {}
    for i in range(1010):
        relative = f"chest_xray/train/NORMAL/IM-{i:04d}-0001.jpeg"
        expected[relative] = f"object {i}".encode()
        (local / relative).parent.mkdir(parents=True, exist_ok=True)
        (local / relative).write_bytes(expected[relative])
    (local / "__MACOSX").mkdir()
    for i in range(1001):
        (local / "__MACOSX" / f"._IM-{i:04d}-0001.jpeg").write_bytes(b"")
    bucket = s3_server.make_bucket()
    upload = upload_tree(local, f"s3://{bucket}/ds", endpoint_url=s3_server.endpoint_url)
    assert (upload.uploaded, upload.unchanged) == (2011, 0)
    again = upload_tree(local, f"s3://{bucket}/ds", endpoint_url=s3_server.endpoint_url)
    assert (again.uploaded, again.unchanged, again.bytes_uploaded) == (0, 2011, 0)

    result = sync(f"s3://{bucket}/ds", tmp_path / "cache", endpoint_url=s3_server.endpoint_url)
    assert result.report.listed == 2011 and len(result.frame) == 1010
    assert result.report.skipped_by_reason() == {"macos-metadata": 1001}
    assert _tree(tmp_path / "cache") == expected
    assert result.report.counts == {"train": {"NORMAL": 1010}}
    # The same files read as a local folder: same manifest, same fingerprint.
    local_result = sync(local, None)
    assert local_result.fingerprint == result.fingerprint
    assert local_result.frame.equals(result.frame)
    assert local_result.report.skipped == result.report.skipped


def test_incremental_sync(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = _bucket_with(s3_server, IMAGES, prefix="data/")
    client = s3_server.client()
    uri, cache = f"s3://{bucket}/data", tmp_path / "cache"
    progress: list[tuple[int, int]] = []

    first = sync(uri, cache, endpoint_url=s3_server.endpoint_url, progress=lambda d, t: progress.append((d, t)))
    assert (first.report.downloaded, first.report.reused, first.report.removed) == (10, 0, 0)
    assert first.report.bytes_downloaded == sum(len(b) for b in IMAGES.values())
    assert _tree(cache) == IMAGES and first.root == cache
    assert progress[-1] == (10, 10)
    assert set(first.frame["etag"]) == {hashlib.md5(b).hexdigest() for b in IMAGES.values()}

    second = sync(uri, cache, endpoint_url=s3_server.endpoint_url)
    assert (second.report.downloaded, second.report.bytes_downloaded, second.report.reused) == (0, 0, 10)
    assert second.fingerprint == first.fingerprint and second.frame.equals(first.frame)

    # Rewriting an object with the same bytes is not a content change.
    changed_key = "chest_xray/train/NORMAL/IM-0001-0002.jpeg"
    client.put_object(Bucket=bucket, Key="data/" + changed_key, Body=IMAGES[changed_key])
    same = sync(uri, cache, endpoint_url=s3_server.endpoint_url)
    assert same.report.downloaded == 0 and same.fingerprint == first.fingerprint

    client.put_object(Bucket=bucket, Key="data/" + changed_key, Body=b"new content")
    changed = sync(uri, cache, endpoint_url=s3_server.endpoint_url)
    assert (changed.report.downloaded, changed.report.bytes_downloaded) == (1, len(b"new content"))
    assert (cache / changed_key).read_bytes() == b"new content"
    assert changed.fingerprint != first.fingerprint

    deleted_key = "chest_xray/test/PNEUMONIA/person20_bacteria_4.jpeg"
    client.delete_object(Bucket=bucket, Key="data/" + deleted_key)
    after_delete = sync(uri, cache, endpoint_url=s3_server.endpoint_url)
    assert after_delete.report.removed == 1 and after_delete.report.downloaded == 0
    assert deleted_key not in set(after_delete.frame["path"]) and not (cache / deleted_key).exists()
    assert not (cache / "chest_xray/test/PNEUMONIA").exists()  # emptied folders go too
    assert after_delete.fingerprint != changed.fingerprint
    assert after_delete.report.counts["test"] == {"NORMAL": 1}

    # A cached file edited locally is no longer trusted.
    tampered = cache / "chest_xray/val/NORMAL/IM-0100-0001.jpeg"
    tampered.write_bytes(b"tampered")
    repaired = sync(uri, cache, endpoint_url=s3_server.endpoint_url)
    assert repaired.report.downloaded == 1 and tampered.read_bytes() == IMAGES["chest_xray/val/NORMAL/IM-0100-0001.jpeg"]
    assert repaired.fingerprint == after_delete.fingerprint
    # A stray file in the cache is not part of the dataset.
    (cache / "chest_xray/train/NORMAL/IM-7777-0001.jpeg").write_bytes(b"stray")
    swept = sync(uri, cache, endpoint_url=s3_server.endpoint_url)
    assert swept.report.removed == 1 and not (cache / "chest_xray/train/NORMAL/IM-7777-0001.jpeg").exists()


def test_quirk_keys_ignored_and_counted(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = _bucket_with(s3_server, {**IMAGES, **{k: v for k, (v, _) in QUIRKS.items()}})
    result = sync(f"s3://{bucket}", tmp_path / "cache", endpoint_url=s3_server.endpoint_url)
    expected_reasons: dict[str, int] = {}
    for _, reason in QUIRKS.values():
        expected_reasons[reason] = expected_reasons.get(reason, 0) + 1
    assert result.report.skipped_by_reason() == expected_reasons
    assert result.report.listed == len(IMAGES) + len(QUIRKS)
    assert len(result.frame) == len(IMAGES)
    assert _tree(tmp_path / "cache") == IMAGES  # nothing but the images was downloaded
    report = result.report.to_dict()
    assert report["skipped"] == len(QUIRKS) and {i["path"] for i in report["skipped_files"]} == set(QUIRKS)
    # Pointing at the chest_xray/ prefix itself gives the same dataset.
    inner = sync(f"s3://{bucket}/chest_xray", tmp_path / "cache2", endpoint_url=s3_server.endpoint_url)
    assert inner.fingerprint == result.fingerprint


def test_traversal_keys_refused_nothing_written_outside(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = _bucket_with(s3_server, {**IMAGES, **{k: b"evil" for k in TRAVERSAL_KEYS}})
    listed = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert set(TRAVERSAL_KEYS) <= listed  # the server really holds them
    cache = tmp_path / "deep" / "er" / "cache"
    before = {p for p in tmp_path.rglob("*")}
    result = sync(f"s3://{bucket}", cache, endpoint_url=s3_server.endpoint_url)
    assert result.report.refused == len(TRAVERSAL_KEYS)
    reasons = [reason for _, reason in result.report.skipped if reason.startswith("unsafe-key")]
    assert len(reasons) == len(TRAVERSAL_KEYS)
    created_outside = {p for p in tmp_path.rglob("*") if not p.is_relative_to(cache)} - before
    assert created_outside == {tmp_path / "deep", tmp_path / "deep" / "er"}
    assert _tree(cache) == IMAGES
    assert not any(b"evil" == p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


def test_symlink_planted_in_cache_cannot_redirect_writes(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = _bucket_with(s3_server, IMAGES)
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    sync(f"s3://{bucket}", cache, endpoint_url=s3_server.endpoint_url)
    outside.mkdir()
    shutil.rmtree(cache / "chest_xray" / "test")
    (cache / "chest_xray" / "test").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StorageError, match="symlink"):
        sync(f"s3://{bucket}", cache, endpoint_url=s3_server.endpoint_url)
    assert list(outside.rglob("*")) == []


def test_faults_are_retried_and_files_byte_identical(s3_server: S3Server, fault_proxy: Any, tmp_path: Path) -> None:
    files = {
        f"chest_xray/train/{'NORMAL' if i % 3 else 'PNEUMONIA'}/"
        f"{f'IM-{i:04d}-0001' if i % 3 else f'person{i}_bacteria_1'}.jpeg": os.urandom(2000 + 37 * i)
        for i in range(100)
    }
    bucket = _bucket_with(s3_server, files)
    # 20% of GETs fail: botocore allows 8 attempts per request, so a request fails for good with
    # odds of about 0.2**8; the seeded draws give every fault kind several times.
    proxy = fault_proxy(fail_rate=0.2, seed=7, faults=ALL_FAULT_KINDS)
    result = sync(f"s3://{bucket}", tmp_path / "cache", endpoint_url=proxy.endpoint_url, workers=8)
    assert _tree(tmp_path / "cache") == files
    assert len(result.frame) == 100 and result.report.downloaded == 100
    stats = proxy.stats()
    for kind in ALL_FAULT_KINDS:  # every fault kind really happened
        assert stats.get(kind, 0) >= 2, stats
    assert not list((tmp_path / "cache" / META_DIR / "tmp").iterdir())


def test_permanent_errors_fail_fast_with_names(s3_server: S3Server, fault_proxy: Any, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "pneumo-secret-value-should-never-show"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with pytest.raises(StorageError) as missing:
        sync("s3://no-such-bucket-pneumo/data", tmp_path / "c1", endpoint_url=s3_server.endpoint_url)
    message = str(missing.value)
    assert "no-such-bucket-pneumo" in message and s3_server.endpoint_url in message and "NoSuchBucket" in message

    bucket = _bucket_with(s3_server, IMAGES)
    denied_key = "chest_xray/train/PNEUMONIA/person1_bacteria_2.jpeg"
    proxy = fault_proxy(deny="person1_bacteria_2")
    with pytest.raises(StorageError) as denied:
        sync(f"s3://{bucket}", tmp_path / "c2", endpoint_url=proxy.endpoint_url)
    message = str(denied.value)
    assert bucket in message and denied_key in message and proxy.endpoint_url in message and "AccessDenied" in message
    assert proxy.stats()["denied"] == 1  # permanent: not retried
    assert not (tmp_path / "c2" / denied_key).exists()
    # Files finished before the failure are kept and trusted: once access is back, only the rest moves.
    finished = _tree(tmp_path / "c2")
    assert all(IMAGES[path] == body for path, body in finished.items())
    retry = sync(f"s3://{bucket}", tmp_path / "c2", endpoint_url=s3_server.endpoint_url)
    assert retry.report.reused == len(finished) and retry.report.downloaded == len(IMAGES) - len(finished)

    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError) as unreachable:  # a TCP check up front: no retry backoff
        sync(f"s3://{bucket}/x", tmp_path / "c3", endpoint_url=closed)
    assert closed in str(unreachable.value) and "cannot reach" in str(unreachable.value)
    for error in (missing.value, denied.value, unreachable.value):
        assert "\n" not in str(error) and secret not in str(error)


def test_report_holds_no_credentials(s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPNEUMOTESTKEYID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "pneumo-secret-value-should-never-show")
    bucket = _bucket_with(s3_server, IMAGES)
    caplog.set_level("DEBUG", logger="pneumo")
    result = sync(f"s3://{bucket}", tmp_path / "cache", endpoint_url=s3_server.endpoint_url)
    text = json.dumps(result.report.to_dict()) + caplog.text
    assert "AKIAPNEUMOTESTKEYID" not in text and "pneumo-secret-value" not in text
    assert result.report.endpoint == s3_server.endpoint_url


def test_endpoint_from_environment(s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = _bucket_with(s3_server, IMAGES)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)  # boto3 honours it itself
    assert len(sync(f"s3://{bucket}", tmp_path / "a").frame) == len(IMAGES)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("PNEUMO_S3_ENDPOINT_URL", s3_server.endpoint_url)  # pneumo.config.Settings
    assert len(sync(f"s3://{bucket}", tmp_path / "b").frame) == len(IMAGES)


def test_cache_folder_that_is_not_ours_is_refused(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = _bucket_with(s3_server, IMAGES)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.docx").write_bytes(b"precious")
    with pytest.raises(StorageError, match="not a pneumo cache"):
        sync(f"s3://{bucket}", tmp_path / "mine", endpoint_url=s3_server.endpoint_url)
    assert (tmp_path / "mine" / "thesis.docx").read_bytes() == b"precious"


def test_materialize_pinned_keys(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = _bucket_with(s3_server, IMAGES)
    uri = f"s3://{bucket}"
    pinned = sync(uri, tmp_path / "ingest", endpoint_url=s3_server.endpoint_url).frame
    subset = pinned[pinned["split"] == "train"]
    root = materialize(subset, uri, tmp_path / "worker", endpoint_url=s3_server.endpoint_url)
    assert _tree(root) == {p: IMAGES[p] for p in subset["path"]}
    # Second call on a warm cache downloads nothing: prove it by making the server unusable.
    assert materialize(subset, uri, tmp_path / "worker", endpoint_url=f"http://127.0.0.1:{free_port()}") == root

    changed_key = "chest_xray/test/NORMAL/IM-0200-0001.jpeg"
    s3_server.client().put_object(Bucket=bucket, Key=changed_key, Body=b"changed after ingest")
    with pytest.raises(StorageError, match=f"{bucket}/{changed_key}.*changed since the dataset was ingested"):
        materialize(pinned, uri, tmp_path / "worker2", endpoint_url=s3_server.endpoint_url)
    assert not (tmp_path / "worker2" / changed_key).exists()
    deleted_key = "chest_xray/val/NORMAL/IM-0100-0001.jpeg"
    s3_server.client().delete_object(Bucket=bucket, Key=deleted_key)
    with pytest.raises(StorageError, match=f"{deleted_key}.*deleted"):
        materialize(pinned[pinned["path"] == deleted_key], uri, tmp_path / "worker3",
                    endpoint_url=s3_server.endpoint_url)


def test_multipart_etag_fingerprint_matches_local(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = s3_server.make_bucket()
    client = s3_server.client()
    key = "chest_xray/train/NORMAL/IM-0500-0001.jpeg"
    part1, part2 = os.urandom(5 * 1024 * 1024), os.urandom(1000)  # S3's minimum part size is 5 MiB
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)
    parts = []
    for number, body in enumerate((part1, part2), start=1):
        etag = client.upload_part(Bucket=bucket, Key=key, PartNumber=number, UploadId=upload["UploadId"], Body=body)["ETag"]
        parts.append({"ETag": etag, "PartNumber": number})
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                     MultipartUpload={"Parts": parts})
    other = "chest_xray/test/PNEUMONIA/person3_virus_1.jpeg"
    client.put_object(Bucket=bucket, Key=other, Body=b"small")

    result = sync(f"s3://{bucket}", tmp_path / "cache", endpoint_url=s3_server.endpoint_url)
    row = result.frame.set_index("path").loc[key]
    assert row["etag"].endswith("-2") and row["md5"] == hashlib.md5(part1 + part2).hexdigest()
    local = tmp_path / "local"
    shutil.copytree(tmp_path / "cache" / "chest_xray", local / "chest_xray")
    assert sync(local, None).fingerprint == result.fingerprint
    assert sync(f"s3://{bucket}", tmp_path / "cache", endpoint_url=s3_server.endpoint_url).fingerprint == result.fingerprint
    assert materialize(result.frame, f"s3://{bucket}", tmp_path / "w", endpoint_url=s3_server.endpoint_url)


_KILLABLE = """
import sys
from pneumo.data.storage import sync
sync(sys.argv[1], sys.argv[2], endpoint_url=sys.argv[3], workers=2)
"""


def test_interrupted_sync_then_rerun_completes(s3_server: S3Server, fault_proxy: Any, tmp_path: Path) -> None:
    files = {f"chest_xray/train/NORMAL/IM-{i:04d}-0001.jpeg": os.urandom(3000 + i) for i in range(80)}
    bucket = _bucket_with(s3_server, files)
    slow = fault_proxy(latency_ms=40)  # ~20 objects/s with 2 workers: time to kill it mid-way
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = subprocess.Popen([sys.executable, "-c", _KILLABLE, f"s3://{bucket}", str(cache), slow.endpoint_url],
                               env=env, stderr=subprocess.PIPE)
    journal = cache / META_DIR / "journal.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    assert process.poll() is None, f"sync finished or died before it could be killed: {process.stderr.read()!r}"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)

    partial = _tree(cache)
    assert 10 <= len(partial) < len(files)
    assert all(files[path] == body for path, body in partial.items())  # every final name is complete
    # Simulate a half-written file at a final name (e.g. copied in by hand): never trusted.
    not_done = sorted(set(files) - set(partial))[0]
    (cache / not_done).parent.mkdir(parents=True, exist_ok=True)
    (cache / not_done).write_bytes(files[not_done][:100])

    rerun = sync(f"s3://{bucket}", cache, endpoint_url=s3_server.endpoint_url)
    assert _tree(cache) == files
    assert rerun.report.reused >= 10 and rerun.report.downloaded == len(files) - rerun.report.reused
    assert not list((cache / META_DIR / "tmp").iterdir())
    again = sync(f"s3://{bucket}", cache, endpoint_url=s3_server.endpoint_url)
    assert again.report.downloaded == 0 and again.fingerprint == rerun.fingerprint


# ----------------------------------------------------------------------------- issue #14
def _multipart(client: Any, bucket: str, key: str, parts: tuple[bytes, ...], **checksum: str) -> None:
    upload = client.create_multipart_upload(Bucket=bucket, Key=key, **checksum)
    done = []
    for number, body in enumerate(parts, start=1):
        extra = {"ChecksumAlgorithm": checksum["ChecksumAlgorithm"]} if checksum else {}
        reply = client.upload_part(Bucket=bucket, Key=key, PartNumber=number, UploadId=upload["UploadId"],
                                   Body=body, **extra)
        done.append({"PartNumber": number, **{k: v for k, v in reply.items()
                                               if k == "ETag" or (k.startswith("Checksum") and k != "ChecksumType")}})
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                     MultipartUpload={"Parts": done})


@pytest.mark.parametrize("sse", ["aws:kms", "sse-c"])
def test_encrypted_objects_are_verified_by_checksum_not_etag(s3_server: S3Server, fault_proxy: Any,
                                                             tmp_path: Path, sse: str) -> None:
    # Item 5: an SSE-KMS / SSE-C object's 32-hex ETag is no MD5. moto returns the MD5 whatever the
    # encryption, so the proxy plays an encrypted bucket (headers, non-MD5 ETags); the objects hold
    # the CRC32 that boto3's default client stores with every upload.
    bucket = _bucket_with(s3_server, IMAGES)
    uri, proxy = f"s3://{bucket}", fault_proxy(sse=sse)
    result = sync(uri, tmp_path / "cache", endpoint_url=proxy.endpoint_url)
    assert _tree(tmp_path / "cache") == IMAGES
    md5s = {hashlib.md5(body).hexdigest() for body in IMAGES.values()}
    assert set(result.frame["md5"]) == md5s and not set(result.frame["etag"]) & md5s
    assert result.report.size_only == 0  # every body was proven by the stored CRC32
    # Workers pin the (non-MD5) ETags with If-Match and check the content MD5 column.
    root = materialize(result.frame, uri, tmp_path / "worker", endpoint_url=proxy.endpoint_url)
    assert _tree(root) == IMAGES

    corrupted = "chest_xray/train/PNEUMONIA/person1_bacteria_2.jpeg"
    flips = fault_proxy(sse=sse, faults=("corrupt",), fail_rate=1.0, only=corrupted)
    with pytest.raises(StorageError, match="does not match the store's checksum") as info:
        sync(uri, tmp_path / "cache2", endpoint_url=flips.endpoint_url)
    assert corrupted in str(info.value) and not info.value.transient  # the same bytes every time
    assert flips.stats()["corrupt"] == 6  # our body attempts, then a clear failure
    assert not (tmp_path / "cache2" / corrupted).exists()


def test_encrypted_objects_without_a_checksum_are_checked_by_size(s3_server: S3Server, fault_proxy: Any,
                                                                   tmp_path: Path) -> None:
    local = tmp_path / "local"
    for relative, body in IMAGES.items():
        (local / relative).parent.mkdir(parents=True, exist_ok=True)
        (local / relative).write_bytes(body)
    bucket = s3_server.make_bucket()
    upload_tree(local, f"s3://{bucket}", endpoint_url=s3_server.endpoint_url)  # Content-MD5 only, no CRC
    proxy = fault_proxy(sse="aws:kms")
    result = sync(f"s3://{bucket}", tmp_path / "cache", endpoint_url=proxy.endpoint_url)
    assert _tree(tmp_path / "cache") == IMAGES
    assert result.report.size_only == len(IMAGES) and result.report.to_dict()["size_only"] == len(IMAGES)
    assert sync(local, None).fingerprint == result.fingerprint


def test_multipart_objects_verified_by_full_object_checksum(s3_server: S3Server, fault_proxy: Any,
                                                            tmp_path: Path) -> None:
    bucket, client = s3_server.make_bucket(), s3_server.client()
    full, composite = "chest_xray/train/NORMAL/IM-0600-0001.jpeg", "chest_xray/test/NORMAL/IM-0601-0001.jpeg"
    parts = (os.urandom(5 * 1024 * 1024), os.urandom(1000))
    _multipart(client, bucket, full, parts, ChecksumAlgorithm="CRC32", ChecksumType="FULL_OBJECT")
    _multipart(client, bucket, composite, parts, ChecksumAlgorithm="CRC32")  # per-part CRCs only
    result = sync(f"s3://{bucket}", tmp_path / "cache", endpoint_url=s3_server.endpoint_url)
    assert _tree(tmp_path / "cache") == {full: b"".join(parts), composite: b"".join(parts)}
    assert result.report.size_only == 1  # the composite one: "<crc>-2" is no content checksum

    flips = fault_proxy(faults=("corrupt",), fail_rate=1.0, only=full)
    with pytest.raises(StorageError, match="does not match the store's checksum"):
        sync(f"s3://{bucket}", tmp_path / "cache2", endpoint_url=flips.endpoint_url)
    assert not (tmp_path / "cache2" / full).exists()


NFC_KEY = unicodedata.normalize("NFC", "chest_xray/train/NORMAL/Zoë-IM-0700-0001.jpeg")
NFD_KEY = unicodedata.normalize("NFD", NFC_KEY)
NFD_ONLY_KEY = unicodedata.normalize("NFD", "chest_xray/test/PNEUMONIA/Renée_person70_virus_1.jpeg")


def test_unicode_spellings_are_one_image_and_materialize_finds_them(s3_server: S3Server, tmp_path: Path) -> None:
    # Item 6: macOS-origin uploads hold NFD names; the same name in NFC is the same image.
    bucket = _bucket_with(s3_server, {**IMAGES, NFC_KEY: b"nfc spelling", NFD_KEY: b"nfd spelling",
                                      NFD_ONLY_KEY: b"nfd only"})
    uri = f"s3://{bucket}"
    result = sync(uri, tmp_path / "cache", endpoint_url=s3_server.endpoint_url)
    nfd_only_path = unicodedata.normalize("NFC", NFD_ONLY_KEY)
    expected = {**IMAGES, NFC_KEY: b"nfc spelling", nfd_only_path: b"nfd only"}
    assert _tree(tmp_path / "cache") == expected
    assert set(result.frame["path"]) == set(expected)  # NFC paths only
    assert result.report.skipped_by_reason() == {UNICODE_DUPLICATE: 1} and result.report.refused == 0
    # A worker's cache: the NFC manifest path is fetched from the NFD key the bucket holds.
    root = materialize(result.frame, uri, tmp_path / "worker", endpoint_url=s3_server.endpoint_url)
    assert _tree(root) == expected
    again = sync(uri, tmp_path / "cache", endpoint_url=s3_server.endpoint_url)
    assert again.report.downloaded == 0 and again.fingerprint == result.fingerprint


def test_folder_markers_are_reported_as_such(s3_server: S3Server, tmp_path: Path) -> None:
    # Item 7: console-made "folder/" objects are neither images nor attacks.
    markers = ["data/", "data/chest_xray/", "data/chest_xray/train/", "data/chest_xray/train/NORMAL/"]
    bucket = _bucket_with(s3_server, {**{f"data/{k}": v for k, v in IMAGES.items()}, **{m: b"" for m in markers}})
    result = sync(f"s3://{bucket}/data", tmp_path / "cache", endpoint_url=s3_server.endpoint_url)
    assert result.report.refused == 0
    assert result.report.skipped_by_reason() == {FOLDER_MARKER: len(markers)}
    assert _tree(tmp_path / "cache") == IMAGES


def test_transient_failures_are_told_apart_from_permanent_ones(s3_server: S3Server, fault_proxy: Any,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Item 10: what botocore's retries could not get through is a TransientStorageError (the flow
    # retries it); what no retry fixes stays a plain StorageError.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore's own knob: keeps this test to seconds
    bucket = _bucket_with(s3_server, IMAGES)
    uri = f"s3://{bucket}"

    overloaded = fault_proxy(faults=("503",), fail_rate=1.0)
    with pytest.raises(TransientStorageError, match="SlowDown.*still failing after retries") as listing:
        sync(uri, tmp_path / "c1", endpoint_url=overloaded.endpoint_url)
    assert listing.value.transient and overloaded.stats()["503"] == 2  # AWS_MAX_ATTEMPTS honoured

    key = "chest_xray/val/NORMAL/IM-0100-0001.jpeg"
    for kind in ("503", "drop", "truncate"):
        flaky = fault_proxy(faults=(kind,), fail_rate=1.0, only=key)
        with pytest.raises(TransientStorageError, match=key):
            sync(uri, tmp_path / f"c-{kind}", endpoint_url=flaky.endpoint_url)

    with pytest.raises(StorageError, match="NoSuchBucket") as missing:
        sync("s3://no-such-bucket-pneumo/data", tmp_path / "c2", endpoint_url=s3_server.endpoint_url)
    assert not missing.value.transient and not isinstance(missing.value, TransientStorageError)
    with pytest.raises(TransientStorageError, match="cannot reach"):  # refused: a server restarting
        sync(uri, tmp_path / "c3", endpoint_url=f"http://127.0.0.1:{free_port()}")


class _LockWaits(logging.Handler):
    """Who started waiting for a cache lock: storage logs it (with ``extra``) before it polls again.

    Deterministic: a waiter is seen when it reports that it waits, not guessed from elapsed time.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, bool]] = []
        self.messages: list[str] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "cache_lock"):
            with self.changed:
                self.seen.append((record.cache_lock, record.exclusive))
                self.messages.append(record.getMessage())
                self.changed.notify_all()

    def wait(self, lock_file: Path, kind: str, alive: Callable[[], bool], timeout: float = 15.0) -> None:
        """Return once someone waits for a ``kind`` ("WRITE" or "READ") lock on ``lock_file`` (each wait counts once)."""
        wanted = (str(lock_file), kind == "WRITE")
        deadline = time.monotonic() + timeout
        with self.changed:
            while wanted not in self.seen:
                assert alive(), "the other thread finished instead of waiting for the lock"
                assert time.monotonic() < deadline, f"nobody waited for a {kind} lock on {lock_file}"
                self.changed.wait(0.05)
            self.seen.remove(wanted)


@pytest.fixture
def lock_waits() -> Iterator[_LockWaits]:
    handler, logger = _LockWaits(), logging.getLogger("pneumo.data.storage")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


needs_flock = pytest.mark.skipif(sys.platform == "win32", reason="the cache lock is POSIX flock")


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@needs_flock
def test_a_reader_holds_off_sync_and_a_sync_holds_off_readers(s3_server: S3Server, tmp_path: Path,
                                                              lock_waits: _LockWaits) -> None:
    # Item 11: `pneumo promote` syncing into the cache a training run is reading.
    bucket, cache = _bucket_with(s3_server, IMAGES), tmp_path / "cache"
    uri, lock = f"s3://{bucket}", cache / META_DIR / "lock"
    sync(uri, cache, endpoint_url=s3_server.endpoint_url)
    key = "chest_xray/train/NORMAL/IM-0001-0001.jpeg"
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"new version")

    with reading(cache):
        writer, outcome = _in_thread(lambda: sync(uri, cache, endpoint_url=s3_server.endpoint_url))
        lock_waits.wait(lock, "WRITE", writer.is_alive)
        assert (cache / key).read_bytes() == IMAGES[key]  # the reader still sees what it started with
    writer.join(30)
    assert "error" not in outcome and outcome["value"].report.downloaded == 1
    assert (cache / key).read_bytes() == b"new version"

    s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"third version")
    in_sync, resume, seen = threading.Event(), threading.Event(), threading.Event()

    def pause(done: int, total: int) -> None:  # called inside sync's exclusive lock
        if not in_sync.is_set():
            in_sync.set()
            assert resume.wait(30)

    writer, outcome = _in_thread(lambda: sync(uri, cache, endpoint_url=s3_server.endpoint_url, progress=pause))
    assert in_sync.wait(30)

    def read() -> bytes:
        with reading(cache):
            seen.set()
            return (cache / key).read_bytes()

    reader, read_outcome = _in_thread(read)
    lock_waits.wait(lock, "READ", reader.is_alive)
    assert not seen.is_set()
    resume.set()
    writer.join(30), reader.join(30)
    assert "error" not in outcome and read_outcome["value"] == b"third version"  # after the sync, whole


@needs_flock
def test_materialized_holds_the_pinned_files_while_they_are_read(s3_server: S3Server, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                lock_waits: _LockWaits) -> None:
    bucket, cache = _bucket_with(s3_server, IMAGES), tmp_path / "cache"
    uri = f"s3://{bucket}"
    pinned = sync(uri, cache, endpoint_url=s3_server.endpoint_url).frame
    key = "chest_xray/test/NORMAL/IM-0200-0001.jpeg"
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"changed after the ingest")

    with materialized(pinned, uri, cache, endpoint_url=s3_server.endpoint_url) as root:
        # A second holder of the warm cache only takes the shared lock: it enters at once, and
        # needs no server (it would block forever if it queued for the exclusive lock).
        def second_holder() -> dict[str, bytes]:
            with materialized(pinned, uri, cache, endpoint_url=f"http://127.0.0.1:{free_port()}") as again:
                return _tree(again)

        holder, held = _in_thread(second_holder)
        holder.join(30)
        assert held.get("value") == IMAGES, held
        writer, outcome = _in_thread(lambda: sync(uri, cache, endpoint_url=s3_server.endpoint_url))
        lock_waits.wait(cache / META_DIR / "lock", "WRITE", writer.is_alive)
        assert _tree(root) == IMAGES  # exactly the pinned bytes, for as long as the block runs
        with pytest.raises(StorageError, match="holds it for reading"):  # would wait for itself
            sync(uri, cache, endpoint_url=s3_server.endpoint_url)
    writer.join(30)
    assert "error" not in outcome and (cache / key).read_bytes() == b"changed after the ingest"
    with (pytest.raises(StorageError, match="changed since the dataset was ingested"),
          materialized(pinned, uri, cache, endpoint_url=s3_server.endpoint_url)):
        pass

    # A writer slipping in between the download and the shared lock is caught by the re-check.
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=IMAGES[key])
    repinned = sync(uri, cache, endpoint_url=s3_server.endpoint_url).frame
    real, calls, worker = pneumo.data.storage.ingest.materialize, [], tmp_path / "worker"

    def materialize_then_touch(*args: Any, **kwargs: Any) -> Path:
        root = real(*args, **kwargs)
        calls.append(root)
        if len(calls) == 1:  # rewritten in place, same size, mtime put back: not what the state vouches for
            rewrite_in_place(root / key, b"X" * len(IMAGES[key]))
        return root

    monkeypatch.setattr(pneumo.data.storage.ingest, "materialize", materialize_then_touch)
    with materialized(repinned, uri, worker, endpoint_url=s3_server.endpoint_url) as root:
        assert root == worker and _tree(root) == IMAGES
    assert len(calls) == 2  # cold cache: fetched; touched by "someone": checked again, fetched again


def test_a_file_rewritten_in_place_with_its_mtime_put_back_is_not_trusted(s3_server: S3Server, tmp_path: Path) -> None:
    # #25 item 14: same size, same mtime, other bytes was trusted; only the kernel's ctime tells, then the MD5.
    bucket, cache = _bucket_with(s3_server, IMAGES), tmp_path / "cache"
    uri, key = f"s3://{bucket}", "chest_xray/test/NORMAL/IM-0200-0001.jpeg"
    first = sync(uri, cache, endpoint_url=s3_server.endpoint_url)
    rewrite_in_place(cache / key, b"X" * len(IMAGES[key]))
    again = sync(uri, cache, endpoint_url=s3_server.endpoint_url)
    assert again.report.downloaded == 1 and (cache / key).read_bytes() == IMAGES[key]
    assert again.fingerprint == first.fingerprint

    # Touched but unchanged, or vouched for by a state file of older code (no ctime): hashed, still trusted.
    os.utime(cache / key, ns=(1, 1))
    state_file = cache / META_DIR / "state.json"
    state = json.loads(state_file.read_text())
    for item in state["objects"].values():
        del item["ctime_ns"], item["ino"]
    state_file.write_text(json.dumps(state))
    kept = sync(uri, cache, endpoint_url=s3_server.endpoint_url)
    assert (kept.report.downloaded, kept.report.reused) == (0, len(IMAGES))
    assert all(item["ctime_ns"] for item in json.loads(state_file.read_text())["objects"].values())  # cheap next time


_HOLD_FOR_READING = """
import sys
from pneumo.data.storage import reading
with reading(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)
"""


@needs_flock
def test_the_cache_lock_gives_up_after_its_timeout_naming_the_holder(s3_server: S3Server, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     lock_waits: _LockWaits) -> None:
    # #25 item 14: `pneumo promote` waited for ever behind a training holding the cache for reading.
    bucket, cache = _bucket_with(s3_server, IMAGES), tmp_path / "cache"
    uri, lock = f"s3://{bucket}", cache / META_DIR / "lock"
    sync(uri, cache, endpoint_url=s3_server.endpoint_url)
    monkeypatch.setenv("PNEUMO_CACHE_LOCK_TIMEOUT", "0.3")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_FOR_READING, str(cache)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(CacheLockTimeout, match=f"held by pid {holder.pid} on .*, reading since .* after 0.3 s") as info:
            sync(uri, cache, endpoint_url=s3_server.endpoint_url)
        assert info.value.transient and "PNEUMO_CACHE_LOCK_TIMEOUT" in str(info.value)
        lock_waits.wait(lock, "WRITE", lambda: True)  # and it said so, naming the holder, while it waited
        assert f"pid {holder.pid} " in lock_waits.messages[-1] and "giving up after 0.3 s" in lock_waits.messages[-1]
    finally:
        holder.kill()
        holder.wait(30)
    stale = [p for p in (cache / META_DIR / "holders").glob("*.json") if p.name.startswith(f"{holder.pid}-")]
    assert stale  # SIGKILL: the kernel released the lock, the holder's note stayed behind

    # A reader behind a sync gives up too, naming the sync (this process), not the killed holder.
    in_sync, resume = threading.Event(), threading.Event()

    def pause(done: int, total: int) -> None:  # called inside sync's exclusive lock
        if not in_sync.is_set():
            in_sync.set()
            assert resume.wait(30)

    writer, outcome = _in_thread(lambda: sync(uri, cache, endpoint_url=s3_server.endpoint_url, progress=pause))
    try:
        assert in_sync.wait(30)
        with pytest.raises(CacheLockTimeout, match=f"held by pid {os.getpid()} on .*, updating since") as info, reading(cache):
            pass
        assert f"pid {holder.pid} " not in str(info.value) and not any(p.exists() for p in stale)
    finally:
        resume.set()
        writer.join(30)
    assert "error" not in outcome
    with reading(cache):  # free again: taken at once
        assert not list((cache / META_DIR / "holders").glob(f"{holder.pid}-*"))
