"""Readers for the supported data sources. Every input is untrusted: structural problems become a
SanitizeError naming the file and the sample; content checks (label set, duplicates) run in ingest.

Each reader returns a `Raw` train and test split: uint8 images, integer labels, stable string ids,
and the class names when the source carries them.
"""

from __future__ import annotations

import io
import pickle
import re
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from sanitizer.errors import SanitizeError


@dataclass
class Raw:
    x: np.ndarray  # uint8 [N, H, W, C]
    y: np.ndarray  # int64 [N]
    ids: list[str]


@dataclass
class Source:
    train: Raw
    test: Raw
    class_names: Optional[list[str]]
    notes: list[str]  # what the reader did that a user should know (conversions)


# ---------------------------------------------------------------- digits (embedded default)

def read_digits(test_size: float, seed: int) -> Source:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # load_digits pixels are 0..16 ints; scale to the uint8 range every other source uses.
    x = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = digits.target.astype(np.int64)
    ids = np.array([f"digits-{i:04d}" for i in range(len(y))])
    tr, te = train_test_split(np.arange(len(y)), test_size=test_size, random_state=seed, stratify=y)
    tr, te = np.sort(tr), np.sort(te)
    names = [str(c) for c in digits.target_names]
    return Source(Raw(x[tr], y[tr], list(ids[tr])), Raw(x[te], y[te], list(ids[te])), names, [])


# ---------------------------------------------------------------- npz

NPZ_FIX = "save it with numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
# What a damaged zip or .npy header can raise inside numpy and zipfile.
NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, struct.error,
              UnicodeDecodeError, KeyError, TypeError, MemoryError, OverflowError, SyntaxError)


def _check_images(x: np.ndarray, where: str) -> np.ndarray:
    shape_error = SanitizeError(f"{where}: shape {x.shape}, expected N x H x W (gray) or N x H x W x C with C in (1, 3)")
    if x.ndim not in (3, 4):
        raise shape_error
    if x.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1)) if len(x) else []
        if len(bad):
            raise SanitizeError(f"{where}: sample {bad[0]} has NaN or infinite pixels; fix or drop it, then save as uint8")
        raise SanitizeError(
            f"{where}: pixels are {x.dtype}, expected uint8 0..255; convert with (x * 255).round().astype('uint8') "
            "if they are 0..1 floats"
        )
    if x.dtype.kind in "iu" and x.dtype != np.uint8:
        flat = x.reshape(len(x), -1) if len(x) else x
        bad = np.flatnonzero(((flat < 0) | (flat > 255)).any(axis=1)) if len(x) else []
        if len(bad):
            raise SanitizeError(f"{where}: sample {bad[0]} has pixels outside 0..255; pixels must be uint8")
        raise SanitizeError(f"{where}: pixels are {x.dtype}, expected uint8; convert with x.astype('uint8')")
    if x.dtype != np.uint8:
        raise SanitizeError(f"{where}: pixels are {x.dtype}, expected uint8 0..255")
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[-1] not in (1, 3) or min(x.shape[1:3]) < 1:
        raise shape_error
    return x


def _check_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if y.ndim != 1:
        raise SanitizeError(f"{where}: shape {y.shape}, expected one integer label per image")
    if y.dtype.kind not in "iu":
        raise SanitizeError(f"{where}: labels are {y.dtype}, expected integers (class indices)")
    if len(y) != n:
        raise SanitizeError(f"{where}: {len(y)} labels for {n} images; x and y must have the same length")
    return y.astype(np.int64)


