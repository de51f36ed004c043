"""python -m bench.defense: how well the shipped defense removes each attack, against no defense and the oracle.

Every unit runs the pipeline's own functions (sanitizer.ingestion, sanitizer.pipeline: the ones the stages call)
on params.yaml as shipped, with a dataset profile from bench/profiles/ (the data, and the budget where it differs)
and the case's red team. Rows per dataset, attack and poison rate:
- none: the undefended model (defense.method: off), the same budget;
- oracle: the same training with every sample the attack touched removed (the floor for ASR);
- abl: plain ABL (defense.method: abl): the 1% lowest-loss samples, gradient ascent;
- full: the shipped defense (defense.method: full), whose quarantine counts isolation's suspects and the second
  look's flags alike;
- detector:<name>: each training-set detector alone ranks and cuts as the loss does (isolation only).
The guard rows calibrate the shipped guard and each detector alone as export does. The defenses never see the red
team's truth, which only the metrics read.

Writes bench/results/defense.json and defense.md, guard.json and guard.md (with their .meta.json). --quick runs a
small digits subset into bench/results/quick/. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import multiprocessing
import copy
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.guard_alternatives import ALL_FAMILIES, ALL_FITTERS, ALL_NEEDS_QUARANTINE
from sanitizer.config import PARAMS_FILE, Params
from sanitizer.data import Store, calibration_split, make_store
from sanitizer.detectors import (STRIP_ALPHA, STRIP_BLENDS, TRAINING_DETECTORS, adversarial_examples, auroc, robust_z,
                                 strip)
from sanitizer.fileio import write_json, write_text
from sanitizer.guard import (GuardSettings, calibrate_guard, calibrate_scores, calibrated_threshold, fit_heads,
                             fpr_shares, guard_settings)
from sanitizer.ingestion import ingest
from sanitizer.isolation import Selection, adaptive_selection, selection_for, train_isolation
from sanitizer.metrics import backdoor_asr, clean_accuracy
from sanitizer.models import build_model, model_spec
from sanitizer.pipeline import defend
from sanitizer.sources import read_source
from sanitizer.train import predict_logits, to_tensor, train_settings
from sanitizer.unlearning import sanitize, unlearning_for

ROOT = Path(__file__).resolve().parents[1]
PROFILE_DIR = ROOT / "bench" / "profiles"
ATTACKS = ["badnets", "blend", "sig", "wanet"]  # the ones the defense was developed on: the default rows
# Issue #37's attacks, which the defense was not built for: rows of their own (--attacks unseen, bench/results/unseen).
UNSEEN_ATTACKS = ["adap_blend", "adap_patch", "bpp", "label_consistent", "all_to_all", "multi_target"]
RATES = [0.01, 0.05, 0.10]
DEFENSES = ["abl", "full"]  # defense.method values benchmarked beside none and oracle
UNITS = ["defenses", "none", "oracle"]  # the units of work per case (run_task's kinds, less "adversarial")
KEYS = ["dataset", "attack", "poison_rate", "defense", "clean_accuracy", "asr", "isolation_precision",
        "isolation_recall", "seconds"]
# Each alone: rows "detector:<name>" (isolation only); the pipeline scores TRAINING_DETECTORS.
DETECTORS = [*TRAINING_DETECTORS, "spectral", "input_spectral"]
# Guard rows for comparison, not shipped.
GUARD_ALTERNATIVES = ["disagreement@isolation", "quarantine_knn@isolation", "quarantine_probe@isolation",
                      "mahalanobis@released", "mahalanobis@isolation", "knn@isolation", "knn@released", "mismatch@released"]
EPS = 8 / 255  # FGSM and PGD (10 steps of EPS / 4), L-infinity, against the released model
PGD_STEPS = {"fgsm": 1, "pgd": 10}
GUARD_KEYS = ["dataset", "attack", "poison_rate", "detector", "tpr", "fpr", "auroc", "threshold", "seconds"]
# Every row shares one calibration/evaluation split of the test set, so one unlucky split moves every FPR together:
# the shipped guard is also recalibrated on this many other splits (seeds after params.seed), for the spread.
RESPLITS = 50


def profiles() -> dict[str, dict]:
    return {f.stem: yaml.safe_load(f.read_text()) or {} for f in sorted(PROFILE_DIR.glob("*.yaml"))}


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def case_params(dataset: str, attack: str, rate: float, method: str = "full") -> Params:
    """params.yaml as shipped, the dataset's profile over it, the case's red team and `defense.method`."""
    shipped = yaml.safe_load((ROOT / PARAMS_FILE).read_text())
    raw = merge(merge(shipped, profiles()[dataset]), {"redteam": {"attack": attack, "poison_rate": rate},
                                                     "defense": {"method": method}, "device": "auto"})
    return Params.model_validate(raw)


def budget(dataset: str) -> dict:
    """What the profile changes of params.yaml's model and training budget (empty: the shipped budget)."""
    profile = profiles()[dataset]
    return {k: profile[k] for k in ("model", "train") if k in profile}


