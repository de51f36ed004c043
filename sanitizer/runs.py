"""Outputs that belong together come from one run, and a stage checks that before it starts.

A stage writes several outputs one after another (quarantine: data/quarantine, then data/clean, then its metrics); killed
between two writes, or failed after some, it leaves outputs of two runs, which a later stage run alone would mix
without a word. So each run of a stage has an id that every one of its outputs carries (a `.run` file in an output
folder, a "run" key in a JSON file, a checkpoint or an ONNX file's metadata), its metrics file, written last, is
removed first (a failed run leaves none), and every stage checks, for each stage it reads from, that all of that
stage's outputs carry one id (`begin`). The id is a digest of what the run read (`run_id`), not a random one.
"""

from __future__ import annotations

import hashlib
import json
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


def begin(stage: str, *reads: str) -> list[str]:
    """Start a run of `stage`, which reads the outputs of the stages `reads`: refuse unless each of those carries one
    run id, and remove this stage's metrics file, written last, so that a run that fails leaves none. Returns the
    input run ids, for `run_id`."""
    inputs = [check_outputs(other) for other in reads]
    paths.metrics_file(stage).unlink(missing_ok=True)
    return inputs


def run_id(stage: str, params, inputs: list[str], *extra: str) -> str:
    """This run's id: a digest of the stage, its params, its inputs' run ids, the code and `extra` (what else it reads,
    e.g. the data's hash). Equal ids mean equal inputs, hence (the pipeline being deterministic) equal outputs, which
    may be mixed; and a rerun on unchanged inputs writes unchanged outputs, so DVC does not rerun what follows."""
    h = hashlib.sha256()
    for part in (stage, params.model_dump_json(), *inputs, code_version(), *extra):
        h.update(part.encode("utf-8") + b"\0")
    return f"{stage}-{h.hexdigest()[:16]}"


def code_version() -> str:
    """sha256 of the library's and the stages' source, which every stage runs."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted([*root.glob("sanitizer/*.py"), *root.glob("stages/*.py")]):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


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


def check_outputs(stage: str) -> str:
    """The run id all of `stage`'s outputs carry; refused when one carries none or another's."""
    runs = {path: run_of(path) for path in OUTPUTS[stage]}
    missing = [path for path, run in runs.items() if run is None]
    if missing:
        raise SanitizeError(f"{missing[0]}: missing, or written by a run of {stage} that did not finish; "
                            f"re-run `dvc repro {stage}`")
    first = OUTPUTS[stage][0]
    other = next((p for p, r in runs.items() if r != runs[first]), None)
    if other is not None:
        raise SanitizeError(f"{first} and {other} come from different runs of {stage} (one was interrupted or "
                            f"failed half-way); re-run `dvc repro {stage}`")
    return runs[first]