def read_npz(path: Path) -> Source:
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise SanitizeError(f"{path}: not found; set data.path to an existing .npz file") from None
    except NPZ_ERRORS as err:
        raise SanitizeError(f"{path}: not a readable .npz file ({type(err).__name__}: {err}); {NPZ_FIX}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise SanitizeError(f"{path}: a single .npy array, not an .npz archive; {NPZ_FIX}")
    with z:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
        if missing:
            raise SanitizeError(f"{path}: missing arrays {missing} (found {sorted(z.files)}); {NPZ_FIX}")
        try:
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
            names = [str(c) for c in z["class_names"]] if "class_names" in z.files else None
        except NPZ_ERRORS as err:
            # allow_pickle=False also lands here for object arrays (e.g. images of mixed shapes).
            raise SanitizeError(f"{path}: an array cannot be read ({err}); images must share one shape, "
                                f"stored as plain uint8 arrays; {NPZ_FIX}") from None
    splits = []
    for split in ("train", "test"):
        x = _check_images(arrays[f"x_{split}"], f"{path}: x_{split}")
        y = _check_labels(arrays[f"y_{split}"], len(x), f"{path}: y_{split}")
        if len(x) == 0:
            raise SanitizeError(f"{path}: x_{split} is empty; the {split} split needs at least one image")
        splits.append(Raw(x, y, [f"{split}-{i:06d}" for i in range(len(x))]))
    if splits[0].x.shape[1:] != splits[1].x.shape[1:]:
        raise SanitizeError(f"{path}: train images are {splits[0].x.shape[1:]} but test images are "
                            f"{splits[1].x.shape[1:]}; both splits need one image shape")
    return Source(splits[0], splits[1], names, [])


# ---------------------------------------------------------------- cifar10 python batches

# The only globals a CIFAR-10 batch needs: numpy's array reconstruction. Anything else (os.system,
# builtins.eval, ...) is refused before it is resolved, so a hostile pickle cannot run code.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 carry array bytes as latin-1 text
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load global {module}.{name}")


def restricted_load(path: Path):
    try:
        data = path.read_bytes()
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, OverflowError, UnicodeDecodeError, ImportError) as err:
        raise SanitizeError(f"{path}: not a valid CIFAR-10 python batch ({type(err).__name__}: {err}); "
                            "use the batches from cifar-10-python.tar.gz unchanged") from None


def _get(d: dict, key: str):
    return d.get(key.encode(), d.get(key))


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = restricted_load(path)
    if not isinstance(d, dict):
        raise SanitizeError(f"{path}: expected a dict with 'data' and 'labels', got {type(d).__name__}")
    data, labels = _get(d, "data"), _get(d, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise SanitizeError(f"{path}: 'data' must be a uint8 array N x 3072 (32x32x3), got {type(data).__name__} {shape}")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        n = len(labels) if isinstance(labels, (list, np.ndarray)) else type(labels).__name__
        raise SanitizeError(f"{path}: {n} labels for {len(data)} images; 'labels' must list one int per image")
    try:
        y = np.asarray(labels)
        if y.dtype.kind not in "iu":
            raise TypeError
    except (TypeError, ValueError):
        raise SanitizeError(f"{path}: 'labels' must be integers") from None
    # CIFAR rows are channel-major: 1024 red, 1024 green, 1024 blue.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), y.astype(np.int64)


def read_cifar10(root: Path) -> Source:
    if not root.is_dir():
        raise SanitizeError(f"{root}: not a directory; set data.path to the extracted cifar-10-batches-py folder")
    train_files = sorted(root.glob("data_batch_*"))
    test_file = root / "test_batch"
    if not train_files or not test_file.is_file():
        raise SanitizeError(f"{root}: expected data_batch_1..5 and test_batch (the cifar-10-batches-py folder)")
    splits = []
    for files in (train_files, [test_file]):
        xs, ys, ids = [], [], []
        for f in files:
            x, y = _read_cifar_batch(f)
            xs.append(x), ys.append(y)
            ids += [f"{f.name}-{i:05d}" for i in range(len(y))]
        splits.append(Raw(np.concatenate(xs), np.concatenate(ys), ids))
    names = None
    if (root / "batches.meta").is_file():
        meta = restricted_load(root / "batches.meta")
        raw_names = _get(meta, "label_names") if isinstance(meta, dict) else None
        if isinstance(raw_names, list) and all(isinstance(n, (bytes, str)) for n in raw_names):
            names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in raw_names]
    return Source(splits[0], splits[1], names, [])


# ---------------------------------------------------------------- imagefolder

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
# Class names become file names, CSV cells and HTML: letters, digits and a few separators only.
CLASS_NAME = re.compile(r"^[^\W_][\w .+-]{0,63}$")


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve(strict=True).relative_to(root)
        return True
    except (ValueError, OSError):
        return False


def open_image(path: Path) -> tuple[np.ndarray, str]:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.verify()  # structure and checksums; the image must be reopened afterwards
            with Image.open(path) as img:
                img.load()  # decodes every pixel: catches truncation that verify() lets through
                mode = img.mode
                if mode in ("1", "L", "LA", "I;16", "I"):
                    arr = np.asarray(img.convert("L"))[..., None] if mode in ("1", "L", "LA") else None
                elif mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
                    arr = np.asarray(img.convert("RGB"))
                else:
                    arr = None
    except Exception as err:  # noqa: BLE001 - image decoders raise many types on hostile files; one meaning
        raise SanitizeError(f"{path}: not a readable PNG/JPEG image ({err}); replace or remove the file") from None
    if arr is None:
        raise SanitizeError(f"{path}: image mode {mode} is not supported; save it as 8-bit grayscale or RGB")
    return arr, mode