def load_case(dataset: str, attack: str, rate: float):
    """The case as ingest prepares it: (params, ingested data, whole test split x and y, touched indices, backdoor
    indices). Clean accuracy and ASR are measured on the whole test split."""
    params = case_params(dataset, attack, rate)
    data = ingest(params)
    source = read_source(params.data.source, params.data.path, params.data.test_size, params.seed)
    position = {sample_id: k for k, sample_id in enumerate(data.train.ids)}
    touched = np.array(sorted(position[r[0]] for r in data.truth_rows), dtype=np.int64)
    backdoor = np.array(sorted(position[r[0]] for r in data.truth_rows if r[-1] == "backdoor"), dtype=np.int64)
    return params, data, source.test.x, source.test.y.astype(np.int64), touched, backdoor


def evaluate(model, params: Params, x_test: np.ndarray, y_test: np.ndarray, device) -> tuple[float, dict[str, float]]:
    """(clean accuracy, {backdoor: ASR}) of a torch model, by the gate's own definitions."""
    from sanitizer.triggers import backdoors

    def predict(images: np.ndarray) -> np.ndarray:
        return predict_logits(model, to_tensor(images, device)).argmax(1).cpu().numpy()

    n_classes = int(y_test.max()) + 1
    return (clean_accuracy(predict, x_test, y_test),
            {door.name: backdoor_asr(predict, x_test, y_test, n_classes, door) for door in backdoors(params.redteam)})


def train_undefended(params: Params, store: Store, rules, spec: dict, device) -> torch.nn.Module:
    """defense.method: off on `store`: fresh weights, the whole budget, nothing unlearned (unlearning.sanitize)."""
    off = params.model_copy(update={"defense": params.defense.model_copy(update={"method": "off"})})
    model = build_model(spec).to(device)
    sanitize(model, off, unlearning_for(off), train_settings(off, rules), store, store.subset(np.arange(0)), device,
             None)
    return model


def _round(v, digits: int = 4):
    return None if v is None else round(float(v), digits)


def row(case: tuple, defense: str, ca, asr: dict | None, precision, recall, seconds: float) -> dict:
    """One table row; `asr`: {backdoor: ASR}, the row's ASR their largest (each kept when there are several)."""
    dataset, attack, rate = case
    out = {"dataset": dataset, "attack": attack, "poison_rate": rate, "defense": defense,
           "clean_accuracy": _round(ca), "asr": _round(max(asr.values())) if asr else None,
           "isolation_precision": _round(precision), "isolation_recall": _round(recall), "seconds": round(seconds, 1)}
    if asr and len(asr) > 1:
        out["asr_each"] = {name: _round(v) for name, v in asr.items()}
    return out


def isolation_quality(isolated: np.ndarray, backdoor: np.ndarray) -> tuple[float, float]:
    hits = np.isin(isolated, backdoor).sum()
    return (hits / len(isolated) if len(isolated) else 0.0), (hits / len(backdoor) if len(backdoor) else float("nan"))


