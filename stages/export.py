"""export: the released model as ONNX with a dynamic batch axis, checked against torch in onnxruntime.

Input `input`: float32 [N, C, H, W] pixels in [0, 1] (normalization is inside the graph); output
`logits`: [N, classes]. metadata_props carry the provenance: data hash, params hash, class names, metrics.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from stages import paths
from stages.config import Params, params_hash
from stages.data import load_store, store_hash
from stages.errors import SanitizeError
from stages.fileio import atomic_path, write_json
from stages.models import load_checkpoint
from stages.train import to_tensor

PARITY_BATCHES = (1, 7, 64)


def export_onnx(model: torch.nn.Module, image_shape: tuple[int, int, int], path: Path, opset: int) -> None:
    h, w, c = image_shape
    example = torch.rand(2, c, h, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not the user's concern
        torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=65536)}},
                          opset_version=opset, external_data=False, verbose=False)


def parity(model: torch.nn.Module, onnx_path: Path, images: np.ndarray) -> float:
    """Largest |onnxruntime - torch| logit over several batch sizes of real samples."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = to_tensor(images, torch.device("cpu"))
    worst = 0.0
    for bs in PARITY_BATCHES:
        xb = x[:bs]
        with torch.no_grad():
            ref = model(xb).numpy()
        out = sess.run(["logits"], {"input": xb.numpy()})[0]
        worst = max(worst, float(np.abs(out - ref).max()))
    return worst


def read_metrics(*stages: str) -> dict:
    return {s: json.loads(paths.metrics_file(s).read_text()) for s in stages if paths.metrics_file(s).exists()}


def run(params: Params) -> None:
    import onnx

    model, ckpt = load_checkpoint(paths.MODEL, torch.device("cpu"))
    model.eval()
    test, clean = load_store(paths.TEST_STORE), load_store(paths.CLEAN_STORE)
    with atomic_path(paths.ONNX_MODEL) as tmp:
        export_onnx(model, test.image_shape, tmp, params.export.opset)
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto, full_check=True)
        meta = {
            "producer": "backdoor-sanitizer", "data_hash": store_hash(load_store(paths.TRAIN_STORE)),
            "clean_data_hash": store_hash(clean), "params_hash": params_hash(params),
            "class_names": json.dumps(list(test.class_names)), "input": "float32 [N,C,H,W] in [0,1]",
            "metrics": json.dumps(read_metrics("ingest", "isolate", "quarantine", "unlearn"), sort_keys=True),
        }
        onnx.helper.set_model_props(proto, meta)
        onnx.save(proto, str(tmp))
        max_diff = parity(model, tmp, test.x[:max(PARITY_BATCHES)])
        if not max_diff <= params.export.atol:  # also catches NaN
            raise SanitizeError(f"{paths.ONNX_MODEL}: onnxruntime differs from torch by {max_diff:.2e} "
                                f"> export.atol={params.export.atol}; the export is refused")
    guard_report = export_guard_file(params, model, test.image_shape, clean, meta, ckpt.get("recheck_ids", []),
                                     len(test))
    write_json(paths.metrics_file("export"), {"max_abs_diff": max_diff, "atol": params.export.atol,
                                               "opset": params.export.opset, "parity_batches": list(PARITY_BATCHES),
                                               "params_hash": meta["params_hash"], "data_hash": meta["data_hash"],
                                               "guard": guard_report})
    print(f"[export] {paths.ONNX_MODEL}: max |onnxruntime - torch| = {max_diff:.2e}; {paths.GUARD_ONNX}: threshold "
          f"{guard_report['threshold']:.3f}, {guard_report['calibration_fpr']:.3f} of {guard_report['n_calibration']} "
          "clean calibration images flagged", file=sys.stderr)


def export_guard_file(params: Params, model: torch.nn.Module, image_shape, clean, model_meta: dict,
                      recheck_ids: list[str], check_size: int) -> dict:
    """Build the guard (stages/guard.py) from the released model, the isolation checkpoint and the quarantine (with the
    samples unlearn's recheck flagged, `recheck_ids`), calibrated for the FPR the gate measures on `check_size`
    clean test images, export it, and check onnxruntime against torch on the calibration images."""
    from stages.guard import build_guard, export_guard, onnx_guard, with_flagged

    device = torch.device("cpu")
    isolation, _ = load_checkpoint(paths.ISOLATE_MODEL, device)
    calibration = load_store(paths.CALIBRATION_STORE)
    clean, quarantined = with_flagged(clean, load_store(paths.QUARANTINE_STORE), recheck_ids)
    guard, report = build_guard(params, {"released": model, "isolation": isolation}, clean, quarantined, calibration,
                                device, check_size)
    meta = {"producer": "backdoor-sanitizer guard", "threshold": repr(report["threshold"]),
            "target_fpr": str(report["target_fpr"]), "confidence": str(report["confidence"]),
            "check_size": str(report["check_size"]),
            "calibration_fpr": str(report["calibration_fpr"]),
            "calibration_hash": report["calibration_hash"], "n_calibration": str(report["n_calibration"]),
            "detectors": json.dumps(report["detectors"]), "left_out": json.dumps(report["left_out"]),
            "image_shape": json.dumps(list(image_shape)),
            "outputs": "score float32 [N] (largest calibrated detector score), flag bool [N] (score > threshold)",
            **{k: model_meta[k] for k in ("data_hash", "clean_data_hash", "params_hash", "class_names", "input")}}
    with atomic_path(paths.GUARD_ONNX) as tmp:
        export_guard(guard, image_shape, tmp, params.export.opset, meta)
        scores, _ = onnx_guard(tmp)[0](calibration.x)
        with torch.no_grad():
            ref = guard(to_tensor(calibration.x, device))[0].numpy()
        worst = float(np.max(np.abs(scores - ref) / np.maximum(1.0, np.abs(ref)))) if len(ref) else 0.0
        if not worst <= 1e-3:
            raise SanitizeError(f"{paths.GUARD_ONNX}: onnxruntime's guard scores differ from torch's by {worst:.2e} "
                                "(relative); the export is refused")
    return {**{k: v for k, v in report.items() if k != "calibration_hash"}, "max_rel_diff": worst}
