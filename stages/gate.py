"""gate: measure the exported ONNX model (not the torch one) and block the release when it fails.

Clean accuracy on the test split, and the attack success rate (ASR) of every red-team trigger: the
share of triggered test images whose true label is not the target that the model calls the target.
metrics/gate.json is written first, then the stage exits 1 naming each failed check.
"""

from __future__ import annotations

import sys


from sanitizer import paths
from sanitizer.config import Params
from sanitizer.data import load_store
from sanitizer.errors import GateFailed
from sanitizer.fileio import write_json
from sanitizer.guard import guard_rates
from sanitizer.metrics import attack_success_rate, clean_accuracy
from sanitizer.onnx_io import onnx_predictor
from sanitizer.review_page import write_review_page
from sanitizer.triggers import TRIGGERS  # metrics may know the attack; the defense never does


def run(params: Params) -> None:
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
    if paths.QUARANTINE_CSV.exists():
        write_review_page(params, gate={"passed": passed, "checks": checks, "n_test": len(test)})
    for c in checks:
        print(f"[gate] {c['name']} = {c['value']} ({c['rule']} {c['threshold']}): "
              f"{'pass' if c['passed'] else 'FAIL'}", file=sys.stderr)
    failed = [f"{c['name']}={c['value']} (must be {c['rule']} {c['threshold']})" for c in checks if not c["passed"]]
    if failed:
        raise GateFailed("release blocked: " + "; ".join(failed))
