"""python -m bench.selftest: the gate's two attack-free checks, measured: canaries and the residual-backdoor scan.

Every unit runs the pipeline's own functions on params.yaml as shipped with a dataset profile (bench/profiles/), as
bench.defense does, and measures what the gate measures, on the torch model (the gate's ONNX model matches it within
advanced.export.atol):
- canary: the shipped defense with the canaries, with or without a red-team attack: clean accuracy, the attack's ASR,
  each canary's ASR and recall (share quarantined), and the residual-backdoor scan of the released model;
- nocanary: the same run without canaries (canary.rate: 0): the clean-accuracy and time baseline;
- off: no defense, with the canaries: they must implant (ASR >= 0.9), or they measure nothing;
- undefended / oracle / clean: no defense and no canaries, on the attacked set, on it without the samples the attack
  touched, and on the clean set: the scan's detection and false-alarm rows.
Writes bench/results/selftest.json and selftest.md (with selftest.meta.json). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.defense import (ROOT, case_params, evaluate, machine, merge, reference_throughput, train_undefended)
from sanitizer.canary import TRUTH_COLUMNS
from sanitizer.config import Params
from sanitizer.data import make_store
from sanitizer.ingestion import ingest
from sanitizer.metrics import canary_results
from sanitizer.models import model_spec
from sanitizer.pipeline import defend
from sanitizer.scan import scan_model
from sanitizer.sources import read_source
from sanitizer.train import channel_stats, predict_logits, to_tensor

KINDS = ("canary", "nocanary", "off", "undefended", "oracle", "clean")


CANARY_RATE = 0.03  # canary.rate of the canary and off units (params.yaml ships 0: docs/method.md, Canaries)


def unit_params(dataset: str, attack: str | None, rate: float, seed: int, kind: str) -> Params:
    """params.yaml with the dataset's profile, the unit's red team (none: badnets at rate 0, which plants nothing),
    seed, defense (full for canary and nocanary units, else off) and canaries (on for canary and off units)."""
    base = case_params(dataset, attack or "badnets", rate if attack else 0.0,
                       "full" if kind in ("canary", "nocanary") else "off")
    canary = CANARY_RATE if kind in ("canary", "off") else 0.0
    return Params.model_validate(merge(base.model_dump(mode="json"), {"seed": seed, "canary": {"rate": canary}}))


def run_unit(task: tuple) -> dict:
    """(dataset, attack or None, rate, seed, kind, threads) -> one row."""
    dataset, attack, rate, seed, kind, threads = task
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params = unit_params(dataset, attack, rate, seed, kind)
    t0 = time.perf_counter()
    data = ingest(params)
    source = read_source(params.data.source, params.data.path, params.data.test_size, params.seed)
    x_test, y_test = source.test.x, source.test.y.astype(np.int64)
    train = data.train
    if kind in ("canary", "nocanary"):
        defended = defend(params, train, data.rules, device)
        model, quarantined = defended.model, set(defended.quarantined.ids)
    else:
        touched = {r[0] for r in data.truth_rows}
        keep = np.flatnonzero(~np.isin(train.ids, list(touched))) if kind == "oracle" else np.arange(len(train))
        spec = model_spec(train.image_shape, len(train.class_names), params.model.width, *channel_stats(train.x))
        model, quarantined = train_undefended(params, train.subset(keep), data.rules, spec, device), set()
    seconds = time.perf_counter() - t0
    model.eval()

    def predict(images: np.ndarray) -> np.ndarray:
        return predict_logits(model, to_tensor(images, device)).argmax(1).cpu().numpy()

    ca, asr_each = evaluate(model, params, x_test, y_test, device)
    asr = max(asr_each.values(), default=None)
    row = {"dataset": dataset, "attack": attack, "poison_rate": rate if attack else 0.0, "seed": seed, "kind": kind,
           "target": params.redteam.target if attack else None, "clean_accuracy": round(ca, 4),
           "asr": round(asr, 4) if attack else None, "seconds": round(seconds, 1)}
    test = make_store(x_test, y_test, [str(i) for i in range(len(y_test))], train.class_names)
    row["canaries"] = canary_results(params, predict, test, quarantined,
                                     truth=pd.DataFrame(data.canary_rows, columns=TRUTH_COLUMNS))
    t1 = time.perf_counter()
    optimise_on, measure_on = data.calibration, test
    report, _ = scan_model(model, optimise_on, measure_on, predict, params.gate.max_scan_anomaly, device, params.seed)
    row["scan"] = {"flagged": report["flagged"], "seconds": round(time.perf_counter() - t1, 1),
                   "anomaly_index": [c["anomaly_index"] for c in report["classes"]],
                   "mask_area": [c["mask_area"] for c in report["classes"]],
                   "success": [c["success"] for c in report["classes"]]}
    return row


def tasks(datasets, attacks, rates, seeds, kinds, threads) -> list[tuple]:
    """Units in the order they run, most telling first (results are written after each, so a stopped run keeps its
    rows): per dataset, the canary, off and nocanary units without an attack on the first seed; the clean models
    (every seed); the undefended and canary units with each attack at the highest rate, then at the others; the canary
    and nocanary units without an attack on the other seeds; the nocanary and oracle units with each attack."""
    out = []
    rates = sorted(rates, reverse=True)
    for dataset in datasets:
        def units(kind, attack_rates, unit_seeds):
            return [(dataset, a, r, s, kind, threads) for s in unit_seeds for r in attack_rates
                    for a in (attacks if r else [None])] if kind in kinds else []

        out += units("canary", [0.0], seeds[:1]) + units("off", [0.0], seeds[:1]) + units("nocanary", [0.0], seeds[:1])
        out += units("clean", [0.0], seeds)
        for r in rates:
            out += units("undefended", [r], seeds[:1]) + units("canary", [r], seeds[:1])
        for s in seeds[1:]:
            out += units("canary", [0.0], [s]) + units("nocanary", [0.0], [s])
        for r in rates:
            out += units("nocanary", [r], seeds[:1]) + units("oracle", [r], seeds[:1])
    return out


def fmt(v) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def summary(rows: list[dict]) -> list[str]:
    """The issue's targets, read off the rows (each line says which rows it reads)."""
    by = {}
    for r in rows:
        by.setdefault(r["kind"], []).append(r)
    out = []
    pairs = {(r["seed"]): r for r in by.get("nocanary", []) if r["attack"] is None}
    for r in sorted((r for r in by.get("canary", []) if r["attack"] is None), key=lambda r: r["seed"]):
        base = pairs.get(r["seed"])
        extra = f"; CA {r['clean_accuracy'] - base['clean_accuracy']:+.3f} against the run without canaries" if base else ""
        out.append(f"- canaries, no attack, seed {r['seed']}: " + ", ".join(
            f"{c['family']} ASR {c['asr']:.3f} recall {c['recall']:.2f}" for c in r["canaries"]) + extra)
    for r in by.get("off", []):
        out.append(f"- canaries, no defense, seed {r['seed']}: ASR " +
                   ", ".join(f"{c['family']} {c['asr']:.3f}" for c in r["canaries"]) + " (they must implant: >= 0.9)")
    for r in sorted((r for r in by.get("canary", []) if r["attack"]), key=lambda r: (-r["poison_rate"], r["attack"])):
        out.append(f"- canaries with {r['attack']} {r['poison_rate']:.0%}: attack ASR {r['asr']:.3f}, canary ASR " +
                   ", ".join(f"{c['family']} {c['asr']:.3f} (recall {c['recall']:.2f})" for c in r["canaries"]))
    took = [r for r in by.get("undefended", []) if r["asr"] >= 0.9]
    for attack in dict.fromkeys(r["attack"] for r in by.get("undefended", [])):
        units = [r for r in took if r["attack"] == attack]
        hits = sum(r["target"] in r["scan"]["flagged"] for r in units)
        out.append(f"- scan, undefended {attack} where the attack took hold (ASR >= 0.9): target flagged in {hits} of "
                   f"{len(units)} unit(s)")
    for kind, what in (("clean", "models trained on clean data"), ("oracle", "oracle models"),
                       ("nocanary", "defended models (no canaries)"), ("canary", "defended models (canaries)")):
        units = by.get(kind, [])
        if units:
            alarms = sum(bool(r["scan"]["flagged"]) for r in units)
            out.append(f"- scan, {what}: a class flagged in {alarms} of {len(units)} unit(s)")
    clean = by.get("clean", [])
    if clean:
        ratios = [r["scan"]["seconds"] / r["seconds"] for r in clean]
        out.append(f"- scan cost against one clean training run (the clean units, ingest included): "
                   f"x{min(ratios):.2f}-{max(ratios):.2f}")
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Self-test benchmark: canaries and the residual-backdoor scan", "",
             f"{meta['machine']} ({meta['reference_images_per_second']:.0f} training images/s a worker); the units took "
             f"{sum(r['seconds'] + r['scan']['seconds'] for r in rows) / 60:.0f} worker-minutes, {meta['jobs']} at a time "
             f"with {meta['threads']} thread(s) each. Generated by `python -m bench.selftest`. Wall times moved with the "
             "load of the machine (other jobs ran beside): compare seconds only within a row.", "",
             *summary(rows), "",
             "| dataset | attack | rate | seed | kind | CA | ASR | canaries: ASR / recall | scan flags | target flagged "
             "| s | scan s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        canaries = ", ".join(f"{c['family']}->{c['target']}: {c['asr']:.3f} / {c['recall']:.2f}" for c in r["canaries"])
        hit = None if r["target"] is None else (r["target"] in r["scan"]["flagged"])
        lines.append(f"| {r['dataset']} | {r['attack'] or '-'} | {r['poison_rate']:.2f} | {r['seed']} | {r['kind']} | "
                     f"{fmt(r['clean_accuracy'])} | {fmt(r['asr'])} | {canaries or '-'} | {r['scan']['flagged']} | "
                     f"{fmt(hit)} | {r['seconds']} | {r['scan']['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.selftest", description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="cifar10")
    ap.add_argument("--attacks", default="badnets,blend,sig,wanet")
    ap.add_argument("--rates", default="0.05,0.1")
    ap.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "selftest.json")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out and run only the others")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the rows and meta in --out")
    args = ap.parse_args(argv)
    if args.render:
        from sanitizer.fileio import write_text

        meta = json.loads(args.out.with_suffix(".meta.json").read_text())
        write_text(args.out.with_suffix(".md"), markdown(json.loads(args.out.read_text()), meta))
        return 0
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    todo = tasks(args.datasets.split(","), args.attacks.split(","), [float(r) for r in args.rates.split(",")],
                 [int(s) for s in args.seeds.split(",")], args.kinds.split(","), threads)
    t0, rows = time.perf_counter(), []
    if args.resume and args.out.exists():
        rows = json.loads(args.out.read_text())
        done = {key(r) for r in rows}
        todo = [t for t in todo if (t[0], t[1], t[2] if t[1] else 0.0, t[3], t[4]) not in done]
    throughput = reference_throughput(threads)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_unit, t) for t in todo]
        for f in as_completed(futures):
            rows.append(f.result())
            r = rows[-1]
            print(f"[selftest] {len(rows)}/{len(todo)} {r['dataset']} {r['attack']} {r['poison_rate']} seed {r['seed']} "
                  f"{r['kind']}: CA {r['clean_accuracy']} ASR {r['asr']} canaries "
                  f"{[(c['asr'], c['recall']) for c in r['canaries']]} scan {r['scan']['flagged']}", file=sys.stderr)
            write(args.out, rows, t0, throughput, args.jobs, threads)
    return 0


def key(r: dict) -> tuple:
    return r["dataset"], r["attack"], r["poison_rate"], r["seed"], r["kind"]


def write(out: Path, rows: list[dict], t0: float, throughput: float, jobs: int, threads: int) -> None:
    from sanitizer.fileio import write_json, write_text

    rows = sorted(rows, key=lambda r: (r["dataset"], r["kind"], r["attack"] or "", r["poison_rate"], r["seed"]))
    meta = {"machine": machine(), "reference_images_per_second": throughput, "seconds": time.perf_counter() - t0,
            "jobs": jobs, "threads": threads}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, rows)
    write_json(out.with_suffix(".meta.json"), meta)
    write_text(out.with_suffix(".md"), markdown(rows, meta))


if __name__ == "__main__":
    sys.exit(main())
