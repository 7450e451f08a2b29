"""Tests of the generated Kaggle-like dataset: layout, naming, quirks, determinism and a learnable signal."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumo.data.layout import CLASSES, SPLITS, ImageKey, classify
from pneumo.errors import PneumoError
from pneumo.data.synthetic import (
    REAL_COUNTS,
    SynthOutputExists,
    SynthReport,
    generate_dataset,
    split_counts,
)

PNEUMONIA_NAME = re.compile(r"^person(\d+)_(bacteria|virus)_(\d+)\.jpeg$")
NORMAL_NAME = re.compile(r"^(NORMAL2-)?IM-(\d{4})-(\d{4})\.jpeg$")
TINY = 0.01  # 64 images: enough for every quirk, fast on 2 shared cores


def _images(out: Path) -> list[tuple[Path, ImageKey]]:
    found = []
    for path in sorted(out.rglob("*")):
        if path.is_file():
            key = classify(path.relative_to(out).as_posix())
            if isinstance(key, ImageKey):
                found.append((path, key))
    return found


def _all_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthReport]:
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, generate_dataset(out, seed=3, scale=TINY)


def test_split_counts_follow_the_real_dataset() -> None:
    assert split_counts(1.0) == REAL_COUNTS
    assert split_counts(0.05) == {
        "train": {"NORMAL": 67, "PNEUMONIA": 194},  # 67.05, 193.75
        "val": {"NORMAL": 2, "PNEUMONIA": 2},  # 0.4 -> floor of 2
        "test": {"NORMAL": 12, "PNEUMONIA": 20},  # 11.7, 19.5 rounds half up
    }
    assert split_counts(0.5)["val"] == {"NORMAL": 4, "PNEUMONIA": 4}
    # Every split/class exists even at a vanishing scale.
    smallest = split_counts(1e-6)
    assert smallest["train"] == {"NORMAL": 4, "PNEUMONIA": 4}
    assert smallest["val"] == {"NORMAL": 2, "PNEUMONIA": 2}


def test_test_scale_sizes_the_test_split_alone() -> None:
    # The demo's shape: a small train split (fast to train) and a test split that ranks models.
    demo = split_counts(0.08, test_scale=0.4)
    assert demo == {
        "train": {"NORMAL": 107, "PNEUMONIA": 310},  # 107.28, 310.0
        "val": {"NORMAL": 2, "PNEUMONIA": 2},
        "test": {"NORMAL": 94, "PNEUMONIA": 156},  # 93.6, 156.0: Kaggle's 234:390 kept
    }
    assert split_counts(0.08, test_scale=None) == split_counts(0.08)
    assert split_counts(0.08, test_scale=0.08) == split_counts(0.08)
    assert split_counts(0.01, test_scale=1.0)["test"] == REAL_COUNTS["test"]
    assert split_counts(0.5, test_scale=1e-6)["test"] == {"NORMAL": 4, "PNEUMONIA": 4}


def test_files_on_disk_match_the_planned_counts(tiny: tuple[Path, SynthReport]) -> None:
    out, report = tiny
    expected = {
        "train": {"NORMAL": 13, "PNEUMONIA": 39},
        "val": {"NORMAL": 2, "PNEUMONIA": 2},
        "test": {"NORMAL": 4, "PNEUMONIA": 4},
    }
    on_disk: dict[str, dict[str, int]] = {s: {c: 0 for c in CLASSES} for s in SPLITS}
    for _, key in _images(out):
        on_disk[key.split][CLASSES[key.label]] += 1
    assert on_disk == expected
    assert report.counts == expected
    assert report.images == 64
    assert report.root == out / "chest_xray"
    # Only the dataset tree is left behind: no staging folder.
    assert sorted(p.name for p in out.iterdir()) == ["chest_xray"]
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["counts"] == expected and as_dict["out"] == str(out)


def test_kaggle_naming_and_patient_grouping(tiny: tuple[Path, SynthReport]) -> None:
    out, report = tiny
    per_patient: dict[str, list[str]] = defaultdict(list)
    splits_of: dict[str, set[str]] = defaultdict(set)
    subtypes, prefixes = set(), set()
    for path, key in _images(out):
        if key.label == 1:
            match = PNEUMONIA_NAME.match(path.name)
            assert match, path.name
            assert key.patient_id == f"person{match.group(1)}"
            subtypes.add(match.group(2))
        else:
            match = NORMAL_NAME.match(path.name)
            assert match, path.name
            assert key.patient_id == f"{match.group(1) or ''}IM-{match.group(2)}"
            prefixes.add(match.group(1) or "")
        per_patient[key.patient_id].append(path.name)
        splits_of[key.patient_id].add(key.split)
    assert subtypes == {"bacteria", "virus"}
    assert prefixes == {"", "NORMAL2-"}
    sizes = [len(names) for names in per_patient.values()]
    assert max(sizes) >= 2 and max(sizes) <= 4, "several images per patient, at most 4"
    assert len(per_patient) < report.images
    assert report.patients == len(per_patient)
    assert all(len(s) == 1 for s in splits_of.values()), "a patient id must never span two splits"
    # Pneumonia image numbers (_K) are unique across the whole dataset, as in Kaggle.
    numbers = [PNEUMONIA_NAME.match(p.name).group(3) for p, k in _images(out) if k.label == 1]
    assert len(numbers) == len(set(numbers))


def test_quirks_grayscale_rgb_mix_sizes_and_ds_store(tiny: tuple[Path, SynthReport]) -> None:
    out, report = tiny
    modes = defaultdict(int)
    for path, _ in _images(out):
        with Image.open(path) as image:
            assert image.format == "JPEG"
            modes[image.mode] += 1
            width, height = image.size
        assert 48 <= width <= 96
        assert math.floor(0.7 * width) - 1 <= height <= math.ceil(0.9 * width) + 1
    assert set(modes) == {"L", "RGB"}
    assert modes["RGB"] == report.rgb_images
    assert modes["RGB"] < modes["L"] / 5, "RGB files are the exception"
    ds_store = sorted(p.relative_to(out).as_posix() for p in out.rglob(".DS_Store"))
    assert len(ds_store) == report.ds_store_files >= 2
    assert all(classify(p).reason == "hidden-file" for p in ds_store)


def test_real_kind_has_realistic_sizes(tmp_path: Path) -> None:
    report = generate_dataset(tmp_path, seed=1, scale=0.001, image_kind="real")
    assert report.images == 20  # 4+4 train, 2+2 val, 4+4 test
    for path, _ in _images(tmp_path):
        with Image.open(path) as image:
            width, height = image.size
        assert 900 <= width <= 2000
        assert math.floor(0.7 * width) - 1 <= height <= math.ceil(0.9 * width) + 1


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, tiny: tuple[Path, SynthReport]) -> None:
    out, _ = tiny
    again = tmp_path / "again"
    generate_dataset(again, seed=3, scale=TINY)
    first, second = _all_bytes(out), _all_bytes(again)
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)

    other = tmp_path / "other"
    generate_dataset(other, seed=4, scale=TINY)
    third = _all_bytes(other)
    shared = [name for name in first if name in third and name.endswith(".jpeg")]
    assert first.keys() != third.keys() or all(first[n] != third[n] for n in shared)
    assert all(first[n] != third[n] for n in shared), "a shared file name must still hold a new image"


@pytest.mark.parametrize("scale", [0, -0.1, 1.5, float("nan"), float("inf"), "abc"])
def test_bad_scale_is_rejected_before_writing(tmp_path: Path, scale: object) -> None:
    with pytest.raises(ValueError, match="scale must be") as caught:
        generate_dataset(tmp_path / "out", scale=scale)  # type: ignore[arg-type]
    assert isinstance(caught.value, PneumoError)
    assert not (tmp_path / "out").exists()


def test_bad_kind_and_existing_output_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image kind must be one of small, real"):
        generate_dataset(tmp_path, image_kind="huge")  # type: ignore[arg-type]
    keep = tmp_path / "chest_xray" / "train" / "NORMAL" / "mine.jpeg"
    keep.parent.mkdir(parents=True)
    keep.write_bytes(b"user data")
    with pytest.raises(SynthOutputExists, match="already exists"):
        generate_dataset(tmp_path, scale=TINY)
    assert keep.read_bytes() == b"user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest_xray"]


def test_generate_with_test_scale_writes_a_bigger_test_split(tmp_path: Path) -> None:
    plain = generate_dataset(tmp_path / "plain", seed=5, scale=0.001)
    bigger = generate_dataset(tmp_path / "bigger", seed=5, scale=0.001, test_scale=0.05)
    expected_test = {"NORMAL": 12, "PNEUMONIA": 20}
    assert bigger.counts["test"] == expected_test and bigger.test_scale == 0.05
    assert bigger.counts["train"] == plain.counts["train"] == {"NORMAL": 4, "PNEUMONIA": 4}
    assert plain.test_scale is None and bigger.to_dict()["test_scale"] == 0.05
    on_disk = {c: len(list((tmp_path / "bigger/chest_xray/test" / c).glob("*.jpeg"))) for c in CLASSES}
    assert on_disk == expected_test
    # Train and val are planned first, so a bigger test split leaves their file names alone.
    def names(root: Path, split: str) -> list[str]:
        return sorted(p.name for p in (root / "chest_xray" / split).rglob("*.jpeg"))
    for split in ("train", "val"):
        assert names(tmp_path / "plain", split) == names(tmp_path / "bigger", split)


@pytest.mark.parametrize("test_scale", [0, -1, 1.01, float("nan"), "abc"])
def test_bad_test_scale_is_rejected_before_writing(tmp_path: Path, test_scale: object) -> None:
    with pytest.raises(ValueError, match="test_scale must be"):
        generate_dataset(tmp_path / "out", scale=0.01, test_scale=test_scale)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="test_scale must be"):
        split_counts(0.01, test_scale=test_scale)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_progress_reports_every_image(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    report = generate_dataset(tmp_path, seed=0, scale=0.001, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, report.images) for i in range(1, report.images + 1)]


@pytest.fixture(scope="module")
def demo_sized(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The demo's train scale at 24x24 grey: pixels in [0, 1], labels and patient ids."""
    out = tmp_path_factory.mktemp("signal")
    generate_dataset(out, seed=11, scale=0.08)
    pixels, labels, patients = [], [], []
    for path, key in _images(out):
        with Image.open(path) as image:
            small = image.convert("L").resize((24, 24), Image.BILINEAR)
        pixels.append(np.asarray(small, dtype=np.float32) / 255.0)
        labels.append(key.label)
        patients.append(key.patient_id)
    return np.array(pixels), np.array(labels), patients


