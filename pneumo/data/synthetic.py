"""Generated stand-in for the Kaggle chest-xray-pneumonia dataset: same layout, naming, quirks, learnable signal."""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pneumo.errors import ConfigError, DataError

ImageKind = Literal["small", "real"]

# Real Kaggle counts; val is the official tiny 8 + 8.
REAL_COUNTS: dict[str, dict[str, int]] = {
    "train": {"NORMAL": 1341, "PNEUMONIA": 3875},
    "val": {"NORMAL": 8, "PNEUMONIA": 8},
    "test": {"NORMAL": 234, "PNEUMONIA": 390},
}
MIN_PER_CLASS = 4  # train/test: every split/class exists and a patient-grouped split still has material
MIN_VAL_PER_CLASS = 2
RGB_FRACTION = 0.05
BACTERIA_FRACTION = 2 / 3
NORMAL2_FRACTION = 0.4
JPEG_QUALITY = 90  # fixed so the bytes depend on the seed only
BASE_WIDTH = 160  # images are drawn at this width, then resized: keeps "real" sizes cheap
SIZE_RANGE: dict[str, tuple[int, int]] = {"small": (48, 96), "real": (900, 2000)}
ASPECT_RANGE = (0.7, 0.9)  # height / width
IMAGES_PER_PATIENT = (1, 2, 3, 4)
IMAGES_PER_PATIENT_P = (0.35, 0.3, 0.2, 0.15)
# Pneumonia severity per patient: most films show clear opacities (the seed's CNNs learn them in
# a few epochs at 48-64 px), a few are barely visible (the hard cases that keep AUC below 1).
STRENGTH = (0.55, 1.0)
FAINT_STRENGTH = (0.15, 0.4)
FAINT_FRACTION = 0.06
BACTERIA_GAIN = 1.2  # lobar consolidation: dense blobs
VIRUS_GAIN = 1.1  # interstitial: patchy, bilateral, fainter per pixel but spread wider
BLOB_SIGMA = (0.14, 0.26)  # consolidation size in body half-widths: several pixels even at 48 px
MEAN_GREY = 0.42  # the detector's automatic windowing brings each film's mean grey near this
# A real .DS_Store starts with this header; content never matters to us, only that it is skipped.
DS_STORE_BYTES = b"\x00\x00\x00\x01Bud1" + bytes(2038)
DS_STORE_DIRS = ("", "train", "train/NORMAL", "test/PNEUMONIA")
_NOISE_TILE = (2048, 2304)  # (h, w) covers the largest "real" image (2000 x 1800) with room to offset

# Stream ids keep every random draw independent of the others and of iteration order.
_PLAN, _PATIENT, _IMAGE, _TILE = 1, 2, 3, 4


class SynthError(DataError):
    """The generated dataset cannot be written as asked."""


class SynthScaleError(ConfigError, ValueError):
    """The scale is outside (0, 1]."""


class SynthKindError(ConfigError, ValueError):
    """The image kind is not one of small | real."""


class SynthOutputExists(SynthError, FileExistsError):
    """The output folder already holds a chest_xray/ tree; we never overwrite a dataset."""


