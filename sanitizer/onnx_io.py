"""Running the exported ONNX files (the model and its guard) with onnxruntime alone, as users will; and checking the
model's file against the torch model it was exported from."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from sanitizer.errors import SanitizeError


OUTPUTS = {"model": ("logits",), "guard": ("score", "flag")}  # each file's graph outputs, by what it is
MAX_ONNX_MB = 2048  # protobuf's own limit on one file


def open_session(path: Path, what: str):
    """An onnxruntime session on `path`, refused unless it is a regular file holding the `what` ("model" or "guard")
    graph: one input named "input" and the outputs OUTPUTS[what]."""
    import onnxruntime as ort

    from sanitizer.untrusted import read_regular

    fix = f"pass the {what} file (models/{what}.onnx; `dvc repro` writes it)"
    data = read_regular(path, MAX_ONNX_MB, "ONNX files' fixed limit", fix)  # the bytes checked are the bytes run
    try:
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - missing, truncated or foreign file: one meaning
        raise SanitizeError(f"{path}: not a loadable ONNX {what} ({type(err).__name__}); {fix}") from None
    inputs, outputs = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
    if inputs != ["input"] or not set(OUTPUTS[what]) <= set(outputs):
        raise SanitizeError(f"{path}: an ONNX graph with inputs {inputs[:3]} and outputs {outputs[:3]}, not the {what} "
                            f"(input 'input', outputs {list(OUTPUTS[what])}); {fix}")
    return sess


def input_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 N x H x W x C -> the graphs' input, float32 [n, C, H, W] in [0, 1], a batch at a time."""
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size].transpose(0, 3, 1, 2).astype(np.float32) / 255.0


PARITY_BATCHES = (1, 7, 64)


def parity(model, onnx_path: Path, images: np.ndarray) -> float:
    """Largest |onnxruntime - torch| logit over several batch sizes of real samples (the first max(PARITY_BATCHES) of
    `images`); `model` on the CPU."""
    import torch

    sess = open_session(onnx_path, "model")
    x = images[:max(PARITY_BATCHES)].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    worst = 0.0
    for bs in PARITY_BATCHES:
        with torch.no_grad():
            ref = model(torch.from_numpy(x[:bs])).numpy()
        out = sess.run(["logits"], {"input": x[:bs]})[0]
        worst = max(worst, float(np.abs(out - ref).max()))
    return worst


def onnx_predictor(path: Path, batch_size: int = 512) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 N x H x W x C -> predicted labels, through onnxruntime."""
    sess = open_session(path, "model")

    def predict(images: np.ndarray) -> np.ndarray:
        out = [sess.run(["logits"], {"input": x})[0].argmax(axis=1) for x in input_batches(images, batch_size)]
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    return predict
