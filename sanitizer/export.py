"""ONNX export of the released model and its guard, each checked against torch in onnxruntime.

Input `input`: float32 [N, C, H, W] pixels in [0, 1] (normalization is inside the graph); the model's output
`logits`: [N, classes]; the guard's `score` and `flag`. metadata_props carry the provenance.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from sanitizer.errors import SanitizeError
from sanitizer.fileio import atomic_path
from sanitizer.onnx_io import parity
from sanitizer.train import to_tensor

def export_onnx(model: torch.nn.Module, image_shape: tuple[int, int, int], path: Path, opset: int) -> None:
    h, w, c = image_shape
    example = torch.rand(2, c, h, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not the user's concern
        torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=65536)}},
                          opset_version=opset, external_data=False, verbose=False)


def write_model_onnx(model: torch.nn.Module, image_shape, path: Path, opset: int, atol: float, meta: dict,
                     samples: np.ndarray) -> float:
    """Export `model` to `path` with `meta` as its metadata_props, checked, and refused when onnxruntime differs from
    torch by more than `atol` on `samples`. Returns the largest difference."""
    import onnx

    with atomic_path(path) as tmp:
        export_onnx(model, image_shape, tmp, opset)
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto, full_check=True)
        onnx.helper.set_model_props(proto, meta)
        onnx.save(proto, str(tmp))
        max_diff = parity(model, tmp, samples)
        if not max_diff <= atol:  # also catches NaN
            raise SanitizeError(f"{path}: onnxruntime differs from torch by {max_diff:.2e} > advanced.export.atol={atol}; "
                                "the export is refused")
    return max_diff


def write_guard_onnx(guard, report: dict, image_shape, path: Path, opset: int, model_meta: dict,
                     calibration: np.ndarray) -> float:
    """Export the guard (sanitizer/guard.py) with its calibration in the metadata, and check onnxruntime against torch
    on the calibration images. Returns the largest relative difference."""
    from sanitizer.guard import export_guard, onnx_guard

    meta = {"producer": "backdoor-sanitizer guard", "threshold": repr(report["threshold"]),
            "target_fpr": str(report["target_fpr"]), "confidence": str(report["confidence"]),
            "check_size": str(report["check_size"]), "calibration_fpr": str(report["calibration_fpr"]),
            "calibration_hash": report["calibration_hash"], "n_calibration": str(report["n_calibration"]),
            "detectors": json.dumps(report["detectors"]), "left_out": json.dumps(report["left_out"]),
            "image_shape": json.dumps(list(image_shape)),
            "outputs": "score float32 [N] (largest calibrated detector score), flag bool [N] (score > threshold)",
            **{k: model_meta[k] for k in ("run", "data_hash", "clean_data_hash", "params_hash", "class_names",
                                          "input")}}
    with atomic_path(path) as tmp:
        export_guard(guard, image_shape, tmp, opset, meta)
        scores, _ = onnx_guard(tmp)[0](calibration)
        with torch.no_grad():
            ref = guard(to_tensor(calibration, torch.device("cpu")))[0].numpy()
        worst = float(np.max(np.abs(scores - ref) / np.maximum(1.0, np.abs(ref)))) if len(ref) else 0.0
        if not worst <= 1e-3:
            raise SanitizeError(f"{path}: onnxruntime's guard scores differ from torch's by {worst:.2e} (relative); "
                                "the export is refused")
    return worst