@dataclass
class SynthReport:
    """What :func:`generate_dataset` wrote."""

    out: Path
    root: Path
    seed: int
    scale: float
    test_scale: float | None = field(default=None, kw_only=True)  # None: the test split follows ``scale``
    image_kind: str
    counts: dict[str, dict[str, int]]
    images: int
    rgb_images: int
    patients: int
    ds_store_files: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (paths as strings)."""
        report = asdict(self)  # in field order, counts copied
        report.update(out=str(self.out), root=str(self.root), seconds=round(self.seconds, 3))
        report["images_per_second"] = round(self.images / self.seconds, 1) if self.seconds > 0 else None
        return report


@dataclass(frozen=True)
class _Spec:
    """One image to draw."""

    index: int
    relpath: str
    label: int
    subtype: str  # normal | bacteria | virus
    patient: int  # global patient serial (drives the shared anatomy of a patient's images)
    rgb: bool
    width: int
    height: int


def _check_scale(scale: float, name: str = "scale") -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise SynthScaleError(f"{name} must be a number in (0, 1], got {scale!r}") from None
    if not np.isfinite(value) or value <= 0 or value > 1:
        full = "the full 624-image test split" if name == "test_scale" else "the full 5,856-image dataset"
        raise SynthScaleError(f"{name} must be in (0, 1] (1.0 = {full}), got {scale!r}")
    return value


def split_counts(scale: float, test_scale: float | None = None) -> dict[str, dict[str, int]]:
    """``{split: {class: count}}`` for a scale in (0, 1] (1.0 = the real Kaggle counts).

    ``test_scale`` (``None``: follow ``scale``) sizes the test split alone: a larger one measures
    candidates more tightly without making training longer; it keeps the Kaggle class ratio.
    Raises SynthScaleError (a ValueError) for a scale outside (0, 1].
    """
    scale = _check_scale(scale)
    test_scale = scale if test_scale is None else _check_scale(test_scale, "test_scale")
    counts: dict[str, dict[str, int]] = {}
    for split, by_class in REAL_COUNTS.items():
        counts[split] = {}
        for cls, real in by_class.items():
            scaled = int(real * (test_scale if split == "test" else scale) + 0.5)  # half-up, not banker's rounding
            if split == "val":
                counts[split][cls] = min(real, max(MIN_VAL_PER_CLASS, scaled))
            else:
                counts[split][cls] = max(MIN_PER_CLASS, scaled)
    return counts


def _plan(seed: int, counts: dict[str, dict[str, int]], image_kind: str) -> list[_Spec]:
    """Decide every file name, patient, type, mode and size up front (so the report needs no decoding)."""
    rng = np.random.default_rng([seed, _PLAN])
    lo, hi = SIZE_RANGE[image_kind]
    rows: list[tuple[str, int, str, int]] = []
    person = 0  # personN counter, shared by all splits so ids never repeat across splits
    pneumonia_image = 0  # the _K suffix is a running image number in Kaggle
    normal_ids = {"IM": 0, "NORMAL2-IM": 0}
    patient_serial = 0
    for split, by_class in counts.items():
        for cls, total in by_class.items():
            left = total
            while left > 0:
                n = min(left, int(rng.choice(IMAGES_PER_PATIENT, p=IMAGES_PER_PATIENT_P)))
                left -= n
                patient_serial += 1
                folder = f"chest_xray/{split}/{cls}"
                if cls == "PNEUMONIA":
                    person += int(rng.integers(1, 4))  # gaps like the real ids
                    subtype = "bacteria" if rng.random() < BACTERIA_FRACTION else "virus"
                    for _ in range(n):
                        pneumonia_image += int(rng.integers(1, 3))
                        name = f"person{person}_{subtype}_{pneumonia_image}.jpeg"
                        rows.append((f"{folder}/{name}", 1, subtype, patient_serial))
                else:
                    prefix = "NORMAL2-IM" if rng.random() < NORMAL2_FRACTION else "IM"
                    normal_ids[prefix] += int(rng.integers(1, 4))
                    if normal_ids[prefix] > 9999:
                        raise SynthError("ran out of 4-digit normal patient ids; lower the scale")
                    for k in range(1, n + 1):
                        name = f"{prefix}-{normal_ids[prefix]:04d}-{k:04d}.jpeg"
                        rows.append((f"{folder}/{name}", 0, "normal", patient_serial))
    total = len(rows)
    # A fixed share of RGB files (at least one) so even tiny datasets carry the quirk.
    n_rgb = max(1, int(RGB_FRACTION * total + 0.5))
    rgb = np.zeros(total, dtype=bool)
    rgb[rng.choice(total, size=n_rgb, replace=False)] = True
    widths = rng.integers(lo, hi + 1, size=total)
    aspects = rng.uniform(*ASPECT_RANGE, size=total)
    return [
        _Spec(i, *row, rgb=bool(rgb[i]), width=int(widths[i]), height=max(1, int(round(widths[i] * aspects[i]))))
        for i, row in enumerate(rows)
    ]


def _smooth_noise(rng: np.random.Generator, grid: int, shape: tuple[int, int]) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a small random grid upsampled bicubically."""
    from PIL import Image

    small = rng.random((grid, grid)).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((shape[1], shape[0]), Image.BICUBIC))


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float, soft: float) -> np.ndarray:
    """Soft-edged ellipse mask in [0, 1] (soft = edge width in radius units)."""
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return np.clip((1.0 - r) / soft + 0.5, 0.0, 1.0)


