"""python -m bench.defense: how well the defense removes each attack, against no defense and the oracle.

For each dataset, attack and poison rate, with one model and one epoch budget per dataset:
- none: standard training (cross-entropy, cosine schedule) on the poisoned set for
  isolate.epochs + unlearn.finetune_epochs epochs, the epochs the defended model trains for;
- oracle: the same training with every sample the attack touched removed (the floor for ASR);
- abl: plain ABL (Li et al. 2021): isolate the 1% lowest-loss samples, fine-tune on the rest,
  gradient ascent on the isolated set at lr 5e-4;
- abl+adaptive: isolation sized from the loss curves (a separated group refined over the isolation
  model's features: isolate.refine_k), joint unlikelihood unlearning followed by one repair epoch of
  clean fine-tuning, and a fresh start of the released model when isolation finds no evidence
  (unlearn.restart: no_evidence), followed by the trained model's second look (unlearn.recheck), whose
  flagged samples count as isolated;
- fused: the same, with the loss fused with the detectors: the pipeline's default for real images;
- fused+resample: the same, the restarted model trained on randomly sub-pixel-resampled images
  (unlearn.restart_resample: 0.5), which defuses warping triggers at a cost in clean accuracy;
- abl+joint (digits): the plain 1% isolation with joint unlearning, the pipeline's default on digits.
The defenses call the pipeline's own functions (stages.isolate, stages.unlearn); they never see the
red-team truth, which only the metrics read.

Writes bench/results/defense.json (rows: dataset, attack, poison_rate, defense, clean_accuracy, asr,
isolation_precision, isolation_recall, seconds) and bench/results/defense.md. --quick runs a small
digits subset into bench/results/quick/. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
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

from stages.config import Params
from stages.data import Store, calibration_split, make_store
from stages.fileio import write_json, write_text
from stages.gate import attack_success_rate, clean_accuracy
from stages.detectors import adversarial_examples, auroc, features, robust_z, strip, training_scores
from stages.guard import calibrate_guard, calibrate_scores, calibrated_threshold, fit_heads, fpr_shares
from stages.isolate import adaptive_selection, choose, fused_suspicion, train_lga
from stages.models import build_model, model_spec
from stages.sources import read_source
from stages.train import channel_stats, make_optimizer, predict_logits, seed_everything, to_tensor, train_epoch
from stages.unlearn import restarts, sanitize

ROOT = Path(__file__).resolve().parents[1]
CIFAR_SUBSET = "../shared/data/cifar10_subset.npz"  # relative to the project root, where the benchmark runs
ATTACKS = ["badnets", "blend", "sig", "wanet"]
RATES = [0.01, 0.05, 0.10]
KEYS = ["dataset", "attack", "poison_rate", "defense", "clean_accuracy", "asr", "isolation_precision",
        "isolation_recall", "seconds"]

# One model and epoch budget per dataset, sized so the full benchmark fits in an hour on 2 CPU cores. Half of
# the test split calibrates the guard (the fewer calibration images, the more margin its FPR bound needs:
# measured, BadNets 10% TPR 0.93 with a fifth, 1.00 with half); clean accuracy and ASR use the whole split.
PROFILES = {
    "digits": {"data": {"source": "digits", "calibration_size": 0.5}, "model": {"width": 32},
               "isolate": {"epochs": 20}, "unlearn": {"finetune_epochs": 10},
               "detect": {"probe_blocks": 6,  # as params.yaml
                          "guard": ["disagreement@isolation", "quarantine_knn@isolation", "probe@released"]}},
    # CIFAR: isolation without augmentation (a flip moves the corner patch; measured: BadNets at 5% not
    # learned in 10 augmented LGA epochs, learned by epoch 5 without), training with it.
    "cifar10": {"data": {"source": "npz", "path": CIFAR_SUBSET, "calibration_size": 0.5}, "model": {"width": 16},
                "train": {"crop_padding": 2, "flip": True},
                "isolate": {"epochs": 10, "augment": False}, "unlearn": {"finetune_epochs": 6}},
}
# The digits rows add abl+joint: it is the pipeline's default on digits (params.yaml).
DEFAULT_DEFENSES = {"digits": ["abl", "abl+joint", "abl+adaptive", "fused", "fused+resample"],
                    "cifar10": ["abl", "abl+adaptive", "fused", "fused+resample"]}
# Each defense is a set of overrides on the profile; plain ABL stays reachable as settings.
DEFENSES = {
    "abl": {"isolate": {"selection": "ratio", "ratio": 0.01}, "detect": {"fusion": []},
            "unlearn": {"mode": "ascent", "lr": 5e-4, "epochs": 20, "restart": "never", "repair_epochs": 0}},
    "abl+joint": {"isolate": {"selection": "ratio", "ratio": 0.01}, "detect": {"fusion": []}, "unlearn": {"mode": "joint"}},
    "abl+adaptive": {"isolate": {"selection": "adaptive"}, "detect": {"fusion": []}, "unlearn": {"mode": "joint"}},
    # The pipeline's default for real images: adaptive isolation ranked by the loss fused with detectors.
    "fused": {"isolate": {"selection": "adaptive"}, "unlearn": {"mode": "joint"}},
    "fused+resample": {"isolate": {"selection": "adaptive"}, "unlearn": {"mode": "joint", "restart_resample": 0.5}},
}
# Each alone: rows "detector:<name>" (isolation only).
DETECTORS = ["strip", "mahalanobis", "spectral", "knn_density", "input_spectral"]
# Guard rows for comparison, not shipped by default.
GUARD_ALTERNATIVES = ["disagreement@isolation", "quarantine_knn@isolation", "quarantine_probe@isolation",
                      "mahalanobis@released", "mahalanobis@isolation", "knn@isolation", "knn@released", "mismatch@released"]
EPS = 8 / 255  # FGSM and PGD (10 steps of EPS / 4), L-infinity, against the released model
PGD_STEPS = {"fgsm": 1, "pgd": 10}
GUARD_KEYS = ["dataset", "attack", "poison_rate", "detector", "tpr", "fpr", "auroc", "threshold", "seconds"]
# Every row shares one calibration/evaluation split of the test set, so one unlucky split moves every FPR together:
# the shipped guard is also recalibrated on this many other splits (seeds after params.seed), for the spread.
RESPLITS = 50


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def profile_params(dataset: str, attack: str, rate: float, defense: dict | None = None) -> Params:
    raw = merge(PROFILES[dataset], {"seed": 0, "device": "auto", "redteam": {"attack": attack, "poison_rate": rate}})
    return Params.model_validate(merge(raw, defense or {}))


def load_case(dataset: str, attack: str, rate: float):
    """(poisoned train store, test images, test labels, truth index of every touched sample, backdoor index)."""
    from stages.triggers import poison

    params = profile_params(dataset, attack, rate)
    source = read_source(params.data.source, params.data.path, params.data.test_size, params.seed)
    n_classes = int(max(source.train.y.max(), source.test.y.max())) + 1
    x, labels, roles = poison(source.train.x, source.train.y, params.redteam, params.seed)
    train = make_store(x, labels, source.train.ids, [str(c) for c in range(n_classes)])
    touched = np.array(sorted(roles), dtype=np.int64)
    backdoor = np.array(sorted(i for i, r in roles.items() if r == "backdoor"), dtype=np.int64)
    return params, train, source.test.x, source.test.y, touched, backdoor


def evaluate(model, params: Params, x_test: np.ndarray, y_test: np.ndarray, device) -> tuple[float, float]:
    """(clean accuracy, ASR) of a torch model, by the gate's own definitions."""
    from stages.triggers import apply_trigger

    rt = params.redteam

    def predict(images: np.ndarray) -> np.ndarray:
        return predict_logits(model, to_tensor(images, device)).argmax(1).cpu().numpy()

    return (clean_accuracy(predict, x_test, y_test),
            attack_success_rate(predict, x_test, y_test, lambda x: apply_trigger(x, rt.attack, rt), rt.target))