def _lung_zone() -> np.ndarray:
    """Boolean 24x24 mask over both lung fields (image coordinates in [-1, 1])."""
    grid = np.linspace(-1.0, 1.0, 24)
    ys, xs = np.meshgrid(grid, grid, indexing="ij")
    return (np.abs(xs) > 0.2) & (np.abs(xs) < 0.7) & (ys > -0.55) & (ys < 0.45)


def test_signal_is_learnable_but_not_trivial(demo_sized: tuple[np.ndarray, np.ndarray, list[str]]) -> None:
    """A linear model on 24x24 pixels separates the classes on held-out patients, imperfectly."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    images, y, patients = demo_sized
    x = images.reshape(len(images), -1)
    # Hold out whole patients: a patient's images share anatomy, so an image split would leak.
    unique = sorted(set(patients))
    held = set(np.random.default_rng(0).choice(unique, size=len(unique) // 3, replace=False))
    test = np.array([p in held for p in patients])
    assert 0 < y[test].sum() < test.sum()
    model = LogisticRegression(C=0.1, max_iter=3000).fit(x[~test], y[~test])
    auc = roc_auc_score(y[test], model.predict_proba(x[test])[:, 1])
    assert auc > 0.9, f"held-out AUC {auc:.3f}: the pneumonia signal is too weak for the demo's models"
    assert auc < 0.995, f"held-out AUC {auc:.3f}: the task is trivial for a linear model"


def test_signal_is_local_not_global_brightness_or_one_pixel(
    demo_sized: tuple[np.ndarray, np.ndarray, list[str]],
) -> None:
    """Opacities brighten the lung fields relative to the film; no global or single-pixel shortcut."""
    from sklearn.metrics import roc_auc_score

    images, y, _ = demo_sized
    brightness = images.mean(axis=(1, 2))
    brightness_auc = roc_auc_score(y, brightness)
    assert 0.35 < brightness_auc < 0.65, f"mean brightness alone gives AUC {brightness_auc:.3f}"
    means = [brightness[y == label].mean() for label in (0, 1)]
    assert abs(means[1] - means[0]) < 0.02, f"class mean grey levels {means} differ too much"
    # A simple local statistic (lung fields against the whole film) separates the classes ...
    lung_auc = roc_auc_score(y, images[:, _lung_zone()].mean(axis=1) - brightness)
    assert lung_auc > 0.75, f"lung-field brightness gives AUC {lung_auc:.3f}"
    # ... while no single pixel comes close to giving the label away.
    flat = images.reshape(len(images), -1)
    pixel_aucs = np.array([roc_auc_score(y, flat[:, j]) for j in range(flat.shape[1])])
    best_pixel = float(np.max(np.maximum(pixel_aucs, 1.0 - pixel_aucs)))
    assert best_pixel < 0.88, f"one pixel alone gives AUC {best_pixel:.3f}"


def test_a_patients_films_share_their_disease(demo_sized: tuple[np.ndarray, np.ndarray, list[str]]) -> None:
    """Severity and lesion sites belong to the patient: films of one patient look alike."""
    images, y, patients = demo_sized
    zone = _lung_zone()
    stat = images[:, zone].mean(axis=1) - images.mean(axis=(1, 2))
    sick = np.flatnonzero(y == 1)
    by_patient: dict[str, list[float]] = defaultdict(list)
    for i in sick:
        by_patient[patients[i]].append(float(stat[i]))
    within = np.mean([np.var(v) for v in by_patient.values() if len(v) >= 2])
    assert within < 0.5 * np.var(stat[sick]), "a patient's films vary as much as different patients'"
