"""isolate: Anti-Backdoor Learning stage one (Li et al., NeurIPS 2021, sec. 4.1).

Train from scratch with the LGA loss sign(L - gamma) * L, record every sample's loss after each
epoch, and isolate the `isolate.ratio` share with the lowest final loss: backdoor samples are learned
fastest, so they sit at the bottom. Red-team truth is read only after the choice, for metrics.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import torch

from stages import paths
from stages.config import IsolateParams, Params
from stages.data import Store, load_store
from stages.fileio import atomic_dir, write_csv, write_json
from stages.models import build_model, model_spec, save_checkpoint
from stages.plots import isolation_plots
from stages.train import (Progress, channel_stats, lga_loss, make_optimizer, per_sample_losses, pick_device,
                          seed_everything, to_tensor, train_epoch)


def select_isolated(loss_history: np.ndarray, ids: np.ndarray, ratio: float) -> np.ndarray:
    """Plain ABL: indices of the round(ratio * N) lowest final losses; ties broken by id (reproducible)."""
    n = int(round(ratio * loss_history.shape[0]))
    order = np.lexsort((ids, loss_history[:, -1]))
    return np.sort(order[:n])


LOG_FLOOR = 1e-6  # float32 cross-entropy of a sure prediction reaches 0; log needs a floor


def suspicion_score(loss_history: np.ndarray) -> np.ndarray:
    """Mean log-loss over all isolation epochs: low = learned early and kept learned.

    In log space a backdoor sample sits orders of magnitude below clean ones (1e-5 against 0.1-2), and
    the mean over epochs rewards being learned *early*, ABL's signature, while smoothing the
    epoch-to-epoch swings of a single clean sample's loss.
    """
    return np.log(loss_history.astype(np.float64) + LOG_FLOOR).mean(axis=1)


def otsu_split(values: np.ndarray) -> tuple[float, float]:
    """The threshold that maximises the between-group variance of two groups (Otsu 1979), and the
    groups' separation in pooled standard deviations (how clearly the values fall in two groups)."""
    v = np.sort(values)
    if len(v) < 4 or v[0] == v[-1]:
        return float(v[0]) if len(v) else 0.0, 0.0
    n = np.arange(1, len(v))
    csum = np.cumsum(v)[:-1]
    mean_lo, mean_hi = csum / n, (v.sum() - csum) / (len(v) - n)
    between = n * (len(v) - n) * (mean_hi - mean_lo) ** 2
    between[v[:-1] == v[1:]] = -1  # a threshold must fall between two different values
    k = int(np.argmax(between))
    lo, hi = v[:k + 1], v[k + 1:]
    pooled = np.sqrt((lo.var() + hi.var()) / 2) + 1e-12
    return float(v[k]), float((hi.mean() - lo.mean()) / pooled)


def adaptive_selection(loss_history: np.ndarray, labels: np.ndarray, ids: np.ndarray, p: IsolateParams):
    """Isolation sized from the loss curves instead of a fixed share (plain ABL: selection: ratio).

    1. Score every sample by its mean log-loss over the isolation epochs (`suspicion_score`).
    2. Otsu's threshold splits the scores of the whole set in two groups. The low group counts when it
       is a real cluster, `min_separation` pooled standard deviations below the rest. With
       `concentrate`, only its majority label (the implicated class) is isolated: ABL observes that
       isolated samples concentrate in the backdoor's target class (a dirty-label backdoor carries the
       target label, a clean-label one lives in it), while easy clean samples of other classes stay.
       When the implicated class alone also splits in two (`class_separation`), its own, finer split is
       used: a backdoor makes its target class attractive, so the class's clean samples also sit low.
    3. Otherwise, with `concentrate`, each class is split on its own: a backdoor that is only
       partly learned shows as one class whose split is clear (`min_separation`) and `class_margin`
       times clearer than any other class's. Clean classes split about equally (measured: 2.4-3.1).
    4. Otherwise (clean data, or a backdoor not learned yet) the plain fixed `ratio` is isolated.
    At most `max_ratio` of the set is isolated. Returns the sorted indices and a report of the decision.
    """
    score = suspicion_score(loss_history)
    threshold, separation = otsu_split(score)
    low = np.flatnonzero(score <= threshold)
    per_class = sorted(((*otsu_split(score[labels == c])[::-1], int(c)) for c in np.unique(labels)), reverse=True)
    report = {"threshold": round(threshold, 4), "separation": round(separation, 3),
              "class_separation": {str(c): round(sep, 3) for sep, _, c in per_class}}

    def class_split(c: int) -> np.ndarray:
        pool = np.flatnonzero(labels == c)
        return pool[score[pool] <= otsu_split(score[pool])[0]]

    best_sep, _, best_class = per_class[0]
    runner_up = per_class[1][0] if len(per_class) > 1 else 0.0
    class_is_clear = best_sep >= p.min_separation and best_sep >= p.class_margin * runner_up
    if separation >= p.min_separation:
        implicated = int(np.bincount(labels[low]).argmax())
        chosen, rule = low, "adaptive: global split"
        if p.concentrate:
            own = dict((c, sep) for sep, _, c in per_class)[implicated]
            chosen = class_split(implicated) if own >= p.class_separation else low[labels[low] == implicated]
    elif p.concentrate and class_is_clear:
        implicated, chosen, rule = best_class, class_split(best_class), "adaptive: class split"
    else:
        return select_isolated(loss_history, ids, p.ratio), {**report, "rule": "ratio (no separated low-loss group)"}
    cap = int(round(p.max_ratio * len(score)))
    if len(chosen) > cap:
        chosen = chosen[np.lexsort((ids[chosen], score[chosen]))[:cap]]
    return np.sort(chosen), {**report, "implicated_label": implicated, "rule": rule}


