"""gate: ASR is measured on the exported model; a failed check writes the report, then blocks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from stages import gate
from sanitizer.config import load_params
from sanitizer.errors import GateFailed
from sanitizer.metrics import backdoor_asr
from sanitizer.triggers import Backdoor, badnets
from sanitizer.config import RedteamParams


def test_attack_success_rate_counts_only_images_not_already_of_the_target():
    images = np.zeros((4, 8, 8, 1), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3])

    def says_target_when_patched(x):  # a perfectly backdoored "model": the patch decides
        return np.where(x[:, -1, -1, 0] == 255, 0, 1)

    def trig(x):
        return badnets(x, RedteamParams())

    assert backdoor_asr(says_target_when_patched, images, labels, 4, Backdoor("badnets", trig, 0)) == 1.0
    assert backdoor_asr(says_target_when_patched, images, labels, 4, Backdoor("none", lambda x: x, 0)) == 0.0


def test_failed_gate_writes_report_then_blocks(pipeline, tmp_path, monkeypatch):
    for sub in ("data", "models", "metrics", "plots"):
        shutil.copytree(pipeline / sub, tmp_path / sub)
    shutil.copy(pipeline / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    params = load_params().model_copy(update={"gate": load_params().gate.model_copy(update={"min_clean_accuracy": 1.0})})
    with pytest.raises(GateFailed, match="clean_accuracy="):
        gate.run(params)
    report = json.loads((tmp_path / "metrics/gate.json").read_text())
    assert report["passed"] is False
    assert [c["name"] for c in report["checks"] if not c["passed"]] == ["clean_accuracy"]


def test_without_the_scan_its_output_folder_is_empty(pipeline, tmp_path, monkeypatch):
    for sub in ("data", "models", "metrics", "plots"):
        shutil.copytree(pipeline / sub, tmp_path / sub)
    monkeypatch.chdir(tmp_path)
    params = load_params(pipeline / "params.yaml")
    gate.run(params.model_copy(update={"gate": params.gate.model_copy(update={"max_scan_anomaly": None})}))
    report = json.loads((tmp_path / "metrics/gate.json").read_text())
    assert report["scan"] is None and "scan:flagged_classes" not in [c["name"] for c in report["checks"]]
    assert (tmp_path / "data/quarantine/scan").is_dir() and not any((tmp_path / "data/quarantine/scan").iterdir())
