"""python -m bench.spread: how much one training run differs from another, the yardstick for bench.defense.

bench.defense trains one model per row, so a gap between two rows is partly the gap between two training
runs. This trains the undefended model (`none`) of a dataset profile on its clean training set (poison rate 0) once per
seed and reports each run's clean accuracy and, for the guard's adversarial check, the TPR of
`mahalanobis@released` on PGD (L-inf eps 8/255, 10 steps) at the guard's calibrated threshold, on the same
calibration and evaluation split as bench.defense. Writes bench/results/spread.json and spread.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bench.defense import (EPS, PGD_STEPS, ROOT, detection_rates, guard_split, load_case, machine, profiles,
                           train_undefended)
from sanitizer.config import Params
from sanitizer.detectors import adversarial_examples
from sanitizer.fileio import write_json, write_text
from bench.guard_alternatives import ALL_FAMILIES, ALL_FITTERS
from sanitizer.guard import calibrate_guard, fit_heads, guard_settings
from sanitizer.models import model_spec
from sanitizer.train import channel_stats, predict_logits, to_tensor


def run_seed(task: tuple) -> dict:
    dataset, seed, threads = task
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    params, data, x_test, y_test, _, _ = load_case(dataset, "badnets", 0.0)  # rate 0: nothing poisoned
    train = data.train
    spec = model_spec(train.image_shape, len(train.class_names), params.model.width, *channel_stats(train.x))
    model = train_undefended(params.model_copy(update={"seed": seed}), train, data.rules, spec, device).eval()
    return {"dataset": dataset, "seed": seed, **measure(model, params, data.rules, train, x_test, y_test, device),
            "seconds": round(time.perf_counter() - t0, 1)}


def measure(model, params, rules, train, x_test: np.ndarray, y_test: np.ndarray, device) -> dict:
    """Clean accuracy on the whole test split; mahalanobis@released fitted on `train`, calibrated and measured
    against PGD on bench.defense's split."""
    x_all = to_tensor(x_test, device)
    accuracy = float((predict_logits(model, x_all).argmax(1).cpu().numpy() == y_test).mean())
    test_idx, calibration = guard_split(params, x_test, y_test, train.class_names)
    only = guard_settings(params, rules, ["mahalanobis@released"], None)
    models = {"released": model, "isolation": model}
    heads = fit_heads(only, models, train, train.subset(np.arange(0)), device, ALL_FITTERS, ALL_FAMILIES)
    guard, report = calibrate_guard(only, models, heads, calibration, device, len(test_idx))
    x_eval, y_eval = x_all[test_idx], torch.from_numpy(y_test[test_idx]).to(device)
    x_pgd = adversarial_examples(model, x_eval, y_eval, PGD_STEPS["pgd"], EPS)
    with torch.no_grad():
        clean, pgd = (guard(x)[0].cpu().numpy() for x in (x_eval, x_pgd))
    rates = detection_rates(pgd, clean, report["threshold"])
    return {"clean_accuracy": round(accuracy, 4), "pgd_tpr": rates["tpr"], "fpr": rates["fpr"], "pgd_auroc": rates["auroc"]}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Run-to-run spread", "", f"Machine: {meta['machine']}.", "",
             "The undefended model (`defense.method: off`) of each profile trained on the clean training set, once "
             "per seed. clean_accuracy on the whole test split; pgd_tpr and fpr of `mahalanobis@released` at the "
             f"guard's calibrated threshold ({meta['guard_fpr']:.0%} FPR, {meta['guard_confidence']:.0%} confidence) on "
             "bench.defense's calibration split.", "",
             "| dataset | seed | clean_accuracy | pgd_tpr | fpr | pgd_auroc | seconds |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {r['seed']} | {r['clean_accuracy']:.3f} | {r['pgd_tpr']:.3f} | {r['fpr']:.3f} | "
              f"{r['pgd_auroc']:.3f} | {r['seconds']} |" for r in rows]
    for dataset in sorted({r["dataset"] for r in rows}):
        ca = [r["clean_accuracy"] for r in rows if r["dataset"] == dataset]
        tpr = [r["pgd_tpr"] for r in rows if r["dataset"] == dataset]
        spread = f", standard deviation {statistics.stdev(ca):.3f}" if len(ca) > 1 else ""
        lines += ["", f"{dataset}: clean accuracy {min(ca):.3f}-{max(ca):.3f}{spread}; "
                  f"PGD TPR {min(tpr):.3f}-{max(tpr):.3f}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.spread", description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="cifar10", choices=sorted(profiles()))
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    t0 = time.perf_counter()
    # spawn: a forked worker inherits torch's thread pool mid-state and can hang in its first parallel op
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(pool.map(run_seed, [(args.dataset, s, threads) for s in seeds]))
    for r in rows:
        print(f"[spread] {r['dataset']} seed {r['seed']}: CA {r['clean_accuracy']:.3f} PGD TPR {r['pgd_tpr']:.3f} "
              f"FPR {r['fpr']:.3f}", file=sys.stderr)
    meta = {"machine": machine(), "wall_seconds": round(time.perf_counter() - t0, 1), "profile": profiles()[args.dataset],
            "guard_fpr": Params().guard.fpr, "guard_confidence": Params().advanced.guard.confidence}
    write_json(args.out / "spread.json", rows)
    write_text(args.out / "spread.md", markdown(rows, meta))
    print(f"[spread] wrote {args.out / 'spread.md'} ({meta['wall_seconds'] / 60:.1f} min)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