def train_lga(params: Params, store: Store, device: torch.device):
    """Returns the model, its spec and the loss history [N, epochs]."""
    seed_everything(params.seed)
    mean, std = channel_stats(store.x)
    spec = model_spec(store.image_shape, len(store.class_names), params.model.width, mean, std)
    model = build_model(spec).to(device)
    x, y = to_tensor(store.x, device), torch.from_numpy(store.labels).to(device)
    tp, ip = params.train, params.isolate
    opt = make_optimizer(model, tp.lr, tp)
    gen = torch.Generator(device=device).manual_seed(params.seed)
    history = np.zeros((len(store), ip.epochs), dtype=np.float32)
    progress = Progress("isolate", ip.epochs, len(store))
    for epoch in range(ip.epochs):
        train_loss = train_epoch(model, opt, x, y, lambda l: lga_loss(l, ip.gamma), tp.batch_size, gen,
                                 tp.crop_padding if ip.augment else 0, tp.flip and ip.augment)
        history[:, epoch] = per_sample_losses(model, x, y).cpu().numpy()
        progress.epoch(epoch + 1, lga_loss=train_loss, mean_loss=float(history[:, epoch].mean()))
    return model, spec, history


def isolation_metrics(store: Store, isolated: np.ndarray) -> dict:
    """Per-class share of the isolated set; with red-team truth, precision and recall."""
    labels = store.labels[isolated]
    shares = {store.class_names[c]: round(float(np.mean(labels == c)), 4) for c in np.unique(labels)}
    out = {"n_isolated": int(len(isolated)), "isolated_class_share": shares,
           "dominant_class": max(shares, key=shares.get) if shares else None}
    if paths.REDTEAM_TRUTH.exists():  # metrics only: the choice above never saw this file
        truth = pd.read_csv(paths.REDTEAM_TRUTH, dtype={"id": str})
        poisoned = set(truth.loc[truth["role"] == "backdoor", "id"])  # WaNet's noise-mode samples keep their labels
        if poisoned:
            hits = sum(1 for i in store.ids[isolated] if i in poisoned)
            out["isolation_precision"] = round(hits / len(isolated), 4) if len(isolated) else None
            out["isolation_recall"] = round(hits / len(poisoned), 4)
    return out


def choose(history: np.ndarray, store: Store, p: IsolateParams) -> tuple[np.ndarray, np.ndarray, dict]:
    """(isolated indices, the score they were ranked by, a report of the rule), per `isolate.selection`."""
    if p.ratio == 0:
        return np.empty(0, dtype=np.int64), history[:, -1], {"rule": "off (isolate.ratio: 0)"}
    if p.selection == "ratio":
        return select_isolated(history, store.ids, p.ratio), history[:, -1], {"rule": "ratio"}
    isolated, report = adaptive_selection(history, store.labels, store.ids, p)
    score = suspicion_score(history) if report["rule"].startswith("adaptive") else history[:, -1]
    return isolated, score, report


def run(params: Params) -> None:
    device = pick_device(params.device)
    store = load_store(paths.TRAIN_STORE)
    model, spec, history = train_lga(params, store, device)
    isolated, score, rule = choose(history, store, params.isolate)

    rank = np.empty(len(store), dtype=np.int64)
    rank[np.lexsort((store.ids, score))] = np.arange(1, len(store) + 1)
    is_isolated = np.zeros(len(store), dtype=bool)
    is_isolated[isolated] = True
    epochs = [f"loss_epoch_{e + 1}" for e in range(history.shape[1])]
    with atomic_dir(paths.ISOLATE) as out:
        scores = pd.DataFrame(history.round(6), columns=epochs)
        scores.insert(0, "id", store.ids)
        scores.insert(1, "label", store.labels)
        scores["final_loss"] = history[:, -1].round(6)
        scores["suspicion"] = (-suspicion_score(history)).round(4)
        scores["rank"] = rank
        scores["isolated"] = is_isolated.astype(int)
        scores.to_csv(out / paths.SCORES_CSV.name, index=False)
        order = isolated[np.argsort(rank[isolated])]
        write_csv(out / paths.ISOLATED_CSV.name, ["id", "label", "final_loss", "rank"],
                  [(store.ids[i], int(store.labels[i]), round(float(history[i, -1]), 6), int(rank[i])) for i in order])
    save_checkpoint(paths.ISOLATE_MODEL, model, spec, {"seed": params.seed})

    # Mean loss per epoch of the isolated and the kept samples: the ABL signature, for `dvc plots`.
    kept = ~is_isolated
    write_csv(paths.PLOTS / "isolate_loss.csv", ["epoch", "isolated", "kept"], [
        (e + 1, round(float(history[is_isolated, e].mean()), 6) if is_isolated.any() else "",
         round(float(history[kept, e].mean()), 6)) for e in range(history.shape[1])])
    if rule["rule"].startswith("adaptive"):
        log10_score, score_name = score / np.log(10), "loss, geometric mean over the isolation epochs"
    else:
        log10_score, score_name = np.log10(score.astype(np.float64) + LOG_FLOOR), "loss at the last epoch"
    isolation_plots(history, log10_score, score_name, isolated, paths.PLOTS)
    metrics = isolation_metrics(store, isolated)
    write_json(paths.metrics_file("isolate"), {"device": device.type, "selection": rule, **metrics})
    print(f"[isolate] isolated {len(isolated)} of {len(store)} samples ({rule['rule']}); " +
          ", ".join(f"{k}={v}" for k, v in metrics.items() if k.startswith("isolation_")), file=sys.stderr)
