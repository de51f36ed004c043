"""gate: measure the exported ONNX model (not the torch one) and block the release when it fails.

Clean accuracy on the test split, and the attack success rate (ASR) of every red-team trigger: the
share of triggered test images whose true label is not the target that the model calls the target.
metrics/gate.json is written first, then the stage exits 1 naming each failed check.
"""

from __future__ import annotations

import sys

import numpy as np

from stages import paths
from stages.config import Params
from stages.data import load_store
from stages.errors import GateFailed, SanitizeError
from stages.fileio import write_json
from stages.onnx_io import onnx_predictor


def clean_accuracy(predict, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predict(images) == labels))


def attack_success_rate(predict, images: np.ndarray, labels: np.ndarray, trigger, target: int) -> float:
    """Share of triggered images, true label not the target, classified as the target."""
    keep = labels != target
    if not keep.any():
        return float("nan")
    return float(np.mean(predict(trigger(images[keep])) == target))


def guard_rates(params: Params, test, checks: list) -> dict:
    """The shipped guard (models/guard.onnx) on the test split: false-positive rate on the clean images and,
    with a red team, true-positive rate on the triggered non-target ones that ingest wrote; checked by
    gate.min_guard_tpr."""
    from stages.guard import onnx_guard

    score, meta = onnx_guard(paths.GUARD_ONNX)
    out = {"threshold": float(meta.get("threshold", "nan")), "fpr": round(float(np.mean(score(test.x)[1])), 4)}
    minimum = params.gate.min_guard_tpr
    if params.redteam.attack:
        triggered = load_store(paths.REDTEAM_TEST).x
        out["tpr"] = round(float(np.mean(score(triggered)[1])), 4) if len(triggered) else float("nan")
    if minimum is not None:
        if "tpr" not in out:
            raise SanitizeError("params.yaml: gate.min_guard_tpr is set but redteam.attack is null, so there are no "
                                "triggered images to measure the guard on; set gate.min_guard_tpr: null")
        checks.append({"name": "guard_tpr", "value": out["tpr"], "threshold": minimum, "rule": ">=",
                       "passed": out["tpr"] >= minimum})
    return out


def run(params: Params) -> None:
    from stages.triggers import TRIGGERS  # metrics may know the attack; the defense never does

    test = load_store(paths.TEST_STORE)
    predict = onnx_predictor(paths.ONNX_MODEL)
    gp, rt = params.gate, params.redteam
    checks = []
    ca = clean_accuracy(predict, test.x, test.labels)
    checks.append({"name": "clean_accuracy", "value": round(ca, 4), "threshold": gp.min_clean_accuracy,
                   "rule": ">=", "passed": ca >= gp.min_clean_accuracy})
    asr = {}
    if rt.attack:
        value = attack_success_rate(predict, test.x, test.labels, lambda x: TRIGGERS[rt.attack](x, rt), rt.target)
        asr[rt.attack] = round(value, 4)
        checks.append({"name": f"asr:{rt.attack}", "value": round(value, 4), "threshold": gp.max_asr,
                       "rule": "<=", "passed": value <= gp.max_asr})
    guard = guard_rates(params, test, checks)
    passed = all(c["passed"] for c in checks)
    write_json(paths.metrics_file("gate"), {
        "passed": passed, "clean_accuracy": round(ca, 4), "min_clean_accuracy": gp.min_clean_accuracy,
        "asr": asr, "max_asr": gp.max_asr, "target": rt.target if rt.attack else None,
        "n_test": len(test), "guard": guard, "checks": checks,
    })
    from stages.review_page import write_review_page

    if paths.QUARANTINE_CSV.exists():
        write_review_page(params, gate={"passed": passed, "checks": checks, "n_test": len(test)})
    for c in checks:
        print(f"[gate] {c['name']} = {c['value']} ({c['rule']} {c['threshold']}): "
              f"{'pass' if c['passed'] else 'FAIL'}", file=sys.stderr)
    failed = [f"{c['name']}={c['value']} (must be {c['rule']} {c['threshold']})" for c in checks if not c["passed"]]
    if failed:
        raise GateFailed("release blocked: " + "; ".join(failed))
