"""Storage pieces that need no server: source URIs, unsafe keys, key selection, fingerprints, redaction, local sources."""

from __future__ import annotations

import os
import threading
import unicodedata
from pathlib import Path

import pandas as pd
import pytest

from pneumo.data.storage import (
    LOCK_TIMEOUT_ENV,
    list_images,
    lock_timeout,
    manifest_changes,
    FOLDER_MARKER,
    MANIFEST_COLUMNS,
    UNICODE_DUPLICATE,
    fingerprint,
    materialize,
    parse_source,
    reading,
    redact,
    sync,
    unsafe_reason,
)
from pneumo.data.storage.keys import select
from pneumo.errors import ConfigError, PneumoError, StorageError, TransientStorageError


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


NFC_NAME = _nfc("chest_xray/train/NORMAL/Zoë-IM-0001-0001.jpeg")
NFD_NAME = unicodedata.normalize("NFD", NFC_NAME)
NFD_ONLY = unicodedata.normalize("NFD", "chest_xray/test/PNEUMONIA/Renée_person7_virus_1.jpeg")


@pytest.mark.parametrize(
    ("uri", "bucket", "prefix", "base"),
    [
        ("s3://bkt", "bkt", "", ""),
        ("s3://bkt/", "bkt", "", ""),
        ("s3://bkt/data", "bkt", "data/", "data/"),
        ("s3://bkt/data/", "bkt", "data/", "data/"),
        ("s3://my.bkt-1/a/b/chest_xray", "my.bkt-1", "a/b/chest_xray/", "a/b/"),
        ("s3://bkt/chest_xray/", "bkt", "chest_xray/", ""),
        ("S3://bkt/x", "bkt", "x/", "x/"),
    ],
)
def test_parse_s3_uris(uri: str, bucket: str, prefix: str, base: str) -> None:
    source = parse_source(uri)
    assert (source.scheme, source.bucket, source.prefix, source.base) == ("s3", bucket, prefix, base)


def test_parse_local_sources(tmp_path: Path) -> None:
    assert parse_source(str(tmp_path)).path == tmp_path
    assert parse_source(tmp_path).scheme == "file"
    assert parse_source(f"file://{tmp_path}/a%20b").path == tmp_path / "a b"
    assert parse_source(f"file://localhost{tmp_path}").path == tmp_path


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("gs://bkt/x", "unsupported"),
        ("http://host/x", "unsupported"),
        ("s3://Bad_Bucket/x", "invalid bucket name"),
        ("s3://a/x", "invalid bucket name"),
        ("s3://bkt/x?versionId=1", "query"),
        ("file://otherhost/x", "must be local"),
        ("", "empty"),
    ],
)
def test_bad_uris_fail_with_one_line(uri: str, fragment: str) -> None:
    with pytest.raises(StorageError, match=fragment) as info:
        parse_source(uri)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, PneumoError)


@pytest.mark.parametrize("uri", [
    "s3://AKIAEXAMPLE:supersecretvalue@bkt/x",
    # #25 item 1d: a file:// source's user-info was accepted and echoed ("got host 'u:...@host'").
    "file://AKIAEXAMPLE:supersecretvalue@host/x",
    "file://supersecretvalue@localhost/x",
    "s3://bkt/x?X-Amz-Signature=supersecretvalue",
    "gs://AKIAEXAMPLE:supersecretvalue@bkt/x",
    "AKIAEXAMPLE:supersecretvalue@host://x",
])
def test_uri_with_credentials_is_refused_without_echoing_them(uri: str) -> None:
    with pytest.raises(StorageError, match="credentials|not a dataset source URI") as info:
        parse_source(uri)
    assert "supersecretvalue" not in str(info.value) and "AKIAEXAMPLE" not in str(info.value)


