"""Readers for the supported data sources. Every input is untrusted: structural problems become a
SanitizeError naming the file and the sample; content checks (label set, duplicates) run in ingest.

Each reader returns a `Raw` train and test split: uint8 images, integer labels, stable string ids,
and the class names when the source carries them.
"""

from __future__ import annotations

import io
import os
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

from sanitizer.config import AdvancedLimits
from sanitizer.errors import SanitizeError
from sanitizer.untrusted import Limits, check_count, check_decoded, open_regular, read_regular, regular_file

DEFAULT_LIMITS = AdvancedLimits()
FILE_LIMIT = "advanced.limits.max_file_mb; raise it if the file is genuine"


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


MAX_CLASSES = 10_000


def _check_label_range(y: np.ndarray, where: str) -> np.ndarray:
    """int64 labels, checked before the cast: uint64 labels would wrap to negative."""
    bad = np.flatnonzero((y < 0) | (y >= MAX_CLASSES)) if len(y) else []
    if len(bad):
        raise SanitizeError(f"{where}: sample {int(bad[0])} has label {y[bad[0]]}; labels must be class indices "
                            f"0..K-1 (K <= {MAX_CLASSES:,})")
    return y.astype(np.int64)


def _check_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if y.ndim != 1:
        raise SanitizeError(f"{where}: shape {y.shape}, expected one integer label per image")
    if y.dtype.kind not in "iu":
        raise SanitizeError(f"{where}: labels are {y.dtype}, expected integers (class indices)")
    if len(y) != n:
        raise SanitizeError(f"{where}: {len(y)} labels for {n} images; x and y must have the same length")
    return _check_label_range(y, where)


def _npz_members(z, path: Path, keys: list[str], limits: Limits) -> None:
    """Check the arrays' declared sizes (zip entry and .npy header) before any is read: numpy allocates what a
    header declares before it reads a byte."""
    members = set(z.zip.namelist())
    decoded = stored = samples = 0
    for key in keys:
        info = z.zip.getinfo(key if key in members else f"{key}.npy")  # the member numpy's z[key] reads
        with z.zip.open(info) as fh:
            version = np.lib.format.read_magic(fh)
            shape, _, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(fh))
        declared = int(np.prod(shape, dtype=object)) * max(dtype.itemsize, 1)
        if declared > info.file_size:
            raise SanitizeError(f"{path}: {key} declares {shape} {dtype} ({declared:,} bytes) but holds "
                                f"{info.file_size:,}; the archive is damaged; {NPZ_FIX}")
        decoded, stored = decoded + info.file_size, stored + info.compress_size
        samples += int(shape[0]) if key.startswith("x_") and len(shape) else 0
    check_count(str(path), samples, limits)
    check_decoded(str(path), decoded, stored, limits)