def _draw(spec: _Spec, seed: int, base_h: int, base_w: int) -> np.ndarray:
    """Draw one chest-like radiograph at base resolution, float32 in [0, 1]."""
    pr = np.random.default_rng([seed, _PATIENT, spec.patient])  # same anatomy for a patient's images
    ir = np.random.default_rng([seed, _IMAGE, spec.index])

    # Patient anatomy.
    body_scale = pr.uniform(0.85, 1.05)
    body_level = pr.uniform(0.45, 0.62)
    lung_dark = pr.uniform(0.24, 0.36)
    lung_rx = 0.3 * body_scale * pr.uniform(0.9, 1.1)
    lung_ry = 0.6 * body_scale * pr.uniform(0.9, 1.1)
    rib_freq = pr.uniform(5.5, 7.5)
    rib_curve = pr.uniform(0.7, 1.1)
    heart_size = pr.uniform(0.85, 1.15)

    # Acquisition jitter: position, scale, rotation, exposure.
    cx = pr.normal(0, 0.04) + ir.normal(0, 0.03)
    cy = pr.normal(0, 0.04) + ir.normal(0, 0.03)
    zoom = ir.uniform(0.9, 1.1)
    angle = np.deg2rad(ir.normal(0, 3.0))
    ys, xs = np.mgrid[-1.0 : 1.0 : complex(0, base_h), -1.0 : 1.0 : complex(0, base_w)].astype(np.float32)
    xs, ys = (xs - cx) / zoom, (ys - cy) / zoom
    cos, sin = np.cos(angle), np.sin(angle)
    x = cos * xs + sin * ys
    y = -sin * xs + cos * ys

    body = _ellipse(x, y, 0.0, 0.3, 0.98 * body_scale, 1.45, 0.12)
    img = 0.06 + body_level * body
    spine = np.clip(1.0 - np.abs(x) / 0.08, 0, 1) * body
    img += 0.16 * spine
    # Lungs narrow towards the apex; the x stretch does that without a second shape.
    apex = 0.65 + 0.35 * np.clip((y + 0.75) / 0.9, 0.0, 1.0)
    lung_l, lung_r = (_ellipse(x / apex, y, side * 0.42 * body_scale, -0.02, lung_rx, lung_ry, 0.2) for side in (-1, 1))
    lungs = np.maximum(lung_l, lung_r)
    img -= lung_dark * lungs
    heart = _ellipse(x, y, 0.08 * body_scale, 0.5, 0.34 * heart_size, 0.3 * heart_size, 1.2)
    img += 0.6 * lung_dark * heart * lungs + 0.05 * heart
    # Posterior ribs: bands that rise slightly from the spine and curve down laterally.
    ax = np.abs(x)
    phase = rib_freq * (y + 0.3 * ax - rib_curve * ax**2)
    ribs = (np.cos(np.pi * phase) ** 2) ** 6
    img += 0.07 * ribs * (0.3 + lungs) * body * np.clip((ax - 0.05) / 0.1, 0, 1)
    # Clavicles: two bright oblique bands at the top.
    clav = np.exp(-(((y + 0.78 + 0.12 * ax - 0.15 * ax**2) / 0.035) ** 2)) * np.clip(1 - ax / 0.8, 0, 1)
    img += 0.12 * clav * body

    # Pneumonia: opacities inside the lungs. Severity and where the disease sits belong to the
    # patient (follow-up films show the same lesion); each film adds its own jitter and texture.
    if spec.label == 1:
        low, high = FAINT_STRENGTH if pr.random() < FAINT_FRACTION else STRENGTH
        strength = float(np.clip(pr.uniform(low, high) * ir.uniform(0.85, 1.15), 0.0, 1.2))
        if spec.subtype == "bacteria":
            # Lobar consolidation: one or two dense blobs, usually in a lower or middle zone.
            opacity = np.zeros_like(img)
            for _ in range(int(pr.integers(1, 3))):
                side = -1.0 if pr.random() < 0.5 else 1.0
                bx = side * 0.42 * body_scale + pr.normal(0, 0.06) + ir.normal(0, 0.02)
                by = pr.uniform(-0.25, 0.3) + ir.normal(0, 0.03)
                sigma = pr.uniform(*BLOB_SIGMA) * ir.uniform(0.9, 1.1)
                blob = np.exp(-(((x - bx) ** 2 + ((y - by) / 1.3) ** 2) / (2 * sigma**2)))
                opacity = np.maximum(opacity, blob)
            texture = 0.6 + 0.8 * _smooth_noise(ir, 10, img.shape)
            raw = BACTERIA_GAIN * strength * opacity * texture * lungs
        else:
            # Viral: bilateral patchy interstitial opacities, denser near the hila.
            patches = np.clip((_smooth_noise(pr, 7, img.shape) - 0.3) / 0.7, 0, None)
            reticular = _smooth_noise(ir, 22, img.shape)
            hilar = np.exp(-((np.abs(x) - 0.2) ** 2) / 0.08)
            raw = VIRUS_GAIN * strength * (patches + 0.15 * reticular) * (0.55 + 0.45 * hilar) * lungs
        # Soft saturation: dense consolidation fills the air space up to soft-tissue level, not bone-white.
        cap = 1.6 * lung_dark
        img += cap * (1.0 - np.exp(-raw / cap))
    elif ir.random() < 0.3:
        # Benign look-alikes on some normals: an ECG lead, a faint haze, soft-tissue shadows.
        kind = int(ir.integers(0, 3))
        if kind == 0:
            lx, ly = ir.uniform(-0.7, 0.7), ir.uniform(-0.6, 0.6)
            img += 0.5 * _ellipse(x, y, lx, ly, 0.035, 0.035, 0.4)
        elif kind == 1:
            img += ir.uniform(0.03, 0.07) * lungs
        else:
            img += ir.uniform(0.04, 0.09) * np.clip((y - 0.1) / 0.4, 0, 1) * lungs

    # Exposure: gain, offset, gamma; then the detector's automatic windowing, which brings every
    # film to a similar mean grey (so overall brightness says little about the lungs); then
    # quantum noise at base resolution.
    img = np.clip(img * ir.uniform(0.85, 1.15) + ir.normal(0, 0.04), 0.0, 1.0)
    img = img ** ir.uniform(0.8, 1.25)
    img += ir.normal(MEAN_GREY, 0.03) - float(img.mean())
    img += ir.normal(0, ir.uniform(0.01, 0.035), size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def _encode(spec: _Spec, seed: int, tile: np.ndarray) -> bytes:
    """Draw, resize to the target size, add fine grain and encode one JPEG."""
    from PIL import Image

    base_h = max(8, int(round(BASE_WIDTH * spec.height / spec.width)))
    pixels = (_draw(spec, seed, base_h, BASE_WIDTH) * 255.0 + 0.5).astype(np.uint8)
    big = np.asarray(Image.fromarray(pixels, mode="L").resize((spec.width, spec.height), Image.BILINEAR))
    # Fine grain from a shared pre-drawn tile at a per-image offset: drawing fresh noise for a
    # 2000 px image costs more than the rest of the pipeline.
    offsets = np.random.default_rng([seed, _TILE, spec.index]).integers(0, 1 << 30, size=2)
    oy = int(offsets[0]) % (tile.shape[0] - spec.height + 1)
    ox = int(offsets[1]) % (tile.shape[1] - spec.width + 1)
    grain = tile[oy : oy + spec.height, ox : ox + spec.width]
    out = np.clip(big.astype(np.int16) + grain, 0, 255).astype(np.uint8)
    image = Image.fromarray(out, mode="L")
    if spec.rgb:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def generate_dataset(
    out: Path,
    seed: int = 0,
    scale: float = 0.05,
    image_kind: ImageKind = "small",
    progress: Callable[[int, int], None] | None = None,
    *,
    test_scale: float | None = None,
) -> SynthReport:
    """Write a generated chest X-ray dataset in the Kaggle layout under ``out/chest_xray/``.

    The same seed, scales and kind give byte-identical files; ``scale`` 1.0 writes 5,856 images,
    ``test_scale`` sizes the test split alone (see :func:`split_counts`). ``image_kind`` "small" is
    48-96 px wide (for tests), "real" 900-2000 px. ``progress(done, total)`` is called after each image.
    The tree is written to a hidden sibling folder and renamed into place at the end, so an
    interrupted run never leaves a half dataset that looks complete.
    Raises SynthScaleError / SynthKindError (ValueErrors) for a bad scale or kind, and
    SynthOutputExists when ``out/chest_xray`` already exists.
    """
    started = time.perf_counter()
    scale = _check_scale(scale)
    if test_scale is not None:
        test_scale = _check_scale(test_scale, "test_scale")
    if image_kind not in SIZE_RANGE:
        raise SynthKindError(f"image kind must be one of {', '.join(SIZE_RANGE)}, got {image_kind!r}")
    seed = int(seed)
    if seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed}")
    out = Path(out)
    root = out / "chest_xray"
    if root.exists():
        raise SynthOutputExists(f"{root} already exists; remove it or choose another output folder")
    counts = split_counts(scale, test_scale)
    specs = _plan(seed, counts, image_kind)
    tile = np.random.default_rng([seed, _TILE]).integers(-4, 5, size=_NOISE_TILE, dtype=np.int8).astype(np.int16)

    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".chest_xray.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)  # our own leftover from a crashed run with the same pid
    try:
        for done, spec in enumerate(specs, start=1):
            path = staging / spec.relpath.removeprefix("chest_xray/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_encode(spec, seed, tile))
            if progress is not None:
                progress(done, len(specs))
        for folder in DS_STORE_DIRS:
            (staging / folder / ".DS_Store").write_bytes(DS_STORE_BYTES)
        staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    return SynthReport(
        out=out, root=root, seed=seed, scale=scale, test_scale=test_scale, image_kind=image_kind, counts=counts,
        images=len(specs), rgb_images=sum(spec.rgb for spec in specs), patients=len({spec.patient for spec in specs}),
        ds_store_files=len(DS_STORE_DIRS), seconds=time.perf_counter() - started,
    )