def train_standard(params: Params, store: Store, device) -> torch.nn.Module:
    """Plain supervised training with the same model, augmentation and epoch budget as the defense."""
    seed_everything(params.seed)
    mean, std = channel_stats(store.x)
    model = build_model(model_spec(store.image_shape, len(store.class_names), params.model.width, mean, std)).to(device)
    x, y = to_tensor(store.x, device), torch.from_numpy(store.labels).to(device)
    epochs = params.isolate.epochs + params.unlearn.finetune_epochs
    opt = make_optimizer(model, params.train.lr, params.train)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator(device=device).manual_seed(params.seed)
    for _ in range(epochs):
        train_epoch(model, opt, x, y, lambda losses: losses.mean(), params.train.batch_size, gen,
                    params.train.crop_padding, params.train.flip)
        sched.step()
    return model


def _round(v, digits: int = 4):
    return None if v is None else round(float(v), digits)


def row(case: tuple, defense: str, ca, asr, precision, recall, seconds: float) -> dict:
    dataset, attack, rate = case
    return {"dataset": dataset, "attack": attack, "poison_rate": rate, "defense": defense,
            "clean_accuracy": _round(ca), "asr": _round(asr),
            "isolation_precision": _round(precision), "isolation_recall": _round(recall), "seconds": round(seconds, 1)}