def _read_image_split(split_dir: Path, root: Path, class_names: list[str]) -> tuple[list, list, list, list]:
    images, labels, ids, converted = [], [], [], []
    for label, name in enumerate(class_names):
        class_dir = split_dir / name
        if not class_dir.exists():
            continue
        for f in sorted(class_dir.iterdir()):
            rel = f.relative_to(root).as_posix()
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise SanitizeError(f"{class_dir}: a file name is not valid UTF-8 ({rel!r}); rename it") from None
            if f.name.startswith("."):
                continue  # hidden files (.DS_Store, editor swap files) are not samples
            if not _inside(f, root):
                raise SanitizeError(f"{f}: a link leading outside {root}; copy the image into the folder instead")
            if f.is_dir():
                raise SanitizeError(f"{f}: nested folders are not supported; put images directly in {class_dir}")
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                raise SanitizeError(f"{f}: not a .png/.jpg/.jpeg file; remove it or move it out of {root}")
            arr, mode = open_image(f)
            if mode not in ("L", "RGB"):
                converted.append(f"{rel} ({mode})")
            images.append(arr), labels.append(label), ids.append(rel)
    return images, labels, ids, converted


def read_imagefolder(root: Path) -> Source:
    if not root.is_dir():
        raise SanitizeError(f"{root}: not a directory; set data.path to a folder with train/<class>/ and test/<class>/")
    root = root.resolve()
    for split in ("train", "test"):
        if not (root / split).is_dir() or not _inside(root / split, root):
            raise SanitizeError(f"{root}: missing {split}/ folder; expected train/<class>/*.png and test/<class>/*.png")
    class_names = []
    for d in sorted((root / "train").iterdir()):
        if d.name.startswith("."):
            continue
        if not d.is_dir() or not _inside(d, root):
            raise SanitizeError(f"{d}: expected only class folders in {root / 'train'}; move files or links out")
        if not CLASS_NAME.match(d.name):
            raise SanitizeError(f"{d}: class folder name {d.name!r} has characters other than letters, digits, "
                                "space, '.', '_', '+', '-' (or is over 64 characters); rename the folder")
        class_names.append(d.name)
    if len(class_names) < 2:
        raise SanitizeError(f"{root / 'train'}: found {len(class_names)} class folder(s); need at least 2")
    for d in (root / "test").iterdir():
        if not d.name.startswith(".") and d.name not in class_names:
            raise SanitizeError(f"{d}: test class {d.name!r} has no train folder; classes are {class_names}")
    splits, notes = [], []
    for split in ("train", "test"):
        images, labels, ids, converted = _read_image_split(root / split, root, class_names)
        if not images:
            raise SanitizeError(f"{root / split}: no images found; add .png/.jpg files to its class folders")
        if converted:
            notes.append(f"{len(converted)} {split} image(s) converted to 8-bit gray/RGB, e.g. {converted[0]}")
        splits.append((images, labels, ids))
    # Color wins: if any image is RGB, gray images are repeated to three channels.
    channels = max(img.shape[2] for images, _, _ in splits for img in images)
    expected = splits[0][0][0].shape[:2]
    raws = []
    for images, labels, ids in splits:
        for img, sample_id in zip(images, ids):
            if img.shape[:2] != expected:
                raise SanitizeError(
                    f"{root / sample_id}: image is {img.shape[1]}x{img.shape[0]} but {splits[0][2][0]} (the first "
                    f"train image) is {expected[1]}x{expected[0]}; resize it or remove it "
                    "(the pipeline does not resize: resizing could hide or create a trigger)"
                )
        x = np.stack([np.repeat(img, channels // img.shape[2], axis=2) for img in images]).astype(np.uint8)
        raws.append(Raw(x, np.asarray(labels, dtype=np.int64), ids))
    return Source(raws[0], raws[1], class_names, notes)


def read_source(source: str, path: Optional[str], test_size: float, seed: int) -> Source:
    if source == "digits":
        return read_digits(test_size, seed)
    readers = {"npz": read_npz, "cifar10": read_cifar10, "imagefolder": read_imagefolder}
    return readers[source](Path(path))