@pytest.mark.parametrize(
    "key",
    [
        "chest_xray/train/NORMAL/../../../../evil.jpeg",
        "../evil.jpeg",
        "/etc/evil.jpeg",
        "chest_xray\\train\\NORMAL\\x.jpeg",
        "chest_xray/train/NORMAL/a\x01b.jpeg",
        "chest_xray/train/NORMAL/%2e%2e%2fevil.jpeg",
        "chest_xray/./train/NORMAL/x.jpeg",
        "chest_xray//train/NORMAL/x.jpeg",
        "chest_xray/train/NORMAL/" + "x" * 300 + ".jpeg",
        "",
    ],
)
def test_unsafe_keys_are_named(key: str) -> None:
    assert unsafe_reason(key)


@pytest.mark.parametrize(
    "key",
    ["chest_xray/train/NORMAL/IM-0001-0001.jpeg", "__MACOSX/chest_xray/._x.jpeg", "a b/ü.jpeg", "x..y.jpeg"],
)
def test_ordinary_keys_are_safe(key: str) -> None:
    assert unsafe_reason(key) is None


def _frame(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"path": p, "split": "train", "label": 0, "patient_id": p, "bytes": b, "etag": m, "md5": m} for p, m, b in rows],
        columns=list(MANIFEST_COLUMNS),
    )


def test_fingerprint_depends_on_content_not_order() -> None:
    rows = [("a.jpeg", "0" * 32, 3), ("b.jpeg", "1" * 32, 4)]
    base = fingerprint(_frame(rows))
    assert fingerprint(_frame(rows[::-1])) == base
    assert fingerprint(_frame([("a.jpeg", "2" * 32, 3), rows[1]])) != base
    assert fingerprint(_frame([("a.jpeg", "0" * 32, 5), rows[1]])) != base
    assert fingerprint(_frame([("c.jpeg", "0" * 32, 3), rows[1]])) != base
    assert fingerprint(_frame(rows[:1])) != base


def test_redact_removes_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    text = redact("failed at http://user:pw@host:9000 with s3cr3t-value-xyz")
    assert "s3cr3t-value-xyz" not in text and "user:pw" not in text and "host:9000" in text


def _write_dataset(root: Path) -> dict[str, bytes]:
    files = {
        "chest_xray/train/NORMAL/IM-0001-0001.jpeg": b"normal-1",
        "chest_xray/train/PNEUMONIA/person1_bacteria_1.jpeg": b"pneumonia-1",
        "chest_xray/test/NORMAL/IM-0002-0001.jpeg": b"normal-2",
        "chest_xray/test/PNEUMONIA/person2_virus_3.jpeg": b"pneumonia-2",
        "chest_xray/train/NORMAL/.DS_Store": b"junk",
        "chest_xray/chest_xray/test/NORMAL/IM-0002-0001.jpeg": b"normal-2",
        "__MACOSX/chest_xray/train/NORMAL/._IM-0001-0001.jpeg": b"fork",
    }
    for relative, body in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(body)
    return files


def test_local_source_manifest_and_report(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_dataset(data)
    result = sync(data, tmp_path / "cache")
    assert list(result.frame.columns) == list(MANIFEST_COLUMNS)
    assert result.frame["path"].tolist() == sorted(result.frame["path"])
    assert len(result.frame) == 4 and result.root == data
    assert result.report.listed == 7
    assert result.report.skipped_by_reason() == {"hidden-file": 1, "nested-duplicate-tree": 1, "macos-metadata": 1}
    assert result.report.counts == {"train": {"NORMAL": 1, "PNEUMONIA": 1}, "test": {"NORMAL": 1, "PNEUMONIA": 1}}
    assert (result.frame["etag"] == result.frame["md5"]).all()
    # Pointing at chest_xray/ itself gives the same dataset.
    inner = sync(data / "chest_xray", None)
    assert inner.fingerprint == result.fingerprint and inner.root == data
    # Content change -> new fingerprint; the memo must not hide it.
    (data / "chest_xray/train/NORMAL/IM-0001-0001.jpeg").write_bytes(b"normal-1-changed")
    assert sync(data, tmp_path / "cache").fingerprint != result.fingerprint


def rewrite_in_place(path: Path, body: bytes) -> None:
    """Overwrite ``path`` with ``body`` of the same size, in place, and put its mtime back: only ctime moves."""
    before = path.stat()
    assert len(body) == before.st_size
    with open(path, "r+b") as handle:
        handle.write(body)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_a_local_file_rewritten_with_its_mtime_put_back_is_hashed_again(tmp_path: Path) -> None:
    # #25 item 14: the MD5 memo, keyed by (size, mtime), kept the old MD5 of a rewritten file.
    data, cache = tmp_path / "data", tmp_path / "cache"
    _write_dataset(data)
    first = sync(data, cache)
    rewrite_in_place(data / "chest_xray/test/NORMAL/IM-0002-0001.jpeg", b"normal-X")
    assert sync(data, cache).fingerprint != first.fingerprint
    with pytest.raises(StorageError, match="IM-0002-0001.jpeg.*MD5"):
        materialize(first.frame, data, cache)


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf"])
def test_a_bad_cache_lock_timeout_is_refused(value: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, value)
    with pytest.raises(ConfigError, match=f"{LOCK_TIMEOUT_ENV} must be a number of seconds"), reading(tmp_path):
        pass
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "2.5")
    assert lock_timeout() == 2.5
    monkeypatch.delenv(LOCK_TIMEOUT_ENV)
    assert lock_timeout() == 1800


