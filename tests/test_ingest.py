"""ingest and the source readers: good data becomes a store; bad data is refused by name, nothing written."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from conftest import set_params, stage_cli
from stages import ingest
from sanitizer.config import load_params
from sanitizer.data import load_store
from sanitizer.errors import SanitizeError
from sanitizer.sources import read_cifar10, read_imagefolder, read_npz


def write_npz(path, n=40, shape=(8, 8), classes=4, **override):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (n, *shape), dtype=np.uint8), "y_train": np.arange(n) % classes,
              "x_test": rng.integers(0, 256, (n // 2, *shape), dtype=np.uint8), "y_test": np.arange(n // 2) % classes}
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def test_npz_ingest_writes_a_hashed_store(project):
    write_npz(project / "d.npz")
    set_params(project, **{"data.source": "npz", "data.path": "d.npz", "redteam.poison_rate": 0.25})
    ingest.run(load_params())
    train = load_store("data/ingested/train.npz")
    assert train.x.shape == (40, 8, 8, 1) and train.class_names == ("0", "1", "2", "3")
    assert len(set(train.sha256)) == len(train)
    truth = (project / "data/ingested/redteam_truth.csv").read_text().splitlines()
    assert len(truth) == 1 + 10  # header + 25% of 40
    # Half of each test class (data.calibration_size) is held out to calibrate the guard; nothing is lost or shared.
    test, calibration = load_store("data/ingested/test.npz"), load_store("data/ingested/calibration.npz")
    assert len(test) + len(calibration) == 20 and not set(test.ids) & set(calibration.ids)
    assert np.bincount(calibration.labels).tolist() == [2, 2, 2, 2]


def test_npz_label_outside_class_set_is_refused_by_sample(project):
    y = np.arange(40) % 4
    y[17] = 9
    write_npz(project / "d.npz", y_train=y)
    set_params(project, **{"data.source": "npz", "data.path": "d.npz", "data.classes": ["a", "b", "c", "d"]})
    result = stage_cli(project, "ingest")
    assert result.returncode == 2
    assert "'train-000017'" in result.stderr and "label" in result.stderr
    assert not (project / "data").exists() and not (project / "metrics").exists()


@pytest.mark.parametrize("override, message", [
    ({"x_train": np.full((40, 8, 8), np.nan)}, "NaN"),
    ({"x_train": np.zeros((40, 8, 8), np.float32)}, "expected uint8"),
    ({"y_train": np.arange(39)}, "39 labels for 40 images"),
    ({"x_train": np.zeros((0, 8, 8), np.uint8), "y_train": np.zeros(0, np.int64)}, "empty"),
    ({"x_test": np.zeros((20, 9, 9), np.uint8)}, "one image shape"),
])
def test_npz_structural_problems_are_refused(tmp_path, override, message):
    with pytest.raises(SanitizeError, match=message):
        read_npz(write_npz(tmp_path / "d.npz", **override))


def test_npz_that_is_not_an_npz(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SanitizeError, match="not a readable .npz"):
        read_npz(tmp_path / "d.npz")


def make_imagefolder(root, size=(8, 8), classes=("cat", "dog"), per_class=3):
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((*size, 3), 40 * i + 10, np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_imagefolder_reads_and_converts_modes(tmp_path):
    root = make_imagefolder(tmp_path / "imgs")
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(root / "train/cat/rgba.png")
    src = read_imagefolder(root)
    assert src.class_names == ["cat", "dog"] and src.train.x.shape == (7, 8, 8, 3)
    assert "train/cat/rgba.png" in src.train.ids and "converted" in src.notes[0]


def test_an_image_folder_s_cleaned_set_is_the_list_of_kept_files(project):
    from stages import isolate, quarantine, recheck

    root = make_imagefolder(project / "imgs", per_class=6)
    set_params(project, **{"data.source": "imagefolder", "data.path": "imgs", "redteam.attack": None,
                           "train.isolate_epochs": 1})
    params = load_params()
    for stage in (ingest, isolate, recheck, quarantine):
        stage.run(params)
    kept = (project / "data/clean/kept_paths.txt").read_text().splitlines()
    clean, quarantined = load_store("data/clean/train.npz"), load_store("data/quarantine/quarantine.npz")
    assert kept == list(clean.ids) and len(kept) + len(quarantined) == 12
    assert all((root / k).is_file() for k in kept) and not set(kept) & set(quarantined.ids)
    assert not (project / "data/clean/cleaned.npz").exists()


def test_corrupt_image_in_imagefolder_is_refused_by_file(project):
    root = make_imagefolder(project / "imgs")
    data = (root / "train/dog/1.png").read_bytes()
    (root / "train/dog/1.png").write_bytes(data[: len(data) // 2])
    set_params(project, **{"data.source": "imagefolder", "data.path": "imgs"})
    result = stage_cli(project, "ingest")
    assert result.returncode == 2
    assert "train/dog/1.png" in result.stderr and "not a readable PNG/JPEG" in result.stderr
    assert not (project / "data").exists()


@pytest.mark.parametrize("break_it, message", [
    (lambda r: (r / "train/cat/notes.txt").write_text("hi"), "not a .png/.jpg"),
    (lambda r: (r / "train/cat/x.png").write_text("not an image"), "not a readable PNG/JPEG"),
    (lambda r: Image.new("RGB", (9, 8)).save(r / "train/dog/big.png"), "image is 9x8"),
    (lambda r: (r / "train/bad<name>").mkdir(), "rename the folder"),
    (lambda r: os.symlink("/etc/hostname", r / "train/cat/link.png"), "outside"),
])
def test_imagefolder_hostile_inputs(tmp_path, break_it, message):
    root = make_imagefolder(tmp_path / "imgs")
    break_it(root)
    with pytest.raises(SanitizeError, match=message):
        read_imagefolder(root)


def write_cifar(root, n=10):
    root.mkdir()
    rng = np.random.default_rng(1)
    for name in ("data_batch_1", "test_batch"):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n)),
                 b"batch_label": b"x", b"filenames": [b"f"] * n}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return root


def test_cifar10_batches_are_read(tmp_path):
    src = read_cifar10(write_cifar(tmp_path / "c"))
    assert src.train.x.shape == (10, 32, 32, 3) and src.class_names[3] == "c3"
    assert src.train.ids[0] == "data_batch_1-00000"


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_cifar10_pickle_that_runs_code_is_refused_without_running(tmp_path, monkeypatch):
    root = write_cifar(tmp_path / "c")
    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SanitizeError, match="refused to load global"):
        read_cifar10(root)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) // 2], "not a valid CIFAR-10 python batch"),
    (lambda b: pickle.dumps({b"data": np.zeros((10, 3000), np.uint8), b"labels": list(range(10))}), "N x 3072"),
    (lambda b: pickle.dumps({b"data": np.zeros((10, 3072), np.uint8), b"labels": [1, 2]}), "2 labels for 10 images"),
    (lambda b: pickle.dumps([1, 2, 3]), "expected a dict"),
])
def test_cifar10_damaged_batches_are_refused(tmp_path, damage, message):
    root = write_cifar(tmp_path / "c")
    (root / "data_batch_1").write_bytes(damage((root / "data_batch_1").read_bytes()))
    with pytest.raises(SanitizeError, match=message):
        read_cifar10(root)
