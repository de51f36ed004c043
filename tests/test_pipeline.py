"""End to end: the real `dvc repro` on the default data (digits, BadNets on 10%, target 0)."""

from __future__ import annotations

import json
import shutil
import sys

from conftest import run_cmd, set_params


def read_json(path):
    return json.loads(path.read_text())


def test_default_run_removes_the_backdoor_and_passes_the_gate(pipeline):
    gate = read_json(pipeline / "metrics/gate.json")
    assert gate["passed"] is True
    assert gate["asr"]["badnets"] <= 0.05
    assert gate["clean_accuracy"] >= 0.93
    # The scan of the released model: a figure per class, nothing flagged once the backdoor is gone.
    assert gate["scan"]["flagged"] == [] and len(gate["scan"]["classes"]) == 10
    assert all((pipeline / "data/quarantine" / c["image"]).exists() for c in gate["scan"]["classes"])


def test_default_run_isolates_poison(pipeline):
    isolate = read_json(pipeline / "metrics/isolate.json")
    assert isolate["n_isolated"] == round(0.01 * read_json(pipeline / "metrics/ingest.json")["n_train"])
    assert isolate["isolation_precision"] >= 0.9
    assert isolate["isolated"]["dominant_class"] == "0"  # the red team's target
    # Digits are easy data: the rule that chose ABL's share is printed by ingest and recorded with its evidence.
    rules = read_json(pipeline / "metrics/ingest.json")["data_rules"]
    assert rules["isolation"] == "share" and rules["nearest_mean_accuracy"] > 0.8 and rules["flip"] is False


def test_second_repro_runs_nothing(pipeline):
    result = run_cmd([sys.executable, "-m", "dvc", "repro"], pipeline)
    assert result.returncode == 0
    assert "Running stage" not in result.stdout
    assert "Data and pipelines are up to date" in result.stdout


def test_dvc_metrics_and_plots_read_the_outputs(pipeline):
    metrics = run_cmd([sys.executable, "-m", "dvc", "metrics", "show", "--json"], pipeline)
    assert metrics.returncode == 0, metrics.stderr
    assert '"clean_accuracy"' in metrics.stdout and '"isolation_precision"' in metrics.stdout
    plots = run_cmd([sys.executable, "-m", "dvc", "plots", "show", "--json"], pipeline)
    assert plots.returncode == 0, plots.stderr
    assert "plots/unlearn.csv" in plots.stdout and "plots/isolate_loss.csv" in plots.stdout


def test_without_defense_the_backdoor_survives_and_the_gate_blocks(pipeline, tmp_path):
    """defense.method: off: the gate must see a real backdoor and fail dvc repro."""
    copy = tmp_path / "nodefense"
    shutil.copytree(pipeline, copy)
    set_params(copy, **{"defense.method": "off"})
    result = run_cmd([sys.executable, "-m", "dvc", "repro"], copy)
    assert result.returncode != 0
    assert "release blocked: asr:badnets" in result.stderr + result.stdout
    gate = read_json(copy / "metrics/gate.json")  # written before the stage exits 1
    assert gate["passed"] is False
    assert gate["asr"]["badnets"] >= 0.9
    assert "Running stage 'ingest'" not in result.stdout  # only what the change affects re-ran


def test_canaries_implant_without_defense_block_the_gate_and_never_reach_the_cleaned_data(pipeline, tmp_path):
    """canary.rate on, defense off: each canary's backdoor takes hold (so they measure something), the gate blocks on
    them, and the cleaned data a user takes away holds exactly the user's samples."""
    import numpy as np

    from sanitizer.data import load_store

    copy = tmp_path / "canaries"
    shutil.copytree(pipeline, copy)
    set_params(copy, **{"defense.method": "off", "canary.rate": 0.05})
    result = run_cmd([sys.executable, "-m", "dvc", "repro"], copy)
    assert result.returncode != 0 and "asr:canary-1=" in result.stderr + result.stdout
    gate = read_json(copy / "metrics/gate.json")
    assert [c["family"] for c in gate["canaries"]] == ["patch", "blend"]
    assert all(c["n"] == 72 and c["recall"] == 0.0 for c in gate["canaries"])
    assert max(c["asr"] for c in gate["canaries"]) >= 0.9
    assert all(0 <= c["guard_tpr"] <= 1 for c in gate["canaries"])
    counts = read_json(copy / "metrics/quarantine.json")
    assert counts["n_canaries"] == 144 and counts["n_ingested"] == counts["n_clean"] + counts["n_quarantined"]
    truth = (copy / "data/ingested/canary_truth.csv").read_text().splitlines()
    canary_ids = {line.split(",")[0] for line in truth[1:]}
    cleaned = np.load(copy / "data/clean/cleaned.npz")
    assert len(canary_ids) == 144 and not canary_ids & set(cleaned["ids_train"].tolist())
    ingested = set(load_store(copy / "data/ingested/train.npz").ids.tolist())
    assert set(cleaned["ids_train"].tolist()) == ingested - canary_ids  # nothing quarantined: every user sample
    assert counts["n_cleaned_data"] == len(ingested) - 144


def test_static_plots_and_review_page_are_written(pipeline):
    from PIL import Image

    for name in ("isolate_loss_distribution", "isolate_loss_curves", "unlearn"):
        with Image.open(pipeline / f"plots/{name}.png") as image:
            assert image.format == "PNG" and image.size[0] > 300
    header = ["step", "phase", "epoch", "loss", "clean_accuracy", "asr"]
    lines = (pipeline / "plots/unlearn.csv").read_text().splitlines()
    assert lines[0].split(",") == header
    assert float(lines[-1].split(",")[-1]) <= 0.05  # ASR after unlearning, from the red team's test images
    page = (pipeline / "data/quarantine/index.html").read_text(encoding="utf-8")
    assert "release allowed" in page and "Content-Security-Policy" in page
    assert "Residual-backdoor scan" in page and "No class flagged" in page
