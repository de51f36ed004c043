"""export: the released model as ONNX (models/model.onnx), with its provenance, and the inference guard fitted on the
clean set and the quarantine and calibrated on the calibration split (models/guard.onnx).

Reads models/model.pt, models/isolate.pt, data/ingested, data/clean, data/quarantine and the earlier stages' metrics
(for the model's metadata); writes both ONNX files and metrics/export.json.
"""

from __future__ import annotations

import json
import sys

import torch

from sanitizer import paths, runs
from sanitizer.config import Params, params_hash
from sanitizer.data import load_store, store_hash
from sanitizer.export import write_guard_onnx, write_model_onnx
from sanitizer.fileio import write_json
from sanitizer.guard import build_guard, guard_settings
from sanitizer.models import load_checkpoint
from sanitizer.onnx_io import PARITY_BATCHES
from sanitizer.rules import load_rules

EARLIER = ("ingest", "isolate", "recheck", "quarantine", "unlearn")


def run(params: Params) -> None:
    run_id = runs.run_id("export", params, runs.begin("export", *EARLIER))
    cpu = torch.device("cpu")
    model, _ = load_checkpoint(paths.MODEL, cpu)
    model.eval()
    test, clean = load_store(paths.TEST_STORE), load_store(paths.CLEAN_STORE)
    meta = {
        "producer": "backdoor-sanitizer", "run": run_id, "data_hash": store_hash(load_store(paths.TRAIN_STORE)),
        "clean_data_hash": store_hash(clean), "params_hash": params_hash(params),
        "class_names": json.dumps(list(test.class_names)), "input": "float32 [N,C,H,W] in [0,1]",
        "metrics": json.dumps({s: json.loads(paths.metrics_file(s).read_text(encoding="utf-8")) for s in EARLIER},
                              sort_keys=True),
    }
    atol, opset = params.advanced.export.atol, params.advanced.export.opset
    max_diff = write_model_onnx(model, test.image_shape, paths.ONNX_MODEL, opset, atol, meta, test.x)

    isolation, _ = load_checkpoint(paths.ISOLATE_MODEL, cpu)
    calibration = load_store(paths.CALIBRATION_STORE)
    guard, report = build_guard(guard_settings(params, load_rules()), {"released": model, "isolation": isolation},
                                clean, load_store(paths.QUARANTINE_STORE), calibration, cpu, len(test))
    worst = write_guard_onnx(guard, report, test.image_shape, paths.GUARD_ONNX, opset, meta, calibration.x)
    report = {**{k: v for k, v in report.items() if k != "calibration_hash"}, "max_rel_diff": worst}
    write_json(paths.metrics_file("export"), {"run": run_id, "max_abs_diff": max_diff, "atol": atol, "opset": opset,
                                               "parity_batches": list(PARITY_BATCHES),
                                               "params_hash": meta["params_hash"], "data_hash": meta["data_hash"],
                                               "guard": report})
    print(f"[export] {paths.ONNX_MODEL}: max |onnxruntime - torch| = {max_diff:.2e}; {paths.GUARD_ONNX}: threshold "
          f"{report['threshold']:.3f}, {report['calibration_fpr']:.3f} of {report['n_calibration']} "
          "clean calibration images flagged", file=sys.stderr)
