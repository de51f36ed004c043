"""Hostile input, second round: what an attacker controlling the data folder, params.yaml or a decisions file can do.

Each family is closed by a mechanism (sanitizer/untrusted.py: regular files only, sizes checked before allocation,
one name rule; sanitizer/runs.py: outputs of one run), and each test generates the family, not one example: every
case ends in a clean refusal (SanitizeError, one line) or in data that satisfies the rule, never a hang, a traceback
or an allocation the limits did not allow.
"""

from __future__ import annotations

import io
import os
import pickle
import signal
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import set_params, stage_cli
from sanitizer.config import AdvancedLimits, Params, load_params
from sanitizer.errors import SanitizeError
from sanitizer.ingestion import read_and_validate
from sanitizer.quarantine import read_decisions
from sanitizer.sources import read_cifar10, read_imagefolder, read_npz
from sanitizer.untrusted import control_character, csv_text, name_problem
from test_ingest import write_cifar, write_npz

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
SMALL = AdvancedLimits(max_file_mb=1, max_decoded_mb=1, max_expansion=16, max_samples=1000, max_image_pixels=256 * 256)


@contextmanager
def no_hang(seconds: int = 20):
    """Fail, instead of hanging the suite, when a reader blocks (the FIFO family)."""
    def stop(*_):
        raise AssertionError(f"blocked for {seconds} s")
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert text and "\n" not in text and len(text) < 600, text
    return text


# ------------------------------------------------------------------ 1, 6: only regular files are opened