def isolation_quality(isolated: np.ndarray, backdoor: np.ndarray) -> tuple[float, float]:
    hits = np.isin(isolated, backdoor).sum()
    return (hits / len(isolated) if len(isolated) else 0.0), (hits / len(backdoor) if len(backdoor) else float("nan"))


def run_task(task: tuple) -> tuple[list[dict], list[dict], dict | None]:
    """One unit of work: (dataset, attack, rate, kind), kind "none", "oracle", "defenses" or "adversarial"
    (a clean training set; FGSM and PGD on the released model). Returns (defense rows, guard rows, the
    guard's cost or None)."""
    dataset, attack, rate, kind, defenses, threads = task
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params, train, x_test, y_test, touched, backdoor = load_case(dataset, attack, rate)
    case = (dataset, attack, rate)
    t0 = time.perf_counter()
    if kind in ("none", "oracle"):
        keep = np.setdiff1d(np.arange(len(train)), touched) if kind == "oracle" else np.arange(len(train))
        model = train_standard(params, train.subset(keep), device)
        return [row(case, kind, *evaluate(model, params, x_test, y_test, device), None, None,
                    time.perf_counter() - t0)], [], None

    rows, guard_rows, cost = [], [], None
    lga_model, _, history = train_lga(params, train, device)
    isolation_seconds = time.perf_counter() - t0
    signals, detect_seconds = {}, {}
    x, y = to_tensor(train.x, device), torch.from_numpy(train.labels).to(device)
    penultimate = features(lga_model, x)[-1]  # isolate.refine_k's feature space
    for name in DETECTORS:
        t1 = time.perf_counter()
        signals[name] = training_scores(lga_model, x, y, [name], params.detect, params.seed)[name].cpu().numpy()
        detect_seconds[name] = time.perf_counter() - t1
    if kind == "defenses":
        for name in DETECTORS:  # each detector alone ranks and cuts, as the loss does in abl+adaptive
            score = -robust_z(torch.as_tensor(signals[name], dtype=torch.float64)).numpy()
            isolated, _ = adaptive_selection(score, train.labels, train.ids, params.isolate)
            rows.append(row(case, f"detector:{name}", None, None, *isolation_quality(isolated, backdoor),
                            detect_seconds[name]))
    sanitized = {}  # sanitize is deterministic: variants that isolate the same samples share one run (and its seconds)
    for name in (defenses if kind == "defenses" else ["fused"]):
        t1 = time.perf_counter()
        p = profile_params(dataset, attack, rate, DEFENSES[name])
        fused = fused_suspicion(history, signals, p.detect.fusion)
        isolated, _, report = choose(history, train, p.isolate, fused, penultimate)
        kept = np.setdiff1d(np.arange(len(train)), isolated)
        key = sanitize_key(p, isolated, report["evidence"])
        model, fresh = copy.deepcopy(lga_model), key not in sanitized
        if fresh:
            t2 = time.perf_counter()
            _, unlearned = sanitize(model, p, train.subset(kept), train.subset(isolated), device,
                                    evidence=report["evidence"])
            sanitized[key] = (copy.deepcopy(model.state_dict()), unlearned, time.perf_counter() - t2)
        else:
            model.load_state_dict(sanitized[key][0])
        _, unlearned, sanitize_seconds = sanitized[key]
        # The suspects: isolated, and those unlearn's recheck flagged in the clean set (as the pipeline's guard sees them).
        suspects = np.union1d(isolated, kept[unlearned.get("recheck", {}).get("flagged", [])]).astype(np.int64)
        ca, asr = evaluate(model, p, x_test, y_test, device)
        extra = sum(detect_seconds[d] for d in p.detect.fusion)
        # This variant's own cost, as if it ran alone: isolation, its detectors, selection, sanitize and evaluation.
        own = time.perf_counter() - t1 + (0.0 if fresh else sanitize_seconds)
        if kind == "defenses":
            rows.append(row(case, name, ca, asr, *isolation_quality(suspects, backdoor), isolation_seconds + extra + own))
        if name == "fused":
            clean = train.subset(np.setdiff1d(np.arange(len(train)), suspects))
            guard_rows, cost = guard_benchmark(p, case, model, lga_model, clean, train.subset(suspects), x_test, y_test,
                                               device, kind)
    cost = cost and {**cost, "isolate_seconds": round(isolation_seconds, 1),
                     "detect_seconds": {k: round(v, 1) for k, v in detect_seconds.items()}}
    return rows, guard_rows, cost


