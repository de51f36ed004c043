"""gate: measure the exported ONNX model (not the torch one) and block the release when it fails.

Clean accuracy on the test split; the attack success rate (ASR) of every red-team trigger (the share of triggered
test images whose true label is not the target that the model calls the target); each canary's ASR and the share of
its samples the quarantine holds (the self-test, sanitizer/canary.py; the guard's flag rate on its triggered images is
reported); and the residual-backdoor scan of the released
model (sanitizer/scan.py), which needs no trigger. metrics/gate.json is written first, then the stage exits 1 naming
each failed check.
"""

from __future__ import annotations

import sys

import pandas as pd

from sanitizer import paths, runs
from sanitizer.config import Params
from sanitizer.data import load_store, write_png
from sanitizer.errors import GateFailed, SanitizeError
from sanitizer.fileio import atomic_dir, write_json
from sanitizer.guard import guard_rates, onnx_guard
from sanitizer.metrics import backdoor_asr, canary_results, clean_accuracy
from sanitizer.models import load_checkpoint
from sanitizer.onnx_io import onnx_predictor, parity
from sanitizer.review_page import write_review_page
from sanitizer.scan import scan_model, trigger_picture
from sanitizer.train import pick_device
from sanitizer.triggers import backdoors  # metrics may know the attack; the defense never does


def check(name: str, value: float, threshold: float, rule: str) -> dict:
    passed = value >= threshold if rule == ">=" else value <= threshold
    return {"name": name, "value": round(value, 4), "threshold": threshold, "rule": rule, "passed": bool(passed)}


def scan_release(params: Params, test, predict) -> dict | None:
    """Scan models/model.pt, checked first to be the exported model, on the calibration images; each reversed trigger's
    success is measured on the ONNX model. Writes the triggers' pictures to data/quarantine/scan (empty: no scan)."""
    with atomic_dir(paths.SCAN_IMAGES) as out:
        if params.gate.max_scan_anomaly is None:
            return None
        device = pick_device(params.device)
        model, _ = load_checkpoint(paths.MODEL, device)
        model.eval()
        diff = parity(model.cpu(), paths.ONNX_MODEL, test.x)
        if not diff <= params.advanced.export.atol:
            raise SanitizeError(f"{paths.ONNX_MODEL}: is not the export of {paths.MODEL} (logits differ by {diff:.2e}); "
                                "re-run `dvc repro export`")
        report, triggers = scan_model(model.to(device), load_store(paths.CALIBRATION_STORE), test, predict,
                                      params.gate.max_scan_anomaly, device, params.seed)
        for c in report["classes"]:
            c["image"] = f"{paths.SCAN_IMAGES.name}/class-{c['class']:04d}.png"
            write_png(out / f"class-{c['class']:04d}.png", trigger_picture(triggers.mask[c["class"]],
                                                                           triggers.pattern[c["class"]]))
    return report


def run(params: Params) -> None:
    run_id = runs.run_id("gate", params, runs.begin("gate", "ingest", "isolate", "quarantine", "unlearn", "export"))
    test = load_store(paths.TEST_STORE)
    predict = onnx_predictor(paths.ONNX_MODEL)
    gp, rt = params.gate, params.redteam
    ca = clean_accuracy(predict, test.x, test.labels)
    checks = [check("clean_accuracy", ca, gp.min_clean_accuracy, ">=")]
    asr = {door.name: backdoor_asr(predict, test.x, test.labels, len(test.class_names), door)
           for door in backdoors(rt)}
    checks += [check(f"asr:{name}", value, gp.max_asr, "<=") for name, value in asr.items()]
    manifest = pd.read_csv(paths.QUARANTINE_CSV, dtype={"id": str}, keep_default_na=False)
    shipped_guard = onnx_guard(paths.GUARD_ONNX)
    canaries = canary_results(params, predict, test, set(manifest.loc[manifest["quarantined"] == 1, "id"]),
                              lambda x: shipped_guard[0](x)[1])
    for c in canaries:  # ingest refuses a canary without samples, so each has a recall
        checks += [check(f"asr:{c['canary']}", c["asr"], gp.max_asr, "<="),
                   check(f"recall:{c['canary']}", c["recall"], gp.min_canary_recall, ">=")]
    scan = scan_release(params, test, predict)
    if scan:
        checks.append(check("scan:flagged_classes", len(scan["flagged"]), 0, "<="))
    guard = guard_rates(params, test, checks, shipped_guard)
    passed = all(c["passed"] for c in checks)
    write_json(paths.metrics_file("gate"), {
        "run": run_id, "passed": passed, "clean_accuracy": round(ca, 4), "min_clean_accuracy": gp.min_clean_accuracy,
        "asr": {k: round(v, 4) for k, v in asr.items()}, "max_asr": gp.max_asr,
        "target": {door.name: door.target for door in backdoors(rt)}, "canaries": canaries, "scan": scan,
        "n_test": len(test), "guard": guard, "checks": checks,
    })
    write_review_page(params, gate={"passed": passed, "checks": checks, "n_test": len(test), "scan": scan})
    for c in checks:
        print(f"[gate] {c['name']} = {c['value']} ({c['rule']} {c['threshold']}): "
              f"{'pass' if c['passed'] else 'FAIL'}", file=sys.stderr)
    failed = [f"{c['name']}={c['value']} (must be {c['rule']} {c['threshold']})" for c in checks if not c["passed"]]
    if failed:
        raise GateFailed("release blocked: " + "; ".join(failed))
