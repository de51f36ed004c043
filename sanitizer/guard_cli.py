"""`python -m stages guard IMAGE... [--json]`: each image's predicted class, guard score and verdict, from the shipped
ONNX files alone (models/model.onnx, models/guard.onnx)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sanitizer import paths
from sanitizer.errors import SanitizeError
from sanitizer.guard import onnx_guard
from sanitizer.onnx_io import onnx_predictor
from sanitizer.sources import open_image


def read_image(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """An image file as uint8 H x W x C in the model's shape, or a SanitizeError naming the file."""
    arr, _, _ = open_image(path)
    h, w, c = shape
    if arr.shape[2] != c and c == 3:
        arr = np.repeat(arr, 3, axis=2)  # a grayscale image given to an RGB model
    if arr.shape != (h, w, c):
        raise SanitizeError(f"{path}: image is {arr.shape[1]}x{arr.shape[0]} with {arr.shape[2]} channel(s); the model "
                            f"takes {w}x{h} with {c}: resize it to the training images' size first")
    return arr


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m stages guard", description="Score images with the guard shipped "
                                 "beside the model: predicted class, suspicion score, verdict. Exit 0 when every "
                                 "image was scored (flagged or not), 2 on bad input.")
    ap.add_argument("images", nargs="+", type=Path, help="PNG or JPEG files, the size of the training images")
    ap.add_argument("--json", action="store_true", help="one JSON list on stdout, for machines")
    ap.add_argument("--model", type=Path, default=paths.ONNX_MODEL)
    ap.add_argument("--guard", type=Path, default=paths.GUARD_ONNX)
    args = ap.parse_args(argv)

    guard, meta = onnx_guard(args.guard)
    shape = tuple(json.loads(meta.get("image_shape", "null")) or ())
    if len(shape) != 3:
        raise SanitizeError(f"{args.guard}: metadata has no image_shape; re-run `dvc repro` to rebuild the guard")
    class_names = json.loads(meta.get("class_names", "[]"))
    x = np.stack([read_image(p, shape) for p in args.images])
    predicted = onnx_predictor(args.model)(x)
    scores, flags = guard(x)
    threshold = float(meta["threshold"])
    rows = [{"image": str(p), "class": int(c), "class_name": class_names[c] if c < len(class_names) else str(c),
             "score": round(float(s), 4), "threshold": round(threshold, 4), "flagged": bool(f)}
            for p, c, s, f in zip(args.images, predicted, scores, flags)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['image']}\tclass {r['class']} ({r['class_name']})\tscore {r['score']:.3f}\t"
                  f"{'FLAGGED' if r['flagged'] else 'ok'} (threshold {r['threshold']:.3f})")
    return 0