def run_task(task: tuple) -> tuple[list[dict], list[dict], dict | None]:
    """One unit of work: (dataset, attack, rate, kind, torch threads, defense methods), kind "none", "oracle",
    "defenses" (the methods) or "adversarial" (a clean training set; FGSM and PGD on the released model).
    Returns (defense rows, guard rows, the guard's cost or None)."""
    dataset, attack, rate, kind, threads, methods = task
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params, data, x_test, y_test, touched, backdoor = load_case(dataset, attack, rate)
    train, rules, case = data.train, data.rules, (dataset, attack, rate)
    t0 = time.perf_counter()
    if kind in ("none", "oracle"):
        from sanitizer.train import channel_stats

        spec = model_spec(train.image_shape, len(train.class_names), params.model.width, *channel_stats(train.x))
        keep = np.setdiff1d(np.arange(len(train)), touched) if kind == "oracle" else np.arange(len(train))
        model = train_undefended(params, train.subset(keep), rules, spec, device)
        return [row(case, kind, *evaluate(model, params, x_test, y_test, device), None, None,
                    time.perf_counter() - t0)], [], None

    rows, guard_rows, cost = [], [], None
    isolation = train_isolation(params, train, rules, device, DETECTORS)
    isolation_seconds = time.perf_counter() - t0
    if kind == "defenses":
        plain = selection_for(params, rules)
        for name in DETECTORS:  # each detector alone ranks and cuts, as the loss does in the adaptive selection
            score = -robust_z(torch.as_tensor(isolation.signals[name], dtype=torch.float64)).numpy()
            chosen, _ = adaptive_selection(score, train.labels, train.ids, Selection(plain.ratio, plain.max_ratio))
            rows.append(row(case, f"detector:{name}", None, None, *isolation_quality(chosen, backdoor),
                            isolation.seconds["detect_seconds"]))  # all detectors together
    for method in (methods if kind == "defenses" else ["full"]):
        t1 = time.perf_counter()
        p = case_params(dataset, attack, rate, method)
        defended = defend(p, train, rules, device, isolation)
        quarantined = np.flatnonzero(np.isin(train.ids, defended.quarantined.ids))
        ca, asr = evaluate(defended.model, p, x_test, y_test, device)
        if kind == "defenses":
            rows.append(row(case, method, ca, asr, *isolation_quality(quarantined, backdoor),
                            isolation_seconds + time.perf_counter() - t1))
        if method == "full":
            guard_rows, cost = guard_benchmark(p, rules, case, defended, x_test, y_test, device, kind)
            cost = {**cost, **isolation.seconds, "second_look": defended.look is not None}
    return rows, guard_rows, cost


def resplit_rates(clean: torch.Tensor, malicious: dict[str, tuple[torch.Tensor, np.ndarray]], y_test: np.ndarray,
                  params: Params, g: GuardSettings, shares: list[float], seeds: range) -> dict:
    """The shipped guard recalibrated on other calibration/evaluation splits of the test set, as ingest would draw
    them with other seeds: its per-detector scores on every test image (`clean`, [n, detectors]; any positive affine
    rescaling of each column, which the calibration undoes) and on malicious images (attack: (scores, the test index
    each was made from)). Per split: the scales and threshold from the calibration part (`calibrate_scores`, as
    export calibrates), FPR on the evaluation part's clean images, TPR on the malicious images made from it.
    Returns the mean and spread over the splits."""
    fprs, tprs = [], {name: [] for name in malicious}
    for seed in seeds:
        test_idx, cal_idx = calibration_split(y_test, params.data.calibration_size, seed)
        centre, scale, threshold, _ = calibrate_scores(clean[cal_idx], shares, g.fpr, g.confidence,
                                                       len(test_idx))

        def flagged(scores: torch.Tensor) -> float:  # the guard's rule: its largest scaled score over the threshold
            return float(np.mean(((scores - centre) / scale).amax(dim=1).cpu().numpy() > threshold))

        fprs.append(flagged(clean[test_idx]))
        for name, (bad, made_from) in malicious.items():
            tprs[name].append(flagged(bad[np.isin(made_from, test_idx)]))
    return {"splits": len(fprs), "fpr_mean": round(float(np.mean(fprs)), 4),
            "fpr_p95": round(float(np.quantile(fprs, 0.95)), 4),
            "fpr_over_target": round(float(np.mean(np.array(fprs) > g.fpr)), 4),
            "tpr_mean": {name: round(float(np.mean(v)), 4) for name, v in tprs.items()},
            "tpr_min": {name: round(float(np.min(v)), 4) for name, v in tprs.items()}}


