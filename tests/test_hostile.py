"""Property-based hostile input: every generated case ends in a valid store or a clean refusal
(SanitizeError), never an unhandled exception. Counts per reader are in CASES."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from sanitizer.config import Params
from sanitizer.errors import SanitizeError
from sanitizer.ingestion import read_and_validate

CASES = 200
SETTINGS = settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def assert_valid_or_refused(params: Params) -> None:
    try:
        train, test, _, _ = read_and_validate(params)
    except SanitizeError as err:
        assert str(err), "a refusal must say what is wrong"
        event("refused")
        return
    for store in (train, test):  # what is accepted must satisfy the store's contract
        assert store.x.dtype == np.uint8 and store.x.ndim == 4 and len(store) > 0
        assert ((store.labels >= 0) & (store.labels < len(store.class_names))).all()
        assert store.x.shape[1:] == train.x.shape[1:]
    assert len(set(train.ids) | set(test.ids)) == len(train) + len(test)
    event("accepted")


# ------------------------------------------------------------------ npz

def valid_arrays(rng: np.random.Generator, n: int = 12) -> dict:
    return {"x_train": rng.integers(0, 256, (n, 6, 6), dtype=np.uint8), "y_train": np.arange(n) % 3,
            "x_test": rng.integers(0, 256, (4, 6, 6), dtype=np.uint8), "y_test": np.arange(4) % 3}


def mutate(arrays: dict, op: str, key: str, rng: np.random.Generator, value: int) -> dict:
    a = dict(arrays)
    if op in ("nan", "range", "shorten", "dtype", "reshape") and (
            a[key].size == 0 or a[key].ndim == 0 or a[key].dtype.kind == "U"):
        return a  # nothing numeric (or nothing to shorten) left to mutate
    if op == "drop":
        a.pop(key)
    elif op == "dtype":
        a[key] = a[key].astype([np.float32, np.int16, np.bool_, np.float64, np.int8][value % 5])
    elif op == "nan":
        a[key] = a[key].astype(np.float64)
        a[key].flat[value % a[key].size] = np.nan
    elif op == "range":
        a[key] = a[key].astype(np.int64)
        a[key].flat[value % a[key].size] = value
    elif op == "shorten":
        a[key] = a[key][: value % len(a[key])]
    elif op == "reshape":
        a[key] = a[key].reshape(-1) if value % 3 == 0 else a[key][..., None].repeat(1 + value % 4, axis=-1)
    elif op == "random":
        a[key] = rng.integers(-300, 300, size=tuple(rng.integers(0, 4, size=value % 5)))
    elif op == "strings":
        a[key] = np.array(["a"] * 3)
    elif op == "class_names":
        a["class_names"] = np.array([str(i) for i in range(value % 5)])
    return a


@SETTINGS
@given(ops=st.lists(st.tuples(
    st.sampled_from(["drop", "dtype", "nan", "range", "shorten", "reshape", "random", "strings", "class_names", "none"]),
    st.sampled_from(["x_train", "y_train", "x_test", "y_test"]), st.integers(-1000, 1000)), min_size=1, max_size=3),
    damage=st.one_of(st.none(), st.tuples(st.sampled_from(["truncate", "flip"]), st.integers(0, 10**6))),
    seed=st.integers(0, 2**16))
def test_npz_reader_refuses_cleanly_or_accepts_valid(ops, damage, seed):
    rng = np.random.default_rng(seed)
    arrays = valid_arrays(rng)
    for op, key, value in ops:
        if op != "none" and (key in arrays or op == "class_names"):
            arrays = mutate(arrays, op, key, rng, value)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.npz"
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = bytearray(buf.getvalue())
        if damage and damage[0] == "truncate":
            data = data[: damage[1] % len(data)]
        elif damage:
            data[damage[1] % len(data)] ^= 0xFF
        path.write_bytes(bytes(data))
        assert_valid_or_refused(Params.model_validate({"data": {"source": "npz", "path": str(path)}}))


# ------------------------------------------------------------------ imagefolder

def encode(mode: str, size: tuple[int, int], fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    if mode == "CMYK":
        fmt = "JPEG"  # PNG cannot hold CMYK
    elif mode in ("RGBA", "LA", "P", "I;16", "1"):
        fmt = "PNG"  # JPEG cannot hold these
    img.save(buf, format=fmt)
    return buf.getvalue()


NAMES = st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..") and not s.startswith("."))
FILE = st.tuples(
    st.sampled_from(["png", "jpg", "txt", "PNG", "jpeg"]),
    st.sampled_from(["RGB", "L", "RGBA", "P", "1", "LA", "I;16", "CMYK"]),
    st.sampled_from([(5, 5), (5, 5), (5, 5), (4, 5)]),
    st.sampled_from(["ok"] * 12 + ["truncate", "flip", "text", "empty", "symlink", "dir"]),
    st.integers(0, 10**6),
)


SAFE_NAMES = st.sampled_from(["cat", "dog", "a b", "x-1", "Ünïcode"])


@SETTINGS
@given(classes=st.lists(st.one_of(SAFE_NAMES, SAFE_NAMES, SAFE_NAMES, NAMES), min_size=2, max_size=3, unique=True),
       files=st.lists(st.tuples(st.sampled_from(["train", "test"]), st.integers(0, 2), FILE), max_size=4))
def test_imagefolder_reader_refuses_cleanly_or_accepts_valid(classes, files):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "imgs"
        for split in ("train", "test"):
            for c in classes:  # a valid base, then the generated files on top
                (root / split / c).mkdir(parents=True, exist_ok=True)
                (root / split / c / "base.png").write_bytes(encode("RGB", (5, 5), "PNG", len(c)))
        for k, (split, ci, (ext, mode, size, damage, seed)) in enumerate(files):
            f = root / split / classes[ci % len(classes)] / f"{k}.{ext}"
            data = encode(mode, size, "JPEG" if ext.lower() in ("jpg", "jpeg") else "PNG", seed)
            if damage == "truncate":
                data = data[: seed % len(data)]
            elif damage == "flip":
                data = bytearray(data)
                data[seed % len(data)] ^= 0xFF
                data = bytes(data)
            elif damage == "text":
                data = b"this is not an image"
            elif damage == "empty":
                data = b""
            if damage == "symlink":
                os.symlink("/etc/hostname" if seed % 2 else root.parent, f)
            elif damage == "dir":
                f.mkdir()
            else:
                f.write_bytes(data)
        assert_valid_or_refused(Params.model_validate({"data": {"source": "imagefolder", "path": str(root)}}))
