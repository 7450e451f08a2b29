"""Generated datasets for tests: one small shared dataset, and a helper that adds Kaggle's quirks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from pneumo.data.synthetic import generate_dataset


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated Kaggle-layout dataset at scale 0.05 with small images (read-only for tests)."""
    root = tmp_path_factory.mktemp("small-dataset")
    generate_dataset(root, seed=0, scale=0.05, image_kind="small")
    return root


def add_quirks(root: Path) -> dict[str, int]:
    """Add the real zip's clutter and some broken files; returns how many of each were added.

    Quirk copies (nested tree, __MACOSX, ._ files) must be ignored; broken files in the layout
    must be reported as bad images.
    """
    tree = root / "chest_xray"
    images = sorted(tree.glob("train/PNEUMONIA/*.jpeg"))
    nested = tree / "chest_xray"
    shutil.copytree(tree / "test", nested / "test")
    macosx = root / "__MACOSX" / "chest_xray" / "train" / "NORMAL"
    macosx.mkdir(parents=True)
    for image in images[:3]:
        (macosx / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07")
        (image.parent / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07")
    (tree / "test" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    # Uppercase extensions are real images and must count.
    upper = tree / "train" / "NORMAL" / "IM-9999-0001.JPEG"
    shutil.copy(next(tree.glob("train/NORMAL/*.jpeg")), upper)
    # Broken files inside the layout: truncated JPEG, zero bytes, text named .jpeg.
    truncated = tree / "train" / "PNEUMONIA" / "person9991_bacteria_1.jpeg"
    truncated.write_bytes(images[0].read_bytes()[: images[0].stat().st_size // 2])
    (tree / "train" / "PNEUMONIA" / "person9992_virus_1.jpeg").write_bytes(b"")
    (tree / "test" / "NORMAL" / "IM-9998-0001.jpeg").write_text("this is not an image\n")
    (tree / "train" / "NORMAL" / "notes.txt").write_text("not an image either\n")
    return {"nested": len(list(nested.rglob("*.jpeg"))), "uppercase": 1, "bad": 3}


def local_manifest(root: Path) -> pd.DataFrame:
    """The manifest of a local dataset folder, as the ingest produces it for the flow."""
    from pneumo.data.storage import sync

    return sync(root, None).frame