def paired_times(fns, rounds: int = 7) -> list[float]:
    """Seconds of each function, the fastest of `rounds`, the functions taking turns so that the other worker's
    load weighs on all alike (timed one after the other, the guard's cost over the model's ranged 1.56-2.47
    over one benchmark; alone on the machine, 30 turns: 1.95-1.99)."""
    times = np.full((rounds, len(fns)), np.inf)
    for r in range(rounds):
        for j, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[r, j] = time.perf_counter() - t0
    return [float(t) for t in times.min(axis=0)]


def guard_split(params: Params, x_test: np.ndarray, y_test: np.ndarray, class_names: list[str]):
    """(evaluation indices, calibration store): the test split's share that calibrates the guard, as ingest holds it out."""
    test_idx, cal_idx = calibration_split(y_test, params.data.calibration_size, params.seed)
    return test_idx, make_store(x_test[cal_idx], y_test[cal_idx], [str(i) for i in cal_idx], class_names)


def detection_rates(bad: np.ndarray, clean: np.ndarray, threshold: float) -> dict:
    """TPR on malicious scores, FPR on clean ones at `threshold` (flag = score > threshold), and AUROC."""
    return {"tpr": round(float(np.mean(bad > threshold)), 4), "fpr": round(float(np.mean(clean > threshold)), 4),
            "auroc": round(auroc(torch.from_numpy(bad), torch.from_numpy(clean)), 4)}


