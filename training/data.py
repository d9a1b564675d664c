"""Data sets: scikit-learn's bundled digits, a user's image folder, or a user's CSV table.

Everything is loaded into memory as float32 arrays: these are small data sets, and in-memory
tensors make epochs reproducible to the bit (the shuffle is a seeded permutation, not a worker
pool). Each loader also returns a `DataInfo`, the facts an exported model needs to turn a raw
input into what it was trained on (layout, colour mode, value range, resize, normalisation).
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of the training split, applied as (x - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class DataInfo:
    """What a model's input is, so export and serving can reproduce the preprocessing."""

    source: str  # "digits", "image_folder" or "csv"
    label_names: tuple[str, ...]
    input_shape: tuple[int, ...]  # per example, no batch axis
    layout: str  # "NCHW" for images, "NC" for tables
    value_range: tuple[float, float]  # of the raw input, before normalisation
    normalization: Normalization
    color_mode: str | None = None  # "L" or "RGB" for images
    resize: str | None = None  # Pillow resampling filter used to reach input_shape
    feature_names: tuple[str, ...] = ()
    ink: str | None = None  # "high" when strokes are large values (digits), "low" for dark ink

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DataInfo:
        norm = raw["normalization"]
        return cls(
            **{
                **raw,
                "label_names": tuple(raw["label_names"]),
                "input_shape": tuple(raw["input_shape"]),
                "value_range": tuple(raw["value_range"]),
                "feature_names": tuple(raw.get("feature_names", ())),
                "normalization": Normalization(tuple(norm["mean"]), tuple(norm["std"])),
            }
        )


@dataclass
class Dataset:
    """Raw inputs (float32, un-normalised) and integer labels, with their description."""

    x: np.ndarray
    y: np.ndarray
    label_names: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Split:
    """A stratified train/val split with the training split's normalisation."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    info: DataInfo


def load_digits() -> Dataset:
    """scikit-learn's 1,797 handwritten 8×8 digits: shipped inside the package, no download."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = bunch.images.astype(np.float32)[:, None, :, :]  # (N, 1, 8, 8), values 0..16
    y = bunch.target.astype(np.int64)
    names = tuple(str(t) for t in bunch.target_names)
    return Dataset(x, y, names, {"source": "digits", "value_range": (0.0, 16.0), "ink": "high"})


def load_image_folder(
    root: str | Path, image_size: int = 32, color_mode: str = "L", resize: str = "bilinear"
) -> Dataset:
    """Read `root/<class>/<image>` with Pillow: one subfolder per class, sorted by name."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist or is not a folder")
    if color_mode not in ("L", "RGB"):
        raise DataError(f"color mode must be 'L' or 'RGB', not {color_mode!r}")
    resample = _resample_filter(resize)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"image folder {str(root)!r} needs at least two class subfolders")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for path in files:
            try:
                with Image.open(path) as raw:
                    img = raw.convert(color_mode).resize((image_size, image_size), resample)
                    arr = np.asarray(img, dtype=np.float32)
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"cannot read image {str(path)!r}: {exc}") from exc
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise DataError(f"image folder {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    meta = {"source": "image_folder", "value_range": (0.0, 255.0), "color_mode": color_mode}
    meta |= {"resize": resize, "ink": None}
    return Dataset(np.stack(images), np.asarray(labels, dtype=np.int64), tuple(classes), meta)


def load_csv(path: str | Path, label_column: str = "label") -> Dataset:
    """A table with a header row: numeric feature columns and one label column (any values)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSV file {str(path)!r} does not exist")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 2:
        raise DataError(f"CSV file {str(path)!r} needs a header row and at least one data row")
    header, body = rows[0], rows[1:]
    if label_column not in header:
        raise DataError(f"CSV file {str(path)!r} has no column {label_column!r}; it has {header}")
    label_at = header.index(label_column)
    features = [h for i, h in enumerate(header) if i != label_at]
    x = np.empty((len(body), len(features)), dtype=np.float32)
    raw_labels = []
    for r, row in enumerate(body):
        if len(row) != len(header):
            raise DataError(f"{path}: line {r + 2} has {len(row)} fields, expected {len(header)}")
        values = [v for i, v in enumerate(row) if i != label_at]
        try:
            x[r] = [float(v) for v in values]
        except ValueError as exc:
            raise DataError(f"{path}: line {r + 2} has a non-numeric feature: {exc}") from None
        raw_labels.append(row[label_at])
    if not np.isfinite(x).all():
        raise DataError(f"{path}: features must be finite numbers (found NaN or infinity)")
    names = tuple(sorted(set(raw_labels), key=_natural_key))
    index = {name: i for i, name in enumerate(names)}
    y = np.asarray([index[v] for v in raw_labels], dtype=np.int64)
    value_range = (float(x.min()), float(x.max())) if len(x) else (0.0, 0.0)
    meta = {"source": "csv", "value_range": value_range, "feature_names": tuple(features)}
    return Dataset(x, y, names, meta)