def not_a_file(kind: str, path: Path) -> Path:
    """Put something that is not a regular file at `path`."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "loop":
        path.symlink_to(path.name)
    elif kind == "dangling":
        path.symlink_to(path.parent / "nowhere")
    return path


KINDS = ["fifo", "directory", "device", "loop", "dangling"]


@pytest.mark.parametrize("kind", KINDS)
def test_npz_path_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    path = not_a_file(kind, tmp_path / "d.npz")
    with no_hang(), pytest.raises(SanitizeError) as err:
        read_npz(path)
    assert str(path) in one_line(err)


@pytest.mark.parametrize("kind", KINDS)
def test_cifar_batch_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    root = write_cifar(tmp_path / "c")
    (root / "data_batch_1").unlink()
    not_a_file(kind, root / "data_batch_1")
    with no_hang(), pytest.raises(SanitizeError) as err:
        read_cifar10(root)
    assert "data_batch_1" in one_line(err)


def image_folder(root: Path, names=("cat", "dog"), n: int = 3, size=(8, 8)) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in names:
            (root / split / name).mkdir(parents=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / split / name / f"{k}.png")
    return root


@pytest.mark.parametrize("kind", ["fifo", "device", "loop"])
def test_image_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    root = image_folder(tmp_path / "imgs")
    not_a_file(kind, root / "train/cat/9.png")
    with no_hang(), pytest.raises(SanitizeError) as err:
        read_imagefolder(root)
    assert "9.png" in one_line(err)


@pytest.mark.parametrize("kind", KINDS)
def test_decisions_and_params_that_are_not_regular_files_are_refused(tmp_path, kind):
    with no_hang():
        with pytest.raises(SanitizeError) as err:
            read_decisions(not_a_file(kind, tmp_path / "decisions.csv"), {"a"})
        one_line(err)
        with pytest.raises(SanitizeError) as err:
            load_params(not_a_file(kind, tmp_path / "params.yaml"))
        assert "params.yaml" in one_line(err)


def test_cifar_folder_link_leading_outside_is_refused(tmp_path):
    root = write_cifar(tmp_path / "c")
    outside = tmp_path / "elsewhere"
    (root / "test_batch").rename(outside)
    (root / "test_batch").symlink_to(outside)
    with pytest.raises(SanitizeError, match="link leading outside"):
        read_cifar10(root)


# ------------------------------------------------------------------ 2: sizes checked before allocation

@SETTINGS
@given(n=st.integers(1, 3000), side=st.integers(1, 64), flat=st.booleans(), compressed=st.booleans())
def test_npz_is_read_only_within_the_limits(tmp_path_factory, n, side, flat, compressed):
    path = tmp_path_factory.mktemp("npz") / "d.npz"
    rng = np.random.default_rng(n)
    x = np.zeros((n, side, side), np.uint8) if flat else rng.integers(0, 256, (n, side, side), dtype=np.uint8)
    arrays = {"x_train": x, "y_train": np.arange(n) % 2, "x_test": x[:1], "y_test": np.zeros(1, np.int64)}
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    try:
        src = read_npz(path, SMALL)
    except SanitizeError as err:
        assert "advanced.limits" in str(err) and "\n" not in str(err)
        return
    decoded = src.train.x.nbytes + src.test.x.nbytes
    assert decoded <= SMALL.max_decoded_mb * 2**20 and len(src.train.y) + len(src.test.y) <= SMALL.max_samples
    assert path.stat().st_size <= SMALL.max_file_mb * 2**20


def test_npz_zero_bomb_is_refused_before_it_is_decoded(tmp_path):
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, x_train=np.zeros((20_000, 32, 32), np.uint8), y_train=np.zeros(20_000, np.int64),
                        x_test=np.zeros((1, 32, 32), np.uint8), y_test=np.zeros(1, np.int64))
    assert path.stat().st_size < 200_000  # 20 MB of pixels in well under 1 MB
    with pytest.raises(SanitizeError, match="max_expansion"):
        read_npz(path)


def test_npz_header_declaring_more_than_it_holds_is_refused_before_allocation(tmp_path):
    import zipfile

    header = io.BytesIO()  # declares 64 GB; holds 256 bytes
    np.lib.format.write_array_header_1_0(header, {"shape": (999_999_999, 8, 8), "fortran_order": False,
                                                  "descr": "|u1"})
    lying = header.getvalue() + np.zeros((4, 8, 8), np.uint8).tobytes()

    with zipfile.ZipFile(tmp_path / "d.npz", "w") as z:
        z.writestr("x_train.npy", lying)
        for key, arr in {"y_train": np.zeros(4, np.int64), "x_test": np.zeros((1, 8, 8), np.uint8),
                         "y_test": np.zeros(1, np.int64)}.items():
            one = io.BytesIO()
            np.save(one, arr)
            z.writestr(f"{key}.npy", one.getvalue())
    with pytest.raises(SanitizeError, match="declares"):
        read_npz(tmp_path / "d.npz")


def png(width: int, height: int, bits: int, rows: bytes) -> bytes:
    """An RGB PNG built by hand: IHDR declaring width x height at `bits` per channel, `rows` compressed as its IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, bits, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def png_declaring(width: int, height: int) -> bytes:
    """A PNG header declaring width x height with a tiny IDAT: what a dimension bomb looks like before decoding."""
    return png(width, height, 8, b"\0" * 64)


@pytest.mark.parametrize("width, height", [(20_000, 20_000), (9_000, 9_000), (300, 300), (16, 16)])
def test_image_declaring_too_many_pixels_or_another_size_is_refused_before_decoding(tmp_path, width, height):
    root = image_folder(tmp_path / "imgs")
    (root / "train/dog/big.png").write_bytes(png_declaring(width, height))
    with pytest.raises(SanitizeError) as err:
        read_imagefolder(root, SMALL)
    text = one_line(err)
    assert "big.png" in text and ("max_image_pixels" in text or "but the first train image" in text
                                  or "max_decoded_mb" in text)


def test_image_folder_whose_pixels_expand_far_beyond_its_bytes_is_refused(tmp_path):
    root = image_folder(tmp_path / "imgs", n=2, size=(200, 200))
    for f in root.rglob("*.png"):  # flat images: a few hundred bytes for 120 KB of pixels each
        Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(f)
    with pytest.raises(SanitizeError, match="max_expansion"):
        read_imagefolder(root)