def read_npz(path: Path, limits: Limits = DEFAULT_LIMITS) -> Source:
    fh = open_regular(path, limits.max_file_mb, FILE_LIMIT, "set data.path to an .npz file")
    if fh.read(4) != b"PK\x03\x04":  # np.load would read a bare .npy (or anything) before any check
        fh.close()
        raise SanitizeError(f"{path}: not an .npz archive (a zip of .npy arrays); {NPZ_FIX}")
    fh.seek(0)
    try:
        z = np.load(fh, allow_pickle=False)
    except NPZ_ERRORS as err:
        fh.close()
        raise SanitizeError(f"{path}: not a readable .npz file ({type(err).__name__}: {err}); {NPZ_FIX}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        fh.close()
        raise SanitizeError(f"{path}: a single .npy array, not an .npz archive; {NPZ_FIX}")
    with fh, z:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
        if missing:
            raise SanitizeError(f"{path}: missing arrays {missing} (found {sorted(z.files)[:10]}); {NPZ_FIX}")
        keys = ["x_train", "y_train", "x_test", "y_test"] + (["class_names"] if "class_names" in z.files else [])
        try:
            _npz_members(z, path, keys, limits)
            arrays = {k: z[k] for k in keys}
        except NPZ_ERRORS as err:
            # allow_pickle=False also lands here for object arrays (e.g. images of mixed shapes).
            raise SanitizeError(f"{path}: an array cannot be read ({type(err).__name__}: {err}); images must share "
                                f"one shape, stored as plain uint8 arrays; {NPZ_FIX}") from None
    names = None
    if "class_names" in arrays:
        raw_names = arrays["class_names"]
        if raw_names.ndim != 1 or raw_names.dtype.kind not in "US":
            raise SanitizeError(f"{path}: class_names must be a 1-D array of strings, got {raw_names.dtype} "
                                f"{raw_names.shape}; {NPZ_FIX}")
        names = [str(c) for c in raw_names]
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

# The only globals a CIFAR-10 batch needs: numpy's array reconstruction, each behind a guard. Anything else
# (os.system, builtins.eval, ...) is refused before it is resolved, so a hostile pickle cannot run code; nor can it
# call the array constructor itself (an allocation of any size) or look up a codec other than latin-1.
_NDARRAY = object()  # stands for numpy.ndarray: `_reconstruct` takes it, nothing may call it


def _reconstruct(cls, shape, dtype):
    if cls is not _NDARRAY or not isinstance(shape, tuple) or any(not isinstance(n, int) or n != 0 for n in shape):
        raise pickle.UnpicklingError("an array reconstruction other than numpy's pickle format")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _latin1(text, encoding="utf-8"):
    """_codecs.encode as protocol-2 pickles written by Python 3 use it: array bytes carried as latin-1 text."""
    if not isinstance(text, str) or not isinstance(encoding, str) or \
            encoding.lower().replace("-", "_") not in ("latin1", "latin_1"):
        raise pickle.UnpicklingError(f"a codec other than latin-1 ({str(encoding)[:40]!r})")
    return text.encode("latin-1")


def _frombuffer(buf, dtype, shape, order):
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


def _dtype(*args):
    """numpy.dtype, less object dtypes: an object array's state allocates its declared size before reading a byte."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("an object array")
    return dtype


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct, ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer, ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _dtype, ("_codecs", "encode"): _latin1,
}
CIFAR_FIX = "use the batches from cifar-10-python.tar.gz unchanged"


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[module, name]
        raise pickle.UnpicklingError(f"refused to load global {module}.{name}")


def restricted_load(path: Path, limits: Limits = DEFAULT_LIMITS):
    data = read_regular(path, limits.max_file_mb, FILE_LIMIT, CIFAR_FIX)
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError, UnicodeDecodeError, ImportError, LookupError, RecursionError) as err:
        raise SanitizeError(f"{path}: not a valid CIFAR-10 python batch ({type(err).__name__}: "
                            f"{str(err)[:200]}); {CIFAR_FIX}") from None


def _get(d: dict, key: str):
    return d.get(key.encode(), d.get(key))


def _read_cifar_batch(path: Path, limits: Limits) -> tuple[np.ndarray, np.ndarray]:
    d = restricted_load(path, limits)
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
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), _check_label_range(y, f"{path}: labels")


def read_cifar10(root: Path, limits: Limits = DEFAULT_LIMITS) -> Source:
    if not root.is_dir():
        raise SanitizeError(f"{root}: not a directory; set data.path to the extracted cifar-10-batches-py folder")
    root = root.resolve()
    train_files = sorted(root.glob("data_batch_*"))
    test_file = root / "test_batch"
    if not train_files or not test_file.exists():
        raise SanitizeError(f"{root}: expected data_batch_1..5 and test_batch (the cifar-10-batches-py folder)")
    meta = root / "batches.meta"
    for f in [*train_files, test_file] + ([meta] if meta.exists() or meta.is_symlink() else []):
        if not _inside(f, root):
            raise SanitizeError(f"{f}: a link leading outside {root}; copy the file into the folder instead")
    splits, n, decoded = [], 0, 0
    for files in (train_files, [test_file]):
        xs, ys, ids = [], [], []
        for f in files:
            x, y = _read_cifar_batch(f, limits)
            n, decoded = n + len(y), decoded + x.nbytes
            check_count(str(root), n, limits)
            check_decoded(str(root), decoded, None, limits)
            xs.append(x), ys.append(y)
            ids += [f"{f.name}-{i:05d}" for i in range(len(y))]
        splits.append(Raw(np.concatenate(xs), np.concatenate(ys), ids))
    names = None
    if meta.exists():
        loaded = restricted_load(meta, limits)
        raw_names = _get(loaded, "label_names") if isinstance(loaded, dict) else None
        if isinstance(raw_names, list) and all(isinstance(n, (bytes, str)) for n in raw_names):
            names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in raw_names]
    return Source(splits[0], splits[1], names, [])


# ---------------------------------------------------------------- imagefolder

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}  # suffix -> the only format read from it
IMAGE_FIX = "replace or remove the file"
# Class names become file names, CSV cells and HTML: letters, digits and a few separators only.
CLASS_NAME = re.compile(r"[^\W_][\w .+-]{0,63}")
EXIF_ORIENTATION = 0x0112


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve(strict=True).relative_to(root)
        return True
    except (ValueError, OSError, RuntimeError):  # RuntimeError: a link loop, before Python 3.13
        return False


@dataclass
class ImageFile:
    path: Path
    size: tuple[int, int]  # declared width, height
    bands: int
    stored: int  # bytes on disk


def _open(path: Path, fh, limits: Limits):
    """The image's header only (Pillow decodes lazily), in the one format its suffix names."""
    from PIL import Image

    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SanitizeError(f"{path}: not a .png/.jpg/.jpeg file; {IMAGE_FIX}")
    too_big = SanitizeError(f"{path}: declares more pixels than advanced.limits.max_image_pixels "
                            f"({limits.max_image_pixels:,}); raise it if the image is genuine")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit, next, is the lower
            img = Image.open(fh, formats=[fmt])
    except Image.DecompressionBombError:
        raise too_big from None
    except Exception as err:  # noqa: BLE001 - image decoders raise many types on hostile files; one meaning
        detail = f"no {fmt} header, as its suffix says" if "cannot identify" in str(err) else str(err)[:200]
        raise SanitizeError(f"{path}: not a readable PNG/JPEG image ({detail}); {IMAGE_FIX}") from None
    if img.size[0] * img.size[1] > limits.max_image_pixels:
        img.close()
        raise too_big
    return img


def image_header(path: Path, limits: Limits = DEFAULT_LIMITS) -> ImageFile:
    with open_regular(path, limits.max_file_mb, FILE_LIMIT, IMAGE_FIX) as fh:
        with _open(path, fh, limits) as img:
            return ImageFile(path, img.size, len(img.getbands()), os.fstat(fh.fileno()).st_size)


def open_image(path: Path, limits: Limits = DEFAULT_LIMITS,
               size: tuple[int, int] | None = None) -> tuple[np.ndarray, str, list[str]]:
    """(uint8 H x W x C pixels, the file's mode, remarks: what was changed or ignored) of a PNG or JPEG file, refused
    before decoding when it declares more pixels than the limit or a size other than `size`."""
    from PIL import Image

    remarks = []
    with open_regular(path, limits.max_file_mb, FILE_LIMIT, IMAGE_FIX) as fh:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with _open(path, fh, limits) as img:
                    if size is not None and img.size != size:
                        raise SanitizeError(
                            f"{path}: image is {img.size[0]}x{img.size[1]} but the first train image is "
                            f"{size[0]}x{size[1]}; resize it or remove it (the pipeline does not resize: resizing "
                            "could hide or create a trigger)")
                    img.verify()  # structure and checksums; the image must be reopened afterwards
                fh.seek(0)
                with _open(path, fh, limits) as img:
                    rawmode = img.tile[0][3] if img.tile and len(img.tile[0]) > 3 else ""
                    if ";16" in str(rawmode):
                        remarks.append("16-bit channels cut to 8 bits")
                    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
                        remarks.append("EXIF orientation tag ignored (pixels read as stored, not rotated)")
                    img.load()  # decodes every pixel: catches truncation that verify() lets through
                    mode = img.mode
                    if mode in ("1", "L", "LA"):
                        arr = np.asarray(img.convert("L"))[..., None]
                    elif mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
                        arr = np.asarray(img.convert("RGB"))
                    else:
                        arr = None
        except SanitizeError:
            raise
        except Exception as err:  # noqa: BLE001 - image decoders raise many types on hostile files; one meaning
            raise SanitizeError(f"{path}: not a readable PNG/JPEG image ({str(err)[:200]}); {IMAGE_FIX}") from None
    if arr is None:
        raise SanitizeError(f"{path}: image mode {mode} is not supported; save it as 8-bit grayscale or RGB")
    if mode not in ("L", "RGB"):
        remarks.append(f"{mode} converted to 8-bit {'gray' if arr.shape[2] == 1 else 'RGB'}")
    return arr, mode, remarks


def _list_split(split_dir: Path, root: Path, class_names: list[str], skipped: list[str]) -> list[tuple[Path, int]]:
    """(file, label) of every image in the split's class folders; hidden entries are left out and listed in
    `skipped`."""
    files = []
    for label, name in enumerate(class_names):
        class_dir = split_dir / name
        if not class_dir.exists() and not class_dir.is_symlink():
            continue
        try:
            entries = sorted(class_dir.iterdir())
        except OSError as err:  # a file, a FIFO or an unreadable folder where a class folder belongs
            raise SanitizeError(f"{class_dir}: not a readable folder ({err.strerror}); put the class's images in a "
                                "folder of that name") from None
        for f in entries:
            rel = f.relative_to(root).as_posix()
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise SanitizeError(f"{class_dir}: a file name is not valid UTF-8 ({ascii(rel)}); rename it") from None
            if f.name.startswith("."):
                skipped.append(rel)  # .DS_Store, editor swap files: not samples
                continue
            if f.is_dir():
                raise SanitizeError(f"{f}: nested folders are not supported; put images directly in {class_dir}")
            regular_file(f, IMAGE_FIX)  # a FIFO, a device, a broken link or a loop
            if not _inside(f, root):
                raise SanitizeError(f"{f}: a link leading outside {root}; copy the image into the folder instead")
            files.append((f, label))
    return files


def _summarise(remarks: dict[str, list[str]], split: str) -> list[str]:
    return [f"{len(ids)} {split} image(s): {remark}, e.g. {ids[0]}" for remark, ids in remarks.items()]


def read_imagefolder(root: Path, limits: Limits = DEFAULT_LIMITS) -> Source:
    if not root.is_dir():
        raise SanitizeError(f"{root}: not a directory; set data.path to a folder with train/<class>/ and test/<class>/")
    root = root.resolve()
    for split in ("train", "test"):
        if not (root / split).is_dir() or not _inside(root / split, root):
            raise SanitizeError(f"{root}: missing {split}/ folder; expected train/<class>/*.png and test/<class>/*.png")
    class_names, skipped = [], []
    for d in sorted((root / "train").iterdir()):
        if d.name.startswith("."):
            skipped.append(f"train/{d.name}")
            continue
        if not d.is_dir() or not _inside(d, root):
            raise SanitizeError(f"{d}: expected only class folders in {root / 'train'}; move files or links out")
        if not CLASS_NAME.fullmatch(d.name):
            raise SanitizeError(f"{root / 'train'}: class folder name {ascii(d.name)} has characters other than "
                                "letters, digits, space, '.', '_', '+', '-' (or is over 64 characters); rename the "
                                "folder")
        class_names.append(d.name)
    if len(class_names) < 2:
        raise SanitizeError(f"{root / 'train'}: found {len(class_names)} class folder(s); need at least 2")
    for d in (root / "test").iterdir():
        if d.name.startswith("."):
            skipped.append(f"test/{d.name}")
        elif d.name not in class_names:
            raise SanitizeError(f"{root / 'test'}: test class {ascii(d.name)} has no train folder; classes are "
                                f"{class_names}")
    listed = [_list_split(root / split, root, class_names, skipped) for split in ("train", "test")]
    for split, files in zip(("train", "test"), listed):
        if not files:
            raise SanitizeError(f"{root / split}: no images found; add .png/.jpg files to its class folders")
    # Every size is checked from the headers before a pixel is decoded.
    check_count(str(root), sum(map(len, listed)), limits)
    headers = [image_header(f, limits) for files in listed for f, _ in files]
    check_decoded(str(root), sum(h.size[0] * h.size[1] * min(h.bands, 3) for h in headers),
                  sum(h.stored for h in headers), limits)
    size = headers[0].size
    notes = [f"skipped {len(skipped)} hidden file(s) or folder(s), e.g. {ascii(skipped[0])}"] if skipped else []
    splits = []
    for split, files in zip(("train", "test"), listed):
        images, remarks = [], {}
        for f, _ in files:
            arr, _, said = open_image(f, limits, size)
            images.append(arr)
            for remark in said:
                remarks.setdefault(remark, []).append(f.relative_to(root).as_posix())
        notes += _summarise(remarks, split)
        splits.append(images)
    # Color wins: if any image is RGB, gray images are repeated to three channels.
    channels = max(img.shape[2] for images in splits for img in images)
    raws = []
    for images, files in zip(splits, listed):
        x = np.stack([np.repeat(img, channels // img.shape[2], axis=2) for img in images]).astype(np.uint8)
        raws.append(Raw(x, np.array([label for _, label in files], dtype=np.int64),
                        [f.relative_to(root).as_posix() for f, _ in files]))
    return Source(raws[0], raws[1], class_names, notes)


def read_source(source: str, path: Optional[str], test_size: float, seed: int,
                limits: Limits = DEFAULT_LIMITS) -> Source:
    if source == "digits":
        return read_digits(test_size, seed)
    readers = {"npz": read_npz, "cifar10": read_cifar10, "imagefolder": read_imagefolder}
    return readers[source](Path(path), limits)
