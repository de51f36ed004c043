"""Outputs that belong together come from one run, and a stage checks that before it starts.

A stage writes several outputs one after another (quarantine: data/quarantine, then data/clean, then its metrics); killed
between two writes, or failed after some, it leaves outputs of two runs, which a later stage run alone would mix
without a word. So each run of a stage has an id that every one of its outputs carries (a `.run` file in an output
folder, a "run" key in a JSON file, a checkpoint or an ONNX file's metadata), its metrics file, written last, is
removed first (a failed run leaves none), and every stage checks, for each stage it reads from, that all of that
stage's outputs carry one id (`check_inputs`).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from sanitizer import paths
from sanitizer.errors import SanitizeError

RUN_FILE = ".run"

# Every output of each stage that carries its run id (gate's only output another reads is its metrics file).
OUTPUTS: dict[str, tuple[Path, ...]] = {
    "ingest": (paths.INGESTED, paths.metrics_file("ingest")),
    "isolate": (paths.ISOLATE, paths.ISOLATE_MODEL, paths.metrics_file("isolate")),
    "recheck": (paths.RECHECK, paths.RECHECK_MODEL, paths.metrics_file("recheck")),
    "quarantine": (paths.QUARANTINE / RUN_FILE, paths.CLEAN, paths.metrics_file("quarantine")),
    "unlearn": (paths.MODEL, paths.metrics_file("unlearn")),
    "export": (paths.ONNX_MODEL, paths.GUARD_ONNX, paths.metrics_file("export")),
}


def start(stage: str) -> str:
    """A new run of `stage`: its id. The stage's metrics file goes first, so that a run that fails leaves none."""
    paths.metrics_file(stage).unlink(missing_ok=True)
    return f"{stage}-{uuid.uuid4().hex[:16]}"


def mark(folder: Path, run: str) -> None:
    """Stamp an output folder (inside its atomic_dir, before it is committed)."""
    (folder / RUN_FILE).write_text(run + "\n", encoding="utf-8")


def run_of(path: Path) -> str | None:
    """The run id `path` carries; None when it is missing or carries none."""
    try:
        if path.is_dir():
            path = path / RUN_FILE
        if path.name == RUN_FILE:
            return path.read_text(encoding="utf-8").strip() or None
        if path.suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8")).get("run")
        if path.suffix == ".pt":
            import torch

            return torch.load(path, map_location="cpu", weights_only=True).get("run")
        if path.suffix == ".onnx":
            import onnx

            props = onnx.load(str(path), load_external_data=False).metadata_props
            return next((p.value for p in props if p.key == "run"), None)
    except Exception:  # noqa: BLE001 - missing, foreign or damaged: it carries no run id, which the caller reports
        return None
    return None


def check_inputs(*stages: str) -> None:
    """Refuse to start when the outputs of any of `stages` do not all carry one run id."""
    for stage in stages:
        runs = {path: run_of(path) for path in OUTPUTS[stage]}
        missing = [path for path, run in runs.items() if run is None]
        if missing:
            raise SanitizeError(f"{missing[0]}: missing, or written by a run of {stage} that did not finish; "
                                f"re-run `dvc repro {stage}`")
        if len(set(runs.values())) > 1:
            first, other = OUTPUTS[stage][0], next(p for p, r in runs.items() if r != runs[OUTPUTS[stage][0]])
            raise SanitizeError(f"{first} and {other} come from different runs of {stage} (one was interrupted or "
                                f"failed half-way); re-run `dvc repro {stage}`")