def guard_benchmark(params: Params, rules, case: tuple, defended, x_test, y_test, device,
                    kind: str) -> tuple[list[dict], dict]:
    """The shipped guard and each of its detectors alone (plus STRIP on the isolation model, too costly to
    ship), calibrated on the calibration split at guard.fpr and measured on the rest of the test
    split: clean images (FPR) against malicious ones (TPR): the red team's triggered non-target images,
    or FGSM / PGD examples of the released model."""
    from sanitizer.triggers import backdoors

    clean, quarantined = defended.clean, defended.quarantined
    released, isolation = defended.model.eval(), defended.isolation.model.eval()
    test_idx, calibration = guard_split(params, x_test, y_test, clean.class_names)
    models = {"released": released, "isolation": isolation}
    # The shipped guard, and each detector alone, the shipped ones and the unshipped alternatives, calibrated the
    # same way: every head fitted once.
    g = guard_settings(params, rules)
    entries = [*g.detectors, *(e for e in GUARD_ALTERNATIVES if e not in g.detectors)]
    wide = guard_settings(params, rules, entries, None)
    heads = fit_heads(wide, models, clean, quarantined, device, ALL_FITTERS, ALL_FAMILIES, ALL_NEEDS_QUARANTINE)
    # Calibrated, as export does, for the FPR measured on the evaluation split's clean images.
    guard, _ = calibrate_guard(g, models, heads, calibration, device, len(test_idx))
    each, each_report = calibrate_guard(wide, models, heads, calibration, device, len(test_idx))
    entries = [e for e in entries if e not in each_report["left_out"]]
    x_cal, x_eval = to_tensor(calibration.x, device), to_tensor(x_test[test_idx], device)
    y_eval = torch.from_numpy(y_test[test_idx]).to(device)
    dataset, attack, rate = case
    cal_idx = np.setdiff1d(np.arange(len(y_test)), test_idx)
    n_classes = len(clean.class_names)

    def triggered(idx: np.ndarray) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
        """Each backdoor's triggered images made from test images `idx`, and the test index each was made from."""
        return {door.name: (to_tensor(x, device), idx[keep])
                for door in backdoors(params.redteam) for x, _, keep in [door.test_set(x_test[idx], y_test[idx],
                                                                                      n_classes)]}

    if kind == "adversarial":
        malicious = {name: (adversarial_examples(released, x_eval, y_eval, steps, EPS), test_idx)
                     for name, steps in PGD_STEPS.items()}
        rate = 0.0
    else:
        malicious = triggered(test_idx)
    bank = to_tensor(clean.x[np.random.default_rng(params.seed).permutation(len(clean))[:256]], device)
    scorers = {entry: (lambda xx, j=j: each.detector_scores(xx)[:, j]) for j, entry in enumerate(entries)}
    scorers["strip@isolation"] = lambda xx: strip(isolation, xx, bank, STRIP_BLENDS, STRIP_ALPHA)
    scorers["guard"] = lambda xx: guard(xx)[0]
    rows = []
    with torch.no_grad():
        # Every entry's clean scores from one pass of the wide guard (a pass per entry cost a third of this function);
        # malicious ones per entry, for each detector's own seconds.
        wide_cal, wide_eval = each.detector_scores(x_cal).cpu().numpy(), each.detector_scores(x_eval).cpu().numpy()
        for name, scorer in scorers.items():
            if name in entries:
                cal, clean_scores = wide_cal[:, entries.index(name)], wide_eval[:, entries.index(name)]
            else:
                cal, clean_scores = scorer(x_cal).cpu().numpy(), scorer(x_eval).cpu().numpy()
            threshold = calibrated_threshold(cal, g.fpr, g.confidence, len(test_idx))
            for attack_name, (xm, _) in malicious.items():
                t1 = time.perf_counter()
                bad = scorer(xm).cpu().numpy()
                seconds = time.perf_counter() - t1
                rows.append({"dataset": dataset, "attack": attack_name, "poison_rate": rate, "detector": name,
                             **detection_rates(bad, clean_scores, threshold),
                             "threshold": round(threshold, 4), "seconds": round(seconds, 3)})
        torch_model_seconds, torch_guard_seconds = paired_times([lambda: predict_logits(released, x_eval),
                                                                 lambda: guard(x_eval)], 3)
        # The re-splits need the calibration images' malicious versions too, made after the rows above.
        if kind == "adversarial":
            y_cal = torch.from_numpy(y_test[cal_idx]).to(device)
            cal_malicious = {name: (adversarial_examples(released, x_cal, y_cal, PGD_STEPS[name], EPS), cal_idx)
                             for name in malicious}
        else:
            cal_malicious = triggered(cal_idx)
        clean_scores = torch.empty(len(y_test), len(guard.heads), dtype=torch.float64)
        clean_scores[cal_idx] = guard.detector_scores(x_cal).double().cpu()
        clean_scores[test_idx] = guard.detector_scores(x_eval).double().cpu()
        bad = {name: (torch.cat([guard.detector_scores(xm), guard.detector_scores(cal_malicious[name][0])]).double().cpu(),
                      np.concatenate([made_from, cal_malicious[name][1]])) for name, (xm, made_from) in malicious.items()}
        shares = fpr_shares([e for e in g.detectors if e in heads], g.released_share, g.shares)
        resplit = resplit_rates(clean_scores, bad, y_test, params, g, shares,
                                range(params.seed + 1, params.seed + 1 + RESPLITS))
    model_seconds, guard_seconds = onnx_costs(released, guard, clean.image_shape, x_eval.cpu().numpy(),
                                               params.advanced.export.opset)
    cost = {"dataset": dataset, "attack": attack, "poison_rate": rate, "images": len(x_eval),
            "model_seconds": round(model_seconds, 4), "guard_seconds": round(guard_seconds, 4),
            "guard_over_model": round(guard_seconds / model_seconds, 2),
            "torch_guard_over_model": round(torch_guard_seconds / torch_model_seconds, 2), "resplit": resplit}
    return rows, cost


