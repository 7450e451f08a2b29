"""``pneumo ingest`` and ``pneumo synth s3://...`` end to end against a moto server on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pneumo.cli import main
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
