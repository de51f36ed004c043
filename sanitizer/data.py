"""The canonical tensor store: uint8 images N x H x W x C, int64 labels, stable ids, sha256 per sample.

Stores are plain `.npz` files read with allow_pickle=False, so loading one can never run code.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sanitizer.errors import SanitizeError
from sanitizer.fileio import atomic_path


@dataclass(frozen=True)
class Store:
    x: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]
    ids: np.ndarray  # str [N], unique
    sha256: np.ndarray  # str [N], hex digest of each image's bytes
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x.shape[1:])

    def subset(self, index: np.ndarray) -> "Store":
        return Store(self.x[index], self.labels[index], self.ids[index], self.sha256[index], self.class_names)


def concat(first: Store, second: Store) -> Store:
    """The samples of both stores, in order (class names of the first)."""
    return Store(*(np.concatenate([getattr(first, f), getattr(second, f)]) for f in ("x", "labels", "ids", "sha256")),
                 first.class_names)


def sample_hashes(x: np.ndarray) -> np.ndarray:
    """sha256 of each image's raw bytes (shape is uniform, so bytes identify content)."""
    return np.array([hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest() for img in x])


def make_store(x: np.ndarray, labels: np.ndarray, ids, class_names) -> Store:
    x = np.ascontiguousarray(x, dtype=np.uint8)
    if x.ndim == 3:
        x = x[..., None]
    return Store(x, np.asarray(labels, dtype=np.int64), np.asarray(ids, dtype=str), sample_hashes(x), tuple(class_names))


def calibration_split(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(test, calibration) indices: `share` of each class, drawn with the seed, goes to calibration."""
    rng = np.random.default_rng([seed, 0xCA1])
    calibration = [rng.permutation(np.flatnonzero(labels == c))[:int(round(share * np.sum(labels == c)))]
                   for c in np.unique(labels)]
    calibration = np.sort(np.concatenate(calibration)) if calibration else np.empty(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels)), calibration), calibration


def store_hash(store: Store) -> str:
    """One hash for a whole store: ids, labels and per-sample hashes, in order."""
    h = hashlib.sha256()
    for sample_id, label, digest in zip(store.ids, store.labels, store.sha256):
        h.update(f"{sample_id}\t{int(label)}\t{digest}\n".encode())
    return h.hexdigest()


def save_store(path: Path | str, store: Store) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh, x=store.x, labels=store.labels, ids=store.ids, sha256=store.sha256,
                class_names=np.asarray(store.class_names, dtype=str),
            )


def save_arrays(path: Path | str, store: Store) -> None:
    """The store as a user's npz source: x_train (uint8 N x H x W x C), y_train and ids_train."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, x_train=store.x, y_train=store.labels, ids_train=store.ids)


def write_png(path: Path | str, image: np.ndarray) -> None:
    """One uint8 H x W x C image as a PNG (gray when C is 1): quarantined samples, reversed triggers."""
    from PIL import Image

    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path, format="PNG")


def load_store(path: Path | str) -> Store:
    """Load a store written by `save_store`, re-checking every sample's hash."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            store = Store(z["x"], z["labels"], z["ids"], z["sha256"], tuple(str(c) for c in z["class_names"]))
    except FileNotFoundError:
        raise SanitizeError(f"{path}: not found; run the stage that writes it first (dvc repro)") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise SanitizeError(f"{path}: not a readable tensor store ({err}); re-run `dvc repro`") from None
    bad = np.flatnonzero(sample_hashes(store.x) != store.sha256)
    if len(bad):
        raise SanitizeError(
            f"{path}: sample {store.ids[bad[0]]!r} (and {len(bad) - 1} more) no longer matches its sha256; "
            "the store was modified after ingest: re-run `dvc repro`"
        )
    return store
