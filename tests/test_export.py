"""export: the ONNX file matches torch on real samples, any batch size, and carries its provenance."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import torch

from sanitizer.data import load_store
from sanitizer.models import load_checkpoint
from sanitizer.train import to_tensor


def test_onnx_matches_torch_on_real_samples_with_dynamic_batch(pipeline):
    model, _ = load_checkpoint(pipeline / "models/model.pt", torch.device("cpu"))
    model.eval()
    test = load_store(pipeline / "data/ingested/test.npz")
    sess = ort.InferenceSession(str(pipeline / "models/model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == "batch"
    for bs in (1, 5, 100, len(test)):
        x = to_tensor(test.x[:bs], torch.device("cpu"))
        with torch.no_grad():
            ref = model(x).numpy()
        out = sess.run(["logits"], {"input": x.numpy()})[0]
        assert out.shape == (bs, 10)
        assert np.abs(out - ref).max() < 1e-4
        assert (out.argmax(1) == ref.argmax(1)).all()


def test_onnx_metadata_carries_provenance(pipeline):
    meta = ort.InferenceSession(str(pipeline / "models/model.onnx"),
                                providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    ingest = json.loads((pipeline / "metrics/ingest.json").read_text())
    assert meta["data_hash"] == ingest["data_hash"]
    assert len(meta["params_hash"]) == 64
    assert json.loads(meta["class_names"]) == [str(i) for i in range(10)]
    assert "isolation_precision" in json.loads(meta["metrics"])["isolate"]