def load_source(source: str, image_size: int = 32, color_mode: str = "L") -> Dataset:
    """`digits`, a folder of class subfolders, or a `.csv` file."""
    if source == "digits":
        return load_digits()
    path = Path(source)
    if path.suffix.lower() == ".csv":
        return load_csv(path)
    if path.is_dir():
        return load_image_folder(path, image_size, color_mode)
    raise DataError(
        f"data source {source!r} is neither 'digits', an existing folder, nor a .csv file"
    )


def stratified_split(
    y: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (train, val): each class gives round(val_fraction·count) examples to val.

    A seeded `numpy.random.Generator` makes the split a pure function of (labels, fraction,
    seed), so a resumed or repeated run sees exactly the same examples.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"validation fraction must be between 0 and 1, not {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        members = members[rng.permutation(len(members))]
        if len(members) < 2:
            raise DataError(f"class {label} has one example; a stratified split needs two")
        n_val = min(max(1, round(val_fraction * len(members))), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def channel_normalization(x: np.ndarray) -> Normalization:
    """Mean and std per channel (axis 1) over every other axis, from the training split only."""
    axes = tuple(i for i in range(x.ndim) if i != 1)
    mean = x.astype(np.float64).mean(axis=axes)
    std = x.astype(np.float64).std(axis=axes)
    std = np.where(std > 1e-12, std, 1.0)  # a constant feature is centred, not blown up
    return Normalization(tuple(float(m) for m in mean), tuple(float(s) for s in std))


def normalize(x: np.ndarray, norm: Normalization) -> np.ndarray:
    shape = (1, len(norm.mean)) + (1,) * (x.ndim - 2)
    mean = np.asarray(norm.mean, dtype=np.float32).reshape(shape)
    std = np.asarray(norm.std, dtype=np.float32).reshape(shape)
    return ((x - mean) / std).astype(np.float32)


def make_split(data: Dataset, val_fraction: float, seed: int) -> Split:
    """Split, then normalise both parts with statistics of the training part alone."""
    train_idx, val_idx = stratified_split(data.y, val_fraction, seed)
    norm = channel_normalization(data.x[train_idx])
    is_image = data.x.ndim == 4
    info = DataInfo(
        source=data.meta["source"],
        label_names=data.label_names,
        input_shape=tuple(int(d) for d in data.x.shape[1:]),
        layout="NCHW" if is_image else "NC",
        value_range=tuple(float(v) for v in data.meta["value_range"]),
        normalization=norm,
        color_mode=data.meta.get("color_mode", "L" if is_image else None),
        resize=data.meta.get("resize"),
        feature_names=tuple(data.meta.get("feature_names", ())),
        ink=data.meta.get("ink"),
    )
    return Split(
        normalize(data.x[train_idx], norm),
        data.y[train_idx],
        normalize(data.x[val_idx], norm),
        data.y[val_idx],
        info,
    )


def _resample_filter(name: str) -> int:
    from PIL import Image

    filters = {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "lanczos": Image.Resampling.LANCZOS,
        "box": Image.Resampling.BOX,
    }
    if name not in filters:
        raise DataError(f"resize method must be one of {', '.join(filters)}, not {name!r}")
    return filters[name]


def _natural_key(text: str) -> tuple[int, float | str]:
    """Sort numeric labels by value ("2" before "10") and the rest alphabetically."""
    try:
        value = float(text)
    except ValueError:
        return (1, text)
    return (0, value) if math.isfinite(value) else (1, text)