def test_yaml_alias_bomb_and_deep_nesting_are_refused_fast_with_a_short_message(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "seed: *i\n"
    (tmp_path / "bomb.yaml").write_text(bomb)
    assert len(bomb) < 1000
    with no_hang(5), pytest.raises(SanitizeError) as err:
        load_params(tmp_path / "bomb.yaml")
    assert "aliases" in one_line(err)
    (tmp_path / "deep.yaml").write_text("seed: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(SanitizeError) as err:
        load_params(tmp_path / "deep.yaml")
    assert "nested deeper" in one_line(err)


@SETTINGS
@given(value=st.recursive(st.integers() | st.text(max_size=50), lambda c: st.lists(c, max_size=30), max_leaves=500))
def test_a_bad_params_value_is_quoted_short(tmp_path_factory, value):
    import yaml

    path = tmp_path_factory.mktemp("p") / "params.yaml"
    path.write_text(yaml.safe_dump({"seed": value}))
    try:
        load_params(path)
    except SanitizeError as err:
        assert len(str(err)) < 400 and "\n" not in str(err)


def test_oversized_decisions_file_is_refused_by_size_and_a_bad_row_at_its_row(tmp_path):
    path = tmp_path / "decisions.csv"
    path.write_text("id,decision,note\n" + "a,release,x\n" + "b,maybe,x\n" + "c,confirm,x\n" * 20_000)
    with pytest.raises(SanitizeError, match="limit"):
        read_decisions(path, {"a", "b", "c"})
    path.write_text("id,decision,note\n" + "a,release,x\n" + "b,maybe,x\n" + "c,confirm,x\n")
    with pytest.raises(SanitizeError, match=r"decisions.csv:3: decision 'maybe'"):
        read_decisions(path, {"a", "b", "c"})


# ------------------------------------------------------------------ 3: one rule for names

NAMES = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["cat\n", "cat\r", "\u202ecat", "ca\u200bt", "", " ", "cat ", "=cmd|' /C calc'!A0", "-1", "@sum", "a\tb", "cat"])


@SETTINGS
@given(names=st.lists(NAMES, min_size=2, max_size=4))
def test_class_names_from_any_source_pass_one_rule_or_are_refused(tmp_path_factory, names):
    root = tmp_path_factory.mktemp("npz")
    write_npz(root / "d.npz", classes=len(names), class_names=np.array(names, dtype=str))
    params = Params.model_validate({"data": {"source": "npz", "path": str(root / "d.npz")}})
    try:
        train, _, _, _ = read_and_validate(params)
    except SanitizeError as err:
        assert "\n" not in str(err) and "\r" not in str(err) and "\u202e" not in str(err)
        return
    assert all(name_problem(n) is None for n in train.class_names) and len(set(train.class_names)) == len(names)


@SETTINGS
@given(name=NAMES)
def test_file_names_become_ids_only_when_they_pass_the_rule(tmp_path_factory, name):
    root = image_folder(tmp_path_factory.mktemp("f") / "imgs")
    try:
        (root / "train/cat" / f"{name}.png").write_bytes((root / "train/cat/0.png").read_bytes())
    except (OSError, ValueError):
        return  # a name the file system itself refuses
    try:
        train, _, _, _ = read_and_validate(Params.model_validate({"data": {"source": "imagefolder",
                                                                            "path": str(root)}}))
    except SanitizeError as err:
        assert "\n" not in str(err) and "\u202e" not in str(err)
        return
    assert all(name_problem(i) is None for i in train.ids)


def test_class_folder_ending_in_a_newline_is_refused(tmp_path):
    root = image_folder(tmp_path / "imgs", names=("cat", "dog\n"))
    with pytest.raises(SanitizeError) as err:
        read_imagefolder(root)
    assert "'dog\\n'" in one_line(err)


def test_notes_are_one_plain_line_and_written_so_a_spreadsheet_does_not_run_them(tmp_path):
    path = tmp_path / "decisions.csv"
    path.write_text('id,decision,note\na,release,"two\nlines"\n')
    with pytest.raises(SanitizeError, match="one plain line"):
        read_decisions(path, {"a"})
    assert csv_text("=cmd|'/C calc'!A0") == "'=cmd|'/C calc'!A0" and csv_text("fine") == "fine"
    assert control_character("\u202eevil") and control_character("plain text") is None


# ------------------------------------------------------------------ 4: degenerate data refused at ingest

@pytest.mark.parametrize("override, params, message", [
    ({"y_train": np.zeros(40, np.int64), "y_test": np.zeros(20, np.int64)}, {}, "at least 2 classes"),
    ({"x_train": np.zeros((2, 8, 8), np.uint8), "y_train": np.array([0, 1]), "y_test": np.arange(20) % 2}, {},
     "at least 5"),
    ({}, {"data.calibration_size": 0.99}, "data.calibration_size"),
    ({"y_train": np.full(40, 2**63 + 5, np.uint64)}, {}, str(2**63 + 5)),
])
def test_degenerate_data_is_refused_at_ingest_with_the_reason(project, override, params, message):
    write_npz(project / "d.npz", **override)
    set_params(project, **{"data.source": "npz", "data.path": "d.npz", "redteam.attack": None, **params})
    result = stage_cli(project, "ingest")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ 6: tracebacks where one line belongs

def test_restricted_unpickler_refuses_codecs_and_the_array_constructor(tmp_path):
    root = write_cifar(tmp_path / "c")

    class Codec:
        def __reduce__(self):
            import _codecs
            return (_codecs.encode, ("x", "rot13"))

    class Alloc:  # an object array's state: numpy allocates (and zero-fills) 64 GB before it reads the empty list
        def __reduce__(self):
            reconstruct = np.empty(0).__reduce__()[0]
            return (reconstruct, (np.ndarray, (0,), b"b"), (1, (2**33,), np.dtype("O"), False, []))

    for hostile in (Codec(), Alloc()):
        (root / "data_batch_1").write_bytes(pickle.dumps({b"data": hostile, b"labels": []}, protocol=2))
        with pytest.raises(SanitizeError) as err:
            read_cifar10(root)
        assert "not a valid CIFAR-10" in one_line(err)


def test_cli_refuses_a_params_directory(project):
    result = stage_cli(project, "ingest", "--params", "schemas")
    assert result.returncode == 2 and "is a directory" in result.stderr and "Traceback" not in result.stderr


def test_guard_given_the_guard_as_its_model_is_refused(pipeline, tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    result = stage_cli(pipeline, "guard", "--model", "models/guard.onnx", str(tmp_path / "x.png"))
    assert result.returncode == 2 and "not the model" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------ 7: nothing accepted quietly

def test_image_in_another_format_than_its_suffix_is_refused(tmp_path):
    root = image_folder(tmp_path / "imgs")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train/cat/0.png", format="GIF")
    with pytest.raises(SanitizeError, match="0.png: not a readable PNG/JPEG"):
        read_imagefolder(root)


def png_rgb16(pixels: np.ndarray) -> bytes:
    """A 48-bit RGB PNG (Pillow reads it as 8-bit RGB)."""
    h, w, _ = pixels.shape
    return png(w, h, 16, b"".join(b"\0" + pixels[r].astype(">u2").tobytes() for r in range(h)))


def test_sixteen_bit_exif_rotated_and_hidden_entries_are_reported(tmp_path):
    root = image_folder(tmp_path / "imgs")
    (root / "train/cat/0.png").write_bytes(png_rgb16(np.full((8, 8, 3), 40000, np.uint16)))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train/dog/1.jpg", exif=exif)
    (root / "train/.secret").mkdir()
    notes = " | ".join(read_imagefolder(root).notes)
    assert "16-bit channels cut to 8 bits" in notes
    assert "EXIF orientation" in notes and ".secret" in notes


def test_decisions_with_a_bom_are_read_and_an_unclosed_quote_is_refused(tmp_path):
    path = tmp_path / "decisions.csv"
    path.write_bytes("\ufeffid,decision,note\na,release,ok\n".encode())
    assert read_decisions(path, {"a", "b"}) == {"a": ("release", "ok")}
    path.write_text('id,decision,note\na,release,"oops\nb,confirm,x\n')
    with pytest.raises(SanitizeError, match="unclosed quote"):
        read_decisions(path, {"a", "b"})
