"""``pneumo ingest`` and ``pneumo synth s3://...`` end to end against a moto server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pandas as pd
import pytest

from pneumo.cli import _promotion_test_set, build_parser, main
from pneumo.data.storage import cache_dir, sync
from pneumo.errors import CacheLockTimeout
from tests.plugins.s3 import S3Server

pytestmark = pytest.mark.usefixtures("s3_env")


def test_synth_to_s3_then_ingest_json(s3_server: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3_server.make_bucket()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    monkeypatch.setenv("PNEUMO_HOME", str(tmp_path / "home"))  # default cache lives there
    assert main(["synth", f"s3://{bucket}/seed", "--scale", "0.01", "--json"]) == 0
    synth = json.loads(capsys.readouterr().out)
    assert synth["upload"]["uploaded"] == synth["images"] + synth["ds_store_files"]

    cache, csv = tmp_path / "cache", tmp_path / "manifest.csv"
    assert main(["ingest", f"s3://{bucket}/seed", "--cache", str(cache), "--json", "--csv", str(csv)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == synth["images"] and report["downloaded"] == synth["images"]
    assert report["counts"] == {split: {c: n for c, n in counts.items() if n} for split, counts in synth["counts"].items()}
    assert report["skipped_by_reason"] == {"hidden-file": synth["ds_store_files"]}
    assert len(report["fingerprint"]) == 64 and len(pd.read_csv(csv)) == synth["images"]

    # The same generator output written locally: same fingerprint as the bucket.
    assert main(["synth", str(tmp_path / "local"), "--scale", "0.01"]) == 0
    capsys.readouterr()
    assert main(["ingest", str(tmp_path / "local"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fingerprint"] == report["fingerprint"]
    assert (tmp_path / "home" / "cache").is_dir()

    assert main(["ingest", f"s3://{bucket}/seed", "--cache", str(cache)]) == 0
    text = capsys.readouterr().out
    assert "0 downloaded" in text and report["fingerprint"] in text


def test_ingest_errors_are_one_line(s3_server: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["ingest", "s3://pneumo-missing-bucket/x", "--cache", str(tmp_path / "c"),
                 "--endpoint-url", s3_server.endpoint_url])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("pneumo: error: ") and "pneumo-missing-bucket" in err and s3_server.endpoint_url in err
    assert main(["synth", "out", "--to", "gs://x/y"]) == 2
    assert "unsupported" in capsys.readouterr().err


TEST_SPLIT = {f"chest_xray/test/{label}/{name}.jpeg": name.encode() * 20
              for label, names in (("NORMAL", ("IM-0001-0001", "IM-0002-0001")),
                                   ("PNEUMONIA", ("person1_virus_1", "person2_bacteria_1"))) for name in names}


def _sync_elsewhere(uri: str, cache: Path, endpoint: str) -> BaseException | None:
    """What a sync into ``cache`` from another thread (a retraining starting) raises, or None."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            sync(uri, cache, endpoint_url=endpoint)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    return outcome[0]


def test_promote_holds_the_cache_while_it_reads_the_test_files(s3_server: S3Server, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # #25 item 14: `promote --data CACHE` read the files a chunk at a time without the cache lock.
    bucket, cache = s3_server.make_bucket(), tmp_path / "cache"
    s3_server.put_tree(bucket, TEST_SPLIT)
    uri = f"s3://{bucket}"
    sync(uri, cache, endpoint_url=s3_server.endpoint_url)  # `pneumo ingest` prints this as the dataset folder
    monkeypatch.setenv("PNEUMO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PNEUMO_S3_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("PNEUMO_CACHE_LOCK_TIMEOUT", "0.2")
    for data, held in ((str(cache), cache), (str(cache / "chest_xray"), cache),
                       (uri, cache_dir(tmp_path / "home", uri))):  # a source: synced, then held as the flow does
        args = build_parser().parse_args(["promote", "RUN", "--data", data])
        with _promotion_test_set(args, "RUN", "unused") as test:
            assert sorted(path.name for path in test.images) == sorted(Path(key).name for key in TEST_SPLIT)
            error = _sync_elsewhere(uri, held, s3_server.endpoint_url)
            assert isinstance(error, CacheLockTimeout), (data, error)
        assert _sync_elsewhere(uri, held, s3_server.endpoint_url) is None  # released with the block


@pytest.mark.parametrize("command", [["manifest"], ["train", "cnn", "--epochs", "1", "--data"]])
def test_manifest_and_train_do_not_read_a_cache_while_a_sync_writes_it(command: list[str], s3_server: S3Server,
                                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # `pneumo manifest CACHE` and `pneumo train --data CACHE` read a pneumo cache in place without its lock:
    # a retraining's sync could rewrite the files under them. Now they wait for the writer (here: time out).
    from pneumo.data.storage.cache import _Cache

    bucket, cache = s3_server.make_bucket(), tmp_path / "cache"
    s3_server.put_tree(bucket, TEST_SPLIT)
    sync(f"s3://{bucket}", cache, endpoint_url=s3_server.endpoint_url)
    monkeypatch.setenv("PNEUMO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PNEUMO_CACHE_LOCK_TIMEOUT", "0.2")
    with _Cache.open(cache):  # a sync writing into it
        assert main([*command, str(cache)]) == 2
        assert f"the cache {cache} is still held by" in capsys.readouterr().err
    assert main([*command, str(cache)]) == 2  # the writer is gone: it reads, and says the test-only split is short
    assert "too few images" in capsys.readouterr().err
