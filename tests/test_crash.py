"""Crash safety: a stage killed at any moment leaves the previous outputs or none, never a half file;
and the same data and seed give the same isolated ids and the same clean set."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import copy_project, set_params, tool_env
from stages import ingest, isolate, quarantine, recheck
from sanitizer.config import load_params
from sanitizer.data import load_store, store_hash
from sanitizer.errors import SanitizeError

WRITER = textwrap.dedent("""
    import hashlib, os
    from sanitizer.fileio import atomic_dir, write_bytes
    # Rewrite a 4 MB file and a directory forever; each version ends with the sha256 of its payload.
    for version in range(10**9):
        payload = os.urandom(4 << 20)
        blob = payload + hashlib.sha256(payload).hexdigest().encode()
        write_bytes("out.bin", blob)
        with atomic_dir("outdir") as d:
            (d / "a.bin").write_bytes(blob)
            (d / "b.bin").write_bytes(blob)
        print(version, flush=True)
""")


def whole(blob: bytes) -> bool:
    return hashlib.sha256(blob[:-64]).hexdigest().encode() == blob[-64:]


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.35, 0.5, 0.8, 1.1])
def test_killed_writer_leaves_whole_files(tmp_path, delay):
    (tmp_path / "writer.py").write_text(WRITER)
    env = dict(tool_env(), PYTHONPATH=str(copy_project(tmp_path / "p")))
    proc = subprocess.Popen([sys.executable, "writer.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE)
    proc.stdout.readline()  # one full version exists
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert whole((tmp_path / "out.bin").read_bytes())
    a, b = (tmp_path / "outdir/a.bin").read_bytes(), (tmp_path / "outdir/b.bin").read_bytes()
    assert whole(a) and a == b  # the directory is one version, never a mix


def test_stage_killed_mid_training_keeps_previous_outputs(pipeline, tmp_path):
    project = tmp_path / "p"
    shutil.copytree(pipeline, project)
    before = {p: p.read_bytes() for p in [*(project / "data/isolate").iterdir(), project / "models/isolate.pt"]}
    set_params(project, **{"train.isolate_epochs": 500, "seed": 7})
    proc = subprocess.Popen([sys.executable, "-m", "stages", "isolate"], cwd=project, env=tool_env(),
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "epoch 3/" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    after = {p: p.read_bytes() for p in [*(project / "data/isolate").iterdir(), project / "models/isolate.pt"]}
    assert after == before


def run_front(project, monkeypatch):
    monkeypatch.chdir(project)
    set_params(project, **{"train.isolate_epochs": 4})
    params = load_params()
    for stage in (ingest, isolate, recheck, quarantine):
        stage.run(params)
    ids = (project / "data/isolate/isolated.csv").read_text()
    return ids, store_hash(load_store(project / "data/clean/train.npz"))


def test_same_data_and_seed_give_same_isolated_ids_and_clean_set(tmp_path, monkeypatch):
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        runs.append(run_front(copy_project(tmp_path / name), monkeypatch))
    first, second = runs
    assert first == second
    assert first[0].count("\n") == 1 + 14  # header + 1% of 1,437


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002, 0o027])
def test_outputs_get_the_mode_the_umask_gives(tmp_path, umask):
    """Crash-safe writes go through private temporaries; what lands has the mode a plain write would have."""
    import os

    from sanitizer.fileio import atomic_dir, write_json

    old = os.umask(umask)
    try:
        write_json(tmp_path / "out.json", {"a": 1})
        with atomic_dir(tmp_path / "folder") as out:
            (out / "inside.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "folder/inside.txt").stat().st_mode & 0o777 == 0o666 & ~umask


class Killed(BaseException):
    """What SIGKILL would do at that point: nothing after it runs (BaseException: no `except Exception` catches it)."""


def test_quarantine_killed_between_its_two_folders_stops_a_later_stage(pipeline, tmp_path, monkeypatch):
    from sanitizer import paths
    from stages import unlearn

    project = tmp_path / "p"
    shutil.copytree(pipeline, project)
    monkeypatch.chdir(project)
    real = quarantine.atomic_dir

    def dies_before_the_clean_set(path):
        if Path(path) == paths.CLEAN:
            raise Killed
        return real(path)

    # A run that differs from the one that wrote the outputs (a reviewer released a suspect): a run on the same inputs
    # would carry the same id and write the same outputs, which may be mixed.
    suspect = (project / "data/quarantine/quarantine.csv").read_text().splitlines()[1].split(",")[0]
    (project / "review/decisions.csv").write_text(f"id,decision,note\n{suspect},release,\n")
    monkeypatch.setattr(quarantine, "atomic_dir", dies_before_the_clean_set)
    with pytest.raises(Killed):
        quarantine.run(load_params())
    monkeypatch.setattr(quarantine, "atomic_dir", real)
    with pytest.raises(SanitizeError, match="quarantine.*re-run `dvc repro quarantine`"):
        unlearn.run(load_params())
    (project / "metrics/quarantine.json").write_text((pipeline / "metrics/quarantine.json").read_text())
    with pytest.raises(SanitizeError, match="come from different runs of quarantine"):  # even with old metrics back
        unlearn.run(load_params())


def test_a_failed_stage_leaves_no_metrics_for_the_next_to_read(pipeline, tmp_path, monkeypatch):
    from stages import export, unlearn

    project = tmp_path / "p"
    shutil.copytree(pipeline, project)
    monkeypatch.chdir(project)

    def fails(*args, **kwargs):
        raise SanitizeError("unlearning failed")

    monkeypatch.setattr(unlearn, "sanitize", fails)
    monkeypatch.setattr(unlearn, "after_second_look", fails)
    with pytest.raises(SanitizeError, match="unlearning failed"):
        unlearn.run(load_params())
    assert not (project / "metrics/unlearn.json").exists()
    with pytest.raises(SanitizeError, match="unlearn.json: missing.*re-run `dvc repro unlearn`"):
        export.run(load_params())
