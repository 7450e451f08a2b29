"""Manifest rules on a generated dataset with Kaggle's quirks; patient-grouped split; class weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pneumo.data.images import assign_subsets, class_weights, validate_images
from pneumo.data.layout import Ignored, ImageKey, classify, patient_id_of
from pneumo.data.storage import counts_by, sync
from pneumo.data.synthetic import split_counts
from pneumo.errors import DataError, StorageError
from tests.plugins.data import add_quirks, local_manifest


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("chest_xray/train/PNEUMONIA/person12_bacteria_3.jpeg", ("train", 1, "person12")),
        ("chest_xray/test/NORMAL/IM-0031-0001.jpeg", ("test", 0, "IM-0031")),
        ("chest_xray/val/NORMAL/NORMAL2-IM-1427-0001.JPG", ("val", 0, "NORMAL2-IM-1427")),
        ("chest_xray/train/PNEUMONIA/person7_virus_1.PNG", ("train", 1, "person7")),
    ],
)
def test_classify_accepts_dataset_images(path: str, expected: tuple) -> None:
    key = classify(path)
    assert isinstance(key, ImageKey)
    assert (key.split, key.label, key.patient_id) == expected


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("__MACOSX/chest_xray/train/NORMAL/._IM-0001-0001.jpeg", "macos-metadata"),
        ("chest_xray/train/NORMAL/._IM-0001-0001.jpeg", "hidden-file"),
        ("chest_xray/.DS_Store", "hidden-file"),
        ("chest_xray/chest_xray/train/NORMAL/IM-0001-0001.jpeg", "nested-duplicate-tree"),
        ("chest_xray/train/NORMAL/readme.txt", "not-an-image-extension"),
        ("chest_xray/train/COVID/x.jpeg", "outside-layout"),
        ("other/train/NORMAL/IM-0001-0001.jpeg", "outside-layout"),
    ],
)
def test_classify_ignores_quirks_with_a_reason(path: str, reason: str) -> None:
    verdict = classify(path)
    assert isinstance(verdict, Ignored) and verdict.reason == reason


def test_unknown_names_are_their_own_patient() -> None:
    assert patient_id_of("scan_0001") == "scan_0001"


def test_manifest_counts_survive_the_quirks(small_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "quirky"
    shutil.copytree(small_dataset, root)
    added = add_quirks(root)
    ingested = sync(root, None)
    checked = validate_images(root, ingested.frame)
    good = split_counts(0.05)
    good["train"]["NORMAL"] += added["uppercase"]
    expected = {split: dict(counts) for split, counts in good.items()}
    bad = {item.path: item.reason for item in checked.bad}
    for path in bad:  # the bad files sit in the layout: the ingest lists them, validation drops them
        split, label = path.split("/")[1:3]
        expected[split][label] += 1
    assert ingested.report.counts == expected
    skipped = ingested.report.skipped_by_reason()
    assert skipped["nested-duplicate-tree"] == added["nested"]
    assert skipped["macos-metadata"] == 3
    assert skipped["hidden-file"] >= 4  # ._ files and .DS_Store
    assert skipped["not-an-image-extension"] == 1
    assert set(bad) == {
        "chest_xray/train/PNEUMONIA/person9991_bacteria_1.jpeg",
        "chest_xray/train/PNEUMONIA/person9992_virus_1.jpeg",
        "chest_xray/test/NORMAL/IM-9998-0001.jpeg",
    }
    assert "truncated" in bad["chest_xray/train/PNEUMONIA/person9991_bacteria_1.jpeg"]
    assert "empty" in bad["chest_xray/train/PNEUMONIA/person9992_virus_1.jpeg"]
    frame = checked.frame
    assert list(frame.columns)[:5] == ["path", "split", "label", "patient_id", "bytes"]
    assert (frame["width"] > 0).all() and (frame["bytes"] > 0).all()
    assert counts_by(frame, "split") == good


def test_dataset_root_may_be_chest_xray_itself(small_dataset: Path) -> None:
    assert sync(small_dataset / "chest_xray", None).root == small_dataset


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_wrong_layout_is_a_clear_error(tmp_path: Path, make: str) -> None:
    target = tmp_path / "nothing" if make == "missing" else tmp_path
    with pytest.raises(StorageError, match="does not exist|no dataset images"):
        sync(target, None)


def test_layout_without_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "chest_xray" / "train" / "NORMAL").mkdir(parents=True)
    with pytest.raises(StorageError, match="no dataset images"):
        sync(tmp_path, None)


def test_validation_split_is_patient_grouped_and_stratified(small_dataset: Path) -> None:
    frame = assign_subsets(local_manifest(small_dataset), val_fraction=0.2, seed=3)
    train = frame[frame["subset"] == "train"]
    validation = frame[frame["subset"] == "validation"]
    assert not set(train["patient_id"]) & set(validation["patient_id"])
    assert set(frame.loc[frame["split"] == "test", "subset"]) == {"test"}
    # The official val images join the train pool: none is left as its own subset.
    assert set(frame.loc[frame["split"] == "val", "subset"]) <= {"train", "validation"}
    pool = frame[frame["split"] != "test"]
    assert len(validation) / len(pool) == pytest.approx(0.2, abs=0.05)
    assert validation["label"].mean() == pytest.approx(pool["label"].mean(), abs=0.08)
    again = assign_subsets(local_manifest(small_dataset), val_fraction=0.2, seed=3)
    assert again["subset"].tolist() == frame["subset"].tolist()


def test_class_weights_balance_the_train_subset(small_dataset: Path) -> None:
    frame = assign_subsets(local_manifest(small_dataset))
    weights = class_weights(frame)
    counts = frame[frame["subset"] == "train"]["label"].value_counts()
    assert weights[0] * counts[0] == pytest.approx(weights[1] * counts[1])
    assert weights[0] > 1 > weights[1]  # NORMAL is the minority, as in the real data
    with pytest.raises(DataError, match="no NORMAL"):
        class_weights(frame[frame["label"] == 1])