def test_local_materialize_detects_changes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_dataset(data)
    result = sync(data, None)
    assert materialize(result.frame, data, None) == data
    target = data / "chest_xray/test/NORMAL/IM-0002-0001.jpeg"
    target.write_bytes(b"normal-X")  # same size, other content
    with pytest.raises(StorageError, match="IM-0002-0001.jpeg.*MD5"):
        materialize(result.frame, data, None)
    target.unlink()
    with pytest.raises(StorageError, match="missing"):
        materialize(result.frame, data, None)


def test_missing_local_folder_and_empty_dataset(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        sync(tmp_path / "nope", None)
    (tmp_path / "empty" / "chest_xray" / "train").mkdir(parents=True)
    with pytest.raises(StorageError, match="no dataset images"):
        sync(tmp_path / "empty", None)


def test_materialize_rejects_unsafe_manifest_paths(tmp_path: Path) -> None:
    frame = _frame([("../../etc/passwd.jpeg", "0" * 32, 1)])
    with pytest.raises(StorageError, match="unsafe"):
        materialize(frame, "s3://bkt/x", tmp_path / "cache")


def test_folder_markers_are_skipped_not_refused() -> None:
    # Issue #14 item 7: the empty "folder/" objects consoles create are not attacks.
    listing = [
        ("data/", 0, ""),  # the prefix's own marker
        ("data/chest_xray/", 0, ""),
        ("data/chest_xray/train/NORMAL/", 0, ""),
        ("data/chest_xray/train/NORMAL/IM-0001-0001.jpeg", 5, "e" * 32),
        ("data/chest_xray/odd/", 3, "f" * 32),  # not empty: no marker, and no file can hold it
        ("data/chest_xray/../", 0, ""),  # marker-shaped, attack-shaped
    ]
    selection = select(listing, "data/")
    assert list(selection.images) == ["chest_xray/train/NORMAL/IM-0001-0001.jpeg"]
    markers = sorted(path for path, reason in selection.skipped if reason == FOLDER_MARKER)
    assert markers == ["./", "chest_xray/", "chest_xray/train/NORMAL/"]
    assert selection.refused == 2
    assert sum(reason.startswith("unsafe-key") for _, reason in selection.skipped) == 2


def test_unicode_spellings_are_one_image() -> None:
    # Issue #14 item 6: NFC and NFD spellings of one name are one image; the NFC one wins.
    assert NFC_NAME != NFD_NAME
    listing = [(NFD_NAME, 3, "a" * 32), (NFC_NAME, 4, "b" * 32), (NFD_ONLY, 5, "c" * 32)]
    for order in (listing, listing[::-1]):  # the winner does not depend on listing order
        selection = select(order, "")
        assert sorted(selection.images) == sorted([NFC_NAME, _nfc(NFD_ONLY)])
        kept = selection.images[NFC_NAME]
        assert (kept.key, kept.etag, kept.info.path) == (NFC_NAME, "b" * 32, NFC_NAME)
        only = selection.images[_nfc(NFD_ONLY)]
        assert only.key == NFD_ONLY and only.info.path == _nfc(NFD_ONLY)  # GET the stored spelling
        assert selection.skipped == [(ascii(NFD_NAME)[1:-1], UNICODE_DUPLICATE)]
        assert selection.refused == 0


def test_local_unicode_spellings_dedupe_and_match_the_nfc_fingerprint(tmp_path: Path) -> None:
    mixed, clean = tmp_path / "mixed", tmp_path / "clean"
    files = {NFC_NAME: b"nfc", NFD_NAME: b"nfd", NFD_ONLY: b"only",
             "chest_xray/test/NORMAL/IM-0002-0001.jpeg": b"plain"}
    for name, body in files.items():
        (mixed / name).parent.mkdir(parents=True, exist_ok=True)
        (mixed / name).write_bytes(body)
    if len(list((mixed / "chest_xray/train/NORMAL").iterdir())) != 2:
        pytest.skip("this file system folds Unicode spellings into one name")
    result = sync(mixed, None)
    assert result.report.skipped_by_reason() == {UNICODE_DUPLICATE: 1}
    assert len(result.frame) == 3
    paths = set(result.frame["path"])
    assert NFC_NAME in paths and NFD_ONLY in paths  # the names the files really have: readable
    assert all((mixed / p).is_file() for p in paths)
    assert materialize(result.frame, mixed, None) == mixed
    # The same images under NFC names only (what the S3 cache holds): the same dataset.
    for name, body in files.items():
        if name != NFD_NAME:
            (clean / _nfc(name)).parent.mkdir(parents=True, exist_ok=True)
            (clean / _nfc(name)).write_bytes(body)
    assert sync(clean, None).fingerprint == result.fingerprint


def test_errors_say_whether_a_retry_can_help() -> None:
    # Issue #14 item 10: the flow retries PneumoErrors whose ``transient`` is True.
    assert PneumoError.transient is False and StorageError("x").transient is False
    error = TransientStorageError("throttled")
    assert isinstance(error, StorageError) and error.transient is True


def test_readers_share_the_cache_lock(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    inside, leave = threading.Event(), threading.Event()

    def other_reader() -> None:
        with reading(cache):
            inside.set()
            leave.wait(10)

    with reading(cache) as root:
        assert root == cache
        thread = threading.Thread(target=other_reader)
        thread.start()
        assert inside.wait(10)  # a second reader is not held off by the first
        leave.set()
        thread.join(10)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.docx").write_bytes(b"precious")
    with pytest.raises(StorageError, match="not a pneumo cache"), reading(tmp_path / "mine"):
        pass


def test_manifest_changes_counts_added_removed_and_changed_per_split_and_class(tmp_path: Path) -> None:
    from pneumo.data.synthetic import generate_dataset

    generate_dataset(tmp_path / "data", seed=2, scale=0.01, image_kind="small")
    before = list_images(tmp_path / "data", tmp_path / "cache")
    assert manifest_changes(before, before) == {}
    folder = tmp_path / "data" / "chest_xray"
    normal = sorted((folder / "train" / "NORMAL").glob("*.jpeg"))
    pneumonia = sorted((folder / "test" / "PNEUMONIA").glob("*.jpeg"))
    (folder / "train" / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(normal[0].read_bytes())  # added
    normal[1].unlink()  # removed
    pneumonia[0].write_bytes(normal[0].read_bytes())  # changed content
    after = list_images(tmp_path / "data", tmp_path / "cache")
    assert manifest_changes(before, after) == {"test": {"PNEUMONIA": {"changed": 1}},
                                               "train": {"NORMAL": {"added": 1, "removed": 1}}}
    assert manifest_changes(after.iloc[:0], after)["train"]["NORMAL"] == {"added": int(
        ((after["split"] == "train") & (after["label"] == 0)).sum())}