def resplit_rates(clean: torch.Tensor, malicious: dict[str, tuple[torch.Tensor, np.ndarray]], y_test: np.ndarray,
                  params: Params, shares: list[float], seeds: range) -> dict:
    """The shipped guard recalibrated on other calibration/evaluation splits of the test set, as ingest would draw
    them with other seeds: its per-detector scores on every test image (`clean`, [n, detectors]; any positive affine
    rescaling of each column, which the calibration undoes) and on malicious images (attack: (scores, the test index
    each was made from)). Per split: the scales and threshold from the calibration part (`calibrate_scores`, as
    export calibrates), FPR on the evaluation part's clean images, TPR on the malicious images made from it.
    Returns the mean and spread over the splits."""
    dp = params.detect
    fprs, tprs = [], {name: [] for name in malicious}
    for seed in seeds:
        test_idx, cal_idx = calibration_split(y_test, params.data.calibration_size, seed)
        centre, scale, threshold, _ = calibrate_scores(clean[cal_idx], shares, dp.guard_fpr, dp.guard_confidence,
                                                       len(test_idx))

        def flagged(scores: torch.Tensor) -> float:  # the guard's rule: its largest scaled score over the threshold
            return float(np.mean(((scores - centre) / scale).amax(dim=1).cpu().numpy() > threshold))

        fprs.append(flagged(clean[test_idx]))
        for name, (bad, made_from) in malicious.items():
            tprs[name].append(flagged(bad[np.isin(made_from, test_idx)]))
    return {"splits": len(fprs), "fpr_mean": round(float(np.mean(fprs)), 4),
            "fpr_p95": round(float(np.quantile(fprs, 0.95)), 4),
            "fpr_over_target": round(float(np.mean(np.array(fprs) > dp.guard_fpr)), 4),
            "tpr_mean": {name: round(float(np.mean(v)), 4) for name, v in tprs.items()},
            "tpr_min": {name: round(float(np.min(v)), 4) for name, v in tprs.items()}}


def sanitize_key(params: Params, isolated: np.ndarray, evidence: str | None) -> tuple:
    """What `sanitize` reads besides the shared isolation model and store: the isolated samples, the evidence and
    every params section but the ranking (isolate.selection, detect); restart_resample only when it restarts."""
    unlearn = params.unlearn.model_dump()
    if not restarts(params.unlearn.restart, evidence):
        unlearn.pop("restart_resample")
    rest = params.model_dump(exclude={"detect": True, "isolate": {"selection"}, "unlearn": True})
    return isolated.tobytes(), evidence, json.dumps([unlearn, rest], sort_keys=True, default=str)


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