def onnx_costs(released, guard, image_shape, x: np.ndarray, opset: int, batch_size: int = 512) -> tuple[float, float]:
    """Seconds for the shipped files, model.onnx and guard.onnx, on `x` in onnxruntime (the guard command's batch,
    this worker's threads, `paired_times`). Moves both to the CPU: call it last."""
    import tempfile

    import onnxruntime as ort

    from sanitizer.export import export_onnx
    from sanitizer.guard import export_guard

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(released.cpu().eval(), image_shape, Path(tmp) / "model.onnx", opset)
        export_guard(guard, image_shape, Path(tmp) / "guard.onnx", opset, {})
        sessions = [ort.InferenceSession(str(Path(tmp) / name), options, providers=["CPUExecutionProvider"])
                    for name in ("model.onnx", "guard.onnx")]
    batches = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
    return tuple(paired_times([lambda s=s: [s.run(None, {"input": b}) for b in batches] for s in sessions]))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def reference_throughput(threads: int, seconds: float = 5.0) -> float:
    """Training images per second of the CIFAR profile's model (batch 128, 32x32 RGB, SGD) on random data, with one
    worker's threads: the machine's speed on the day, so that wall times of runs on other days compare (the same
    code took 46 and 80 minutes on two days, its isolation 50-63 s and 82-94 s a unit)."""
    torch.set_num_threads(threads)
    width = case_params("cifar10", "badnets", 0.0).model.width
    model = build_model(model_spec((32, 32, 3), 10, width, [0.5] * 3, [0.25] * 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(128, 3, 32, 32, generator=gen), torch.randint(0, 10, (128,), generator=gen)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(2):  # the first steps allocate and warm up
        step()
    images, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        images += len(x)
    return images / (time.perf_counter() - t0)


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Defense benchmark", "", f"Machine: {meta['machine']}. Wall time: {meta['wall_seconds'] / 60:.1f} min, "
             f"{meta['units_done']} units ({meta['jobs']} worker processes, {meta['threads']} torch thread(s) each). "
             "Reference speed before the run: "
             f"{meta['reference_images_per_second']:,.0f} training images/s (`reference_throughput`).", "",
             "Model and budget per dataset (`none` and `oracle` train for isolate + fine-tune epochs):", ""]
    for name, prof in meta["profiles"].items():
        lines.append(f"- **{name}**: `{json.dumps(prof, sort_keys=True)}`")
    lines += ["", "Defenses (`defense.method`): **none** (off, all data), **oracle** (off, the touched samples removed), "
              "**abl** (plain ABL), **full** (the shipped defense; precision and recall count every quarantined "
              "sample: isolation's and the second look's). ASR: triggered test images whose label is not the target, "
              "classified as the target. "
              "Isolation precision/recall count the samples carrying the trigger and the target label "
              "(WaNet's noise-mode samples keep their labels and are not counted).", ""]
    lines += ["| dataset | attack | rate | defense | CA | ASR | iso. precision | iso. recall | seconds |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r[k]) for k in KEYS) + " |")
    return "\n".join(lines) + "\n"


def sort_key(r: dict):
    order = ["none", "oracle", *DEFENSES, *(f"detector:{d}" for d in DETECTORS)]
    return (r["dataset"], (ATTACKS + UNSEEN_ATTACKS).index(r["attack"]), r["poison_rate"], order.index(r["defense"]))


def guard_sort_key(r: dict):
    attack, _, backdoor = r["attack"].partition(":")  # multi_target's rows are per backdoor
    return (r["dataset"], (ATTACKS + UNSEEN_ATTACKS + ["fgsm", "pgd"]).index(attack), backdoor, r["poison_rate"],
            r["detector"])


def guard_markdown(rows: list[dict], costs: list[dict], meta: dict) -> str:
    lines = ["# Guard benchmark", "", f"Machine: {meta['machine']}.", "",
             "Each detector is calibrated on the calibration split of the test set (`data.calibration_size` of "
             "each class) to a false-positive rate of at most `guard.fpr` "
             f"({Params().guard.fpr}) with probability `advanced.guard.confidence` "
             f"({Params().advanced.guard.confidence}) as measured on the rest (the bound takes in the evaluation "
             "images' own sampling noise, as export does for the gate's), and measured there: FPR on its clean "
             "images, TPR on "
             "malicious ones (red-team triggered non-target images, or FGSM / PGD, L-inf eps 8/255, PGD 10 steps "
             "of eps/4, against the released model of a clean training run, poison rate 0). `guard` "
             "is the shipped combination (largest calibrated score of its detectors, sanitizer/guard.py SHIPPED: "
             "each detector at 0 on its "
             "calibration median, 1 at its own score of the calibration rank of its share of the images the "
             "threshold may flag, SHIPPED_SHARES); the other rows are its detectors alone and unshipped alternatives "
             "(`strip@isolation` costs one forward pass per blend).", "",
             "| " + " | ".join(GUARD_KEYS) + " |", "|" + "---|" * len(GUARD_KEYS)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in GUARD_KEYS) + " |" for r in rows]
    lines += ["", "Cost, per case: isolation (LGA training) and each training-time detector on the training set; "
              "the shipped files, model.onnx alone and guard.onnx, on the evaluation images in onnxruntime (batches of "
              "512, 1 thread, the fastest of 7 turns, the two files in alternation), and the same ratio for the torch "
              "modules.", "",
              "| dataset | attack | rate | isolate s | detectors s | model s | guard s | guard / model | torch |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {c['dataset']} | {c['attack']} | {c['poison_rate']} | {c['isolate_seconds']} | "
              f"{json.dumps(c['detect_seconds'])} | {c['model_seconds']} | {c['guard_seconds']} | "
              f"{c['guard_over_model']} | {c['torch_guard_over_model']} |"
              for c in costs]
    lines += ["", f"Re-splits: every row above shares one calibration/evaluation split, so one unlucky split moves "
              f"every FPR together. The shipped guard recalibrated on {RESPLITS} other splits (`resplit_rates`): its "
              "FPR's mean, 95th percentile and share of splits over the target, and its TPR's mean and minimum.", "",
              "| dataset | attack | rate | FPR mean | FPR p95 | FPR over target | TPR mean | TPR min |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {c['dataset']} | {name} | {c['poison_rate']} | {r['fpr_mean']} | {r['fpr_p95']} | "
              f"{r['fpr_over_target']} | {r['tpr_mean'][name]} | {r['tpr_min'][name]} |"
              for c in costs if "resplit" in c for r in [c["resplit"]] for name in r["tpr_mean"]]
    return "\n".join(lines) + "\n"


def earlier_results(out: Path) -> tuple[list, list, list]:
    """The rows, guard rows and costs of `out`'s files (none when absent), for --merge."""
    if not (out / "defense.json").exists():
        return [], [], []
    return (json.loads((out / "defense.json").read_text()), json.loads((out / "guard.json").read_text()),
            json.loads((out / "guard.meta.json").read_text())["costs"])


def combined(new: tuple[list, list, list], old: tuple[list, list, list]) -> tuple[list, list, list]:
    """This run's rows, and the earlier rows that none of them replaces: a row is its case and defense (a guard row
    its case and detector, a cost its case), sorted as the tables show them."""
    def case(r: dict) -> tuple:
        return r["dataset"], r["attack"], r["poison_rate"]

    keys = [lambda r: (*case(r), r["defense"]), lambda r: (*case(r), r["detector"]), case]
    merged = []
    for fresh, earlier, key in zip(new, old, keys):
        replaced = {key(r) for r in fresh}
        merged.append(fresh + [r for r in earlier if key(r) not in replaced])
    rows, guard_rows, costs = merged
    return (sorted(rows, key=sort_key), sorted(guard_rows, key=guard_sort_key),
            sorted(costs, key=case))


def save(out: Path, results: tuple[list, list, list], meta: dict) -> None:
    rows, guard_rows, costs = results
    write_json(out / "defense.json", rows)
    write_json(out / "defense.meta.json", meta)
    write_text(out / "defense.md", markdown(rows, meta))
    write_json(out / "guard.json", guard_rows)
    write_json(out / "guard.meta.json", {**meta, "costs": costs})
    write_text(out / "guard.md", guard_markdown(guard_rows, costs, meta))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.defense", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="digits, badnets and sig at 10%%, for CI (about 2 minutes)")
    ap.add_argument("--datasets", default="digits,cifar10")
    ap.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated; 'unseen': " + ",".join(UNSEEN_ATTACKS))
    ap.add_argument("--defenses", default=",".join(DEFENSES), help="defense methods beside none and oracle")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of --out's files that this run does not replace (same case and defense)")
    ap.add_argument("--rates", default=",".join(map(str, RATES)))
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="worker processes (each uses cores/jobs torch threads)")
    ap.add_argument("--no-adversarial", action="store_true", help="skip the clean runs for FGSM and PGD")
    ap.add_argument("--units", default=",".join(UNITS),
                    help="which units per case: defenses (the --defenses methods, detectors, guard), none, oracle")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default bench/results, with --quick bench/results/quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.datasets, args.attacks, args.rates = "digits", "badnets,sig", "0.1"
    out = args.out or ROOT / "bench" / "results" / ("quick" if args.quick else "")
    datasets = args.datasets.split(",")
    attacks = UNSEEN_ATTACKS if args.attacks == "unseen" else args.attacks.split(",")
    rates, methods = [float(r) for r in args.rates.split(",")], args.defenses.split(",")
    kinds = args.units.split(",")
    unknown = [d for d in datasets if d not in profiles()] + [a for a in attacks if a not in ATTACKS + UNSEEN_ATTACKS] \
        + [m for m in methods if m not in DEFENSES] + [k for k in kinds if k not in UNITS]
    if unknown:
        ap.error(f"unknown dataset, attack, defense or unit: {unknown} (datasets: bench/profiles/*.yaml)")
    os.chdir(ROOT)
    for d in datasets:
        path = profiles()[d].get("data", {}).get("path")
        if path and not Path(path).exists():
            ap.error(f"{path} not found: put the {d} data there or leave {d} out of --datasets")

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    # The costliest units first, so the pool ends together.
    tasks = [(d, a, r, kind, threads, methods) for d in datasets for a in attacks for r in rates for kind in kinds]
    if not args.no_adversarial:  # a clean training run per dataset, for FGSM and PGD against its released model
        tasks += [(d, "badnets", 0.0, "adversarial", threads, methods) for d in datasets]
    tasks.sort(key=lambda t: (t[0] != "cifar10", t[3] != "defenses"))
    reference = reference_throughput(threads)
    print(f"[bench] reference speed: {reference:,.0f} training images/s", file=sys.stderr, flush=True)
    rows, guard_rows, costs, t0 = [], [], [], time.perf_counter()
    kept = earlier_results(out) if args.merge else ([], [], [])
    meta = {"machine": machine(), "jobs": args.jobs, "threads": threads,
            "reference_images_per_second": round(reference), "params": "params.yaml as shipped",
            "profiles": {d: profiles()[d] for d in datasets},
            "budget": {d: budget(d) or "params.yaml's" for d in datasets}}
    # spawn: a forked worker inherits torch's thread pool mid-state and can hang in its first parallel op
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_task, t): t for t in tasks}
        for done, future in enumerate(as_completed(futures), 1):
            unit_rows, unit_guard_rows, cost = future.result()
            rows += unit_rows
            guard_rows += unit_guard_rows
            costs += [cost] if cost else []
            for r in unit_rows:
                print(f"[bench] {r['dataset']} {r['attack']} {r['poison_rate']:.2f} {r['defense']:<13} "
                      f"CA {fmt(r['clean_accuracy'])} ASR {fmt(r['asr'])} precision {fmt(r['isolation_precision'])} "
                      f"recall {fmt(r['isolation_recall'])} ({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
            for r in unit_guard_rows:
                print(f"[bench] guard {r['dataset']} {r['attack']} {r['poison_rate']:.2f} {r['detector']:<22} "
                      f"TPR {r['tpr']:.3f} FPR {r['fpr']:.3f} AUROC {r['auroc']:.3f}", file=sys.stderr, flush=True)
            elapsed = time.perf_counter() - t0
            # Written after every unit, so that a stopped run keeps what it finished.
            meta.update(wall_seconds=round(elapsed, 1), units_done=f"{done}/{len(tasks)}")
            save(out, combined((rows, guard_rows, costs), kept), meta)
            print(f"[bench] {done}/{len(tasks)} units done, {elapsed / 60:.1f} min elapsed", file=sys.stderr, flush=True)
    print(f"[bench] wrote {out / 'defense.json'} and defense.md ({meta['wall_seconds'] / 60:.1f} min)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