def guard_benchmark(params: Params, case: tuple, released, isolation, clean: Store, quarantined: Store, x_test, y_test,
                    device, kind: str) -> tuple[list[dict], dict]:
    """The shipped guard and each of its detectors alone (plus STRIP on the isolation model, too costly to
    ship), calibrated on the calibration split at detect.guard_fpr and measured on the rest of the test
    split: clean images (FPR) against malicious ones (TPR): the red team's triggered non-target images,
    or FGSM / PGD examples of the released model."""
    from stages.triggers import apply_trigger

    test_idx, calibration = guard_split(params, x_test, y_test, clean.class_names)
    models = {"released": released, "isolation": isolation}
    # The shipped guard, and each detector alone, the shipped ones and the unshipped alternatives, calibrated the
    # same way: every head fitted once.
    entries = [*params.detect.guard, *(e for e in GUARD_ALTERNATIVES if e not in params.detect.guard)]
    wide = params.model_copy(update={"detect": params.detect.model_copy(update={"guard": entries, "guard_shares": None})})
    heads = fit_heads(wide, models, clean, quarantined, device)
    # Calibrated, as export does, for the FPR measured on the evaluation split's clean images.
    guard, _ = calibrate_guard(params, models, heads, calibration, device, len(test_idx))
    each, each_report = calibrate_guard(wide, models, heads, calibration, device, len(test_idx))
    entries = [e for e in entries if e not in each_report["left_out"]]
    x_cal, x_eval = to_tensor(calibration.x, device), to_tensor(x_test[test_idx], device)
    y_eval = torch.from_numpy(y_test[test_idx]).to(device)
    dataset, attack, rate = case
    cal_idx = np.setdiff1d(np.arange(len(y_test)), test_idx)
    rt = params.redteam
    if kind == "adversarial":
        malicious = {name: adversarial_examples(released, x_eval, y_eval, steps, EPS) for name, steps in PGD_STEPS.items()}
        made_from = test_idx
        rate = 0.0
    else:
        made_from = test_idx[y_test[test_idx] != rt.target]
        malicious = {attack: to_tensor(apply_trigger(x_test[made_from], attack, rt), device)}
    bank = to_tensor(clean.x[np.random.default_rng(params.seed).permutation(len(clean))[:256]], device)
    scorers = {entry: (lambda xx, j=j: each.detector_scores(xx)[:, j]) for j, entry in enumerate(entries)}
    scorers["strip@isolation"] = lambda xx: strip(isolation, xx, bank, params.detect.strip_blends, params.detect.strip_alpha)
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
            threshold = calibrated_threshold(cal, params.detect.guard_fpr, params.detect.guard_confidence,
                                             len(test_idx))
            for attack_name, xm in malicious.items():
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
            keep_cal = cal_idx[y_test[cal_idx] != rt.target]
            cal_malicious = {attack: (to_tensor(apply_trigger(x_test[keep_cal], attack, rt), device), keep_cal)}
        clean_scores = torch.empty(len(y_test), len(guard.heads), dtype=torch.float64)
        clean_scores[cal_idx] = guard.detector_scores(x_cal).double().cpu()
        clean_scores[test_idx] = guard.detector_scores(x_eval).double().cpu()
        bad = {name: (torch.cat([guard.detector_scores(xm), guard.detector_scores(cal_malicious[name][0])]).double().cpu(),
                      np.concatenate([made_from, cal_malicious[name][1]])) for name, xm in malicious.items()}
        shares = fpr_shares([e for e in params.detect.guard if e in heads], params.detect.guard_released_share,
                            params.detect.guard_shares)
        resplit = resplit_rates(clean_scores, bad, y_test, params, shares,
                                range(params.seed + 1, params.seed + 1 + RESPLITS))
    model_seconds, guard_seconds = onnx_costs(released, guard, clean.image_shape, x_eval.cpu().numpy(), params.export.opset)
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

    from stages.export import export_onnx
    from stages.guard import export_guard

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
    model = build_model(model_spec((32, 32, 3), 10, PROFILES["cifar10"]["model"]["width"], [0.5] * 3, [0.25] * 3))
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
    lines = ["# Defense benchmark", "", f"Machine: {meta['machine']}. Wall time: {meta['wall_seconds'] / 60:.1f} min "
             f"({meta['jobs']} worker processes, {meta['threads']} torch thread(s) each). Reference speed before the run: "
             f"{meta['reference_images_per_second']:,.0f} training images/s (`reference_throughput`).", "",
             "Model and budget per dataset (`none` and `oracle` train for isolate + fine-tune epochs):", ""]
    for name, prof in meta["profiles"].items():
        lines.append(f"- **{name}**: `{json.dumps(prof, sort_keys=True)}`")
    lines += ["", "Defenses: " + "; ".join(f"**{k}** `{json.dumps(v, sort_keys=True)}`" for k, v in DEFENSES.items()),
              "", "ASR: triggered test images whose label is not the target, classified as the target. "
              "Isolation precision/recall count the samples carrying the trigger and the target label "
              "(WaNet's noise-mode samples keep their labels and are not counted).", ""]
    lines += ["| dataset | attack | rate | defense | CA | ASR | iso. precision | iso. recall | seconds |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r[k]) for k in KEYS) + " |")
    return "\n".join(lines) + "\n"


def sort_key(r: dict):
    order = ["none", "oracle", *DEFENSES, *(f"detector:{d}" for d in DETECTORS)]
    return (r["dataset"], ATTACKS.index(r["attack"]), r["poison_rate"], order.index(r["defense"]))


def guard_sort_key(r: dict):
    return (r["dataset"], (ATTACKS + ["fgsm", "pgd"]).index(r["attack"]), r["poison_rate"], r["detector"])


def guard_markdown(rows: list[dict], costs: list[dict], meta: dict) -> str:
    lines = ["# Guard benchmark", "", f"Machine: {meta['machine']}.", "",
             "Each detector is calibrated on the calibration split of the test set (`data.calibration_size` of "
             "each class, see the profiles in defense.md) to a false-positive rate of at most `detect.guard_fpr` "
             f"({Params().detect.guard_fpr}) with probability `detect.guard_confidence` "
             f"({Params().detect.guard_confidence}) as measured on the rest (the bound takes in the evaluation "
             "images' own sampling noise, as export does for the gate's), and measured there: FPR on its clean "
             "images, TPR on "
             "malicious ones (red-team triggered non-target images, or FGSM / PGD, L-inf eps 8/255, PGD 10 steps "
             "of eps/4, against the released model of a clean training run, poison rate 0). `guard` "
             "is the shipped combination (largest calibrated score of `detect.guard`: each detector at 0 on its "
             "calibration median, 1 at its own score of the calibration rank of its share of the images the "
             "threshold may flag, `detect.guard_shares`); the other rows are its detectors alone and unshipped alternatives "
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.defense", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="digits, badnets and sig at 10%%, for CI (about 2 minutes)")
    ap.add_argument("--datasets", default="digits,cifar10")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--rates", default=",".join(map(str, RATES)))
    ap.add_argument("--defenses", default=None, help=f"from {', '.join(DEFENSES)} (default: {DEFAULT_DEFENSES})")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="worker processes (each uses cores/jobs torch threads)")
    ap.add_argument("--no-adversarial", action="store_true", help="skip the clean runs for FGSM and PGD")
    ap.add_argument("--no-baselines", action="store_true", help="skip the none and oracle rows")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default bench/results, with --quick bench/results/quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.datasets, args.attacks, args.rates = "digits", "badnets,sig", "0.1"
    out = args.out or ROOT / "bench" / "results" / ("quick" if args.quick else "")
    datasets, attacks = args.datasets.split(","), args.attacks.split(",")
    rates = [float(r) for r in args.rates.split(",")]
    chosen = {d: args.defenses.split(",") if args.defenses else DEFAULT_DEFENSES.get(d, []) for d in datasets}
    unknown = [d for d in datasets if d not in PROFILES] + [a for a in attacks if a not in ATTACKS] + \
        [d for names in chosen.values() for d in names if d not in DEFENSES]
    if unknown:
        ap.error(f"unknown dataset, attack or defense: {unknown}")
    os.chdir(ROOT)
    if "cifar10" in datasets and not Path(CIFAR_SUBSET).exists():
        ap.error(f"{CIFAR_SUBSET} not found: put the CIFAR-10 subset there or pass --datasets digits")

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    # The costliest units first, so the pool ends together.
    tasks = [(d, a, r, kind, chosen[d], threads) for d in datasets for a in attacks for r in rates
             for kind in ("defenses",) + (() if args.no_baselines else ("none", "oracle"))]
    if not args.no_adversarial:  # a clean training run per dataset, for FGSM and PGD against its released model
        tasks += [(d, "badnets", 0.0, "adversarial", ["fused"], threads) for d in datasets]
    tasks.sort(key=lambda t: (t[0] != "cifar10", t[3] != "defenses"))
    reference = reference_throughput(threads)
    print(f"[bench] reference speed: {reference:,.0f} training images/s", file=sys.stderr, flush=True)
    rows, guard_rows, costs, t0 = [], [], [], time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
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
            print(f"[bench] {done}/{len(tasks)} units done, {elapsed / 60:.1f} min elapsed", file=sys.stderr, flush=True)
    rows.sort(key=sort_key)
    guard_rows.sort(key=guard_sort_key)
    costs.sort(key=lambda c: (c["dataset"], c["attack"], c["poison_rate"]))
    meta = {"machine": machine(), "wall_seconds": round(time.perf_counter() - t0, 1), "jobs": args.jobs,
            "threads": threads,
            "reference_images_per_second": round(reference), "profiles": {d: PROFILES[d] for d in datasets}}
    write_json(out / "defense.json", rows)
    write_json(out / "defense.meta.json", meta)
    write_text(out / "defense.md", markdown(rows, meta))
    write_json(out / "guard.json", guard_rows)
    write_json(out / "guard.meta.json", {**meta, "costs": costs})
    write_text(out / "guard.md", guard_markdown(guard_rows, costs, meta))
    print(f"[bench] wrote {out / 'defense.json'} and defense.md ({meta['wall_seconds'] / 60:.1f} min)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
