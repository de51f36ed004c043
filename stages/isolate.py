"""isolate: Anti-Backdoor Learning stage one (Li et al., NeurIPS 2021, sec. 4.1).

Train from scratch with the LGA loss sign(L - gamma) * L, record every sample's loss after each
epoch, and isolate the `isolate.ratio` share with the lowest final loss: backdoor samples are learned
fastest, so they sit at the bottom. Red-team truth is read only after the choice, for metrics.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pandas as pd
import torch

from stages import paths
from stages.config import IsolateParams, Params
from stages.data import Store, load_store
from stages.detectors import features, robust_z, training_scores
from stages.fileio import atomic_dir, write_csv, write_json
from stages.models import build_model, model_spec, save_checkpoint
from stages.plots import isolation_plots
from stages.train import (Progress, channel_stats, lga_loss, make_optimizer, per_sample_losses, pick_device,
                          seed_everything, to_tensor, train_epoch)


def lowest(score: np.ndarray, ids: np.ndarray, ratio: float) -> np.ndarray:
    """Indices of the round(ratio * N) lowest scores; ties broken by id (reproducible)."""
    n = int(round(ratio * len(score)))
    return np.sort(np.lexsort((ids, score))[:n])


def select_isolated(loss_history: np.ndarray, ids: np.ndarray, ratio: float) -> np.ndarray:
    """Plain ABL: the `ratio` share with the lowest final loss."""
    return lowest(loss_history[:, -1], ids, ratio)


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


def kittler_split(values: np.ndarray, min_group: int = 3) -> float:
    """Kittler & Illingworth's minimum-error threshold (Pattern Recognition 1986): the cut that best fits
    two Gaussians with their own weights and spreads. Unlike Otsu's, it finds a small group beside a
    large one: in a class that a clean-label backdoor fills nearly whole (SIG at 10%: 509 of 517), Otsu
    splits the poison itself (measured recall 0.64) where this cut falls before the few clean samples."""
    v = np.sort(values.astype(np.float64))
    n = len(v)
    if n < 2 * min_group or v[0] == v[-1]:
        return float(v[-1]) if n else 0.0
    k = np.arange(1, n)
    s1, q1 = np.cumsum(v)[:-1], np.cumsum(v ** 2)[:-1]
    var_lo = q1 / k - (s1 / k) ** 2
    var_hi = (np.sum(v ** 2) - q1) / (n - k) - ((v.sum() - s1) / (n - k)) ** 2
    w = k / n
    cost = (w * np.log(np.maximum(var_lo, 1e-12)) + (1 - w) * np.log(np.maximum(var_hi, 1e-12))) / 2 \
        - w * np.log(w) - (1 - w) * np.log(1 - w)
    cost[(k < min_group) | (n - k < min_group) | (v[:-1] == v[1:])] = np.inf
    return float(v[int(np.argmin(cost))])


def adaptive_selection(score: np.ndarray, labels: np.ndarray, ids: np.ndarray, p: IsolateParams,
                       cut_score: np.ndarray | None = None, final_loss: np.ndarray | None = None):
    """Isolation sized from the loss curves instead of a fixed share (plain ABL: selection: ratio).

    `score` (low = suspicious) is the mean log-loss over the isolation epochs (`suspicion_score`);
    `cut_score` (default: `score`) ranks the samples inside the implicated class: the fused score of
    loss and detectors when `detect.fusion` is set (see `fused_suspicion`).
    1. Otsu's threshold splits the scores of the whole set in two groups. The low group counts when it
       is a real cluster, `min_separation` pooled standard deviations below the rest. With
       `concentrate`, only its majority label (the implicated class) is isolated: ABL observes that
       isolated samples concentrate in the backdoor's target class (a dirty-label backdoor carries the
       target label, a clean-label one lives in it), while easy clean samples of other classes stay.
       Inside that class, Kittler-Illingworth's cut decides (of `score`, and of `cut_score` too: a sample
       below either cut is isolated): a backdoor makes its target class easy, so the class's clean samples
       also sit low, and a clean-label poison may fill it.
    2. Otherwise, with `concentrate`, each class is split on its own: a backdoor that is only
       partly learned shows as one class whose split is clear (`min_separation`) and `class_margin`
       times clearer than any other class's. Clean classes split about equally (measured: 2.4-3.1; on
       the CIFAR-10 subset the clearest at most 1.02 times the next on clean data and at 1% poison,
       1.29 and 1.24 times at BadNets and Blend 5%, whose cut then isolates P/R 0.88/0.96, 0.91/0.95).
    3. Otherwise (clean data, or a backdoor not learned yet) the `ratio` lowest `cut_score`s and, given
       `final_loss`, plain ABL's `ratio` lowest final losses too: two rankings, neither trusted when
       nothing separates, so a fused ranking adds suspects to plain ABL's and never drops one (CIFAR-10
       subset, SIG 1%: fused alone recall 0 against plain ABL's 0.098). The report's `evidence` is "weak"
       when one class's own split still stands out, `weak_margin` times clearer than the next (blend 5%
       with class_margin 1.3: 3.56 against 2.87, and the lowest 1% were poison at precision 0.986),
       "none" when all classes look alike (every attack at 1%: top two within 2%): unlearning then
       restarts from fresh weights (`unlearn.restart`). After rules 1 and 2 it is "group".
    At most `max_ratio` of the set is isolated. Returns the sorted indices and a report of the decision.
    """
    cut = score if cut_score is None else cut_score
    threshold, separation = otsu_split(score)
    low = np.flatnonzero(score <= threshold)
    per_class = sorted(((*otsu_split(score[labels == c])[::-1], int(c)) for c in np.unique(labels)), reverse=True)
    report = {"threshold": round(threshold, 4), "separation": round(separation, 3),
              "class_separation": {str(c): round(sep, 3) for sep, _, c in per_class}}

    def class_split(c: int) -> np.ndarray:
        pool = np.flatnonzero(labels == c)
        below = cut[pool] <= kittler_split(cut[pool])
        if cut_score is not None:
            # Either score's cut isolates: the detectors add suspects the loss misses and drop none it finds
            # (CIFAR-10 subset, BadNets 10%: fused cut alone P/R 0.992/0.939, loss 0.960/0.992, both 0.960/0.996).
            below |= score[pool] <= kittler_split(score[pool])
        return pool[below]

    best_sep, _, best_class = per_class[0]
    runner_up = per_class[1][0] if len(per_class) > 1 else 0.0
    class_is_clear = best_sep >= p.min_separation and best_sep >= p.class_margin * runner_up
    if separation >= p.min_separation:
        implicated = int(np.bincount(labels[low]).argmax())
        chosen, rule = low, "adaptive: global split"
        if p.concentrate:
            chosen, rule = class_split(implicated), "adaptive: global split, cut inside the implicated class"
    elif p.concentrate and class_is_clear:
        implicated, chosen, rule = best_class, class_split(best_class), "adaptive: class split"
    else:
        chosen, rule = lowest(cut, ids, p.ratio), "ratio (no separated low-loss group)"
        if final_loss is not None:
            chosen, rule = np.union1d(chosen, lowest(final_loss, ids, p.ratio)), rule + ", with plain ABL's share"
        evidence = "weak" if best_sep >= p.weak_margin * runner_up else "none"
        return chosen, {**report, "rule": rule, "evidence": evidence}
    cap = int(round(p.max_ratio * len(score)))
    if len(chosen) > cap:
        chosen = chosen[np.lexsort((ids[chosen], cut[chosen]))[:cap]]
    return np.sort(chosen), {**report, "implicated_label": implicated, "rule": rule, "evidence": "group"}


def refine_by_neighbours(feats: torch.Tensor, labels: np.ndarray, isolated: np.ndarray, p: IsolateParams) -> np.ndarray:
    """The isolated set, smoothed over the isolation model's feature space (`isolate.refine_k`): within the implicated
    class, an isolated sample stays when `refine_keep` of its `refine_k` nearest class-mates (cosine distance of
    penultimate features) are isolated too, and a class-mate joins when `refine_add` of its neighbours are.

    A separated group is cut on a score, and a cut lets through easy clean samples of the class (their loss sits as
    low as the poison's) and leaves out poison just above it; in feature space the model that learned the trigger
    puts its samples in one clump, away from the class's clean ones, so the neighbours tell them apart (the
    label-consistency check of Peri et al. 2020's deep k-NN defense, with the isolated set as the label)."""
    if not len(isolated) or not p.refine_k:
        return isolated
    pool = np.flatnonzero(labels == np.bincount(labels[isolated]).argmax())
    k = min(p.refine_k, len(pool) - 1)
    if k < 1:
        return isolated
    is_suspect = np.isin(pool, isolated)
    bank = torch.nn.functional.normalize(feats[torch.from_numpy(pool).to(feats.device)].float(), dim=1)
    nearest = []
    for start in range(0, len(bank), 1024):  # one block of similarities at a time: memory O(block x class size)
        sim = bank[start:start + 1024] @ bank.T
        rows = torch.arange(len(sim), device=sim.device)
        sim[rows, rows + start] = -torch.inf  # not its own neighbour
        nearest.append(sim.topk(k, dim=1).indices.cpu().numpy())
    share = is_suspect[np.concatenate(nearest)].mean(axis=1)
    member = np.where(is_suspect, share >= p.refine_keep, share >= p.refine_add)
    return np.union1d(np.setdiff1d(isolated, pool), pool[member])


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
        train_loss = train_epoch(model, opt, x, y, lambda losses: lga_loss(losses, ip.gamma), tp.batch_size, gen,
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


def fused_suspicion(history: np.ndarray, signals: dict[str, np.ndarray], names: list[str]) -> np.ndarray | None:
    """The fusion rule (detect.fusion): minus the mean of robust z-scores (median / MAD over the training
    set) of minus the loss score and of each named detector's score. Low = suspicious, like the loss.

    z-scores keep the gaps ranks would erase: inside the implicated class the cut looks for a gap. Measured
    on the CIFAR-10 subset at 10% poison (isolation model after 10 epochs), cut inside the class: loss
    alone P/R 0.960/0.992 (BadNets), 1.0/1.0 (SIG); fused with strip and knn_density 0.980/0.961 and
    0.998/0.998, and at BadNets 5% 0.941/0.937 alone against 1.0/0.969 fused."""
    if not names:
        return None
    parts = [robust_z(torch.from_numpy(-suspicion_score(history)))]
    parts += [robust_z(torch.as_tensor(signals[n], dtype=torch.float64)) for n in names]
    return -torch.stack(parts).mean(0).numpy()


def choose(history: np.ndarray, store: Store, p: IsolateParams, fused: np.ndarray | None = None,
           feats: torch.Tensor | None = None):
    """(isolated indices, the score they were ranked by (low = suspicious), a report of the rule), per
    `isolate.selection`; `fused` (from `fused_suspicion`) replaces the loss as the ranking. The report's
    `evidence` is the adaptive rule's ("group", "weak" or "none"), None for the ratio rule. A separated group is
    refined over `feats` (the isolation model's penultimate features) when `isolate.refine_k` is set; a fallback's
    share is no group and is left as it is."""
    suspicion = suspicion_score(history)
    rank_by = fused if fused is not None else history[:, -1] if p.selection == "ratio" else suspicion
    if p.ratio == 0:
        return np.empty(0, dtype=np.int64), rank_by, {"rule": "off (isolate.ratio: 0)", "evidence": None}
    if p.selection == "ratio":
        return lowest(rank_by, store.ids, p.ratio), rank_by, {"rule": "ratio", "evidence": None}
    isolated, report = adaptive_selection(suspicion, store.labels, store.ids, p, rank_by, history[:, -1])
    if report["evidence"] == "group" and p.refine_k and feats is not None:
        refined = refine_by_neighbours(feats, store.labels, isolated, p)
        report["refined"] = {"dropped": int(len(np.setdiff1d(isolated, refined))),
                             "added": int(len(np.setdiff1d(refined, isolated)))}
        isolated = refined
    return isolated, rank_by, report


def run(params: Params) -> None:
    device = pick_device(params.device)
    store = load_store(paths.TRAIN_STORE)
    t0 = time.perf_counter()
    model, spec, history = train_lga(params, store, device)
    train_seconds = time.perf_counter() - t0
    dp = params.detect
    t0 = time.perf_counter()
    x = to_tensor(store.x, device)
    refine = params.isolate.refine_k and params.isolate.selection == "adaptive"
    feats = features(model, x) if refine or set(dp.training) - {"strip"} else None  # one pass for all who need them
    signals = {name: v.cpu().numpy() for name, v in training_scores(
        model, x, torch.from_numpy(store.labels).to(device), dp.training, dp, params.seed, feats).items()}
    detect_seconds = time.perf_counter() - t0
    fused = fused_suspicion(history, signals, dp.fusion)
    isolated, score, rule = choose(history, store, params.isolate, fused, feats[-1] if refine else None)

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
        for name, values in signals.items():  # each detector: higher = more suspicious
            scores[name] = np.round(values, 4)
        if fused is not None:
            scores["fused"] = (-fused).round(4)
        scores["rank"] = rank
        scores["isolated"] = is_isolated.astype(int)
        scores.to_csv(out / paths.SCORES_CSV.name, index=False)
        order = isolated[np.argsort(rank[isolated])]
        write_csv(out / paths.ISOLATED_CSV.name, ["id", "label", "final_loss", "rank"],
                  [(store.ids[i], int(store.labels[i]), round(float(history[i, -1]), 6), int(rank[i])) for i in order])
    # unlearn reads `evidence`: whether isolation found anything it can unlearn from this model.
    save_checkpoint(paths.ISOLATE_MODEL, model, spec, {"seed": params.seed, "evidence": rule["evidence"]})

    # Mean loss per epoch of the isolated and the kept samples: the ABL signature, for `dvc plots`.
    kept = ~is_isolated
    write_csv(paths.PLOTS / "isolate_loss.csv", ["epoch", "isolated", "kept"], [
        (e + 1, round(float(history[is_isolated, e].mean()), 6) if is_isolated.any() else "",
         round(float(history[kept, e].mean()), 6)) for e in range(history.shape[1])])
    def log_cut(v: float) -> str:
        return f"cut: loss {10 ** v:.2g}"

    if fused is not None:
        isolation_plots(history, score, "fused score: minus the mean robust z of loss and detectors", isolated,
                        paths.PLOTS)
    elif params.isolate.selection == "ratio":
        isolation_plots(history, np.log10(score + LOG_FLOOR), "log10 loss at the last epoch", isolated, paths.PLOTS,
                        log_cut)
    else:  # the mean log-loss: a log already
        isolation_plots(history, score / np.log(10), "log10 loss, geometric mean over the isolation epochs", isolated,
                        paths.PLOTS, log_cut)
    metrics = isolation_metrics(store, isolated)
    write_json(paths.metrics_file("isolate"), {"device": device.type, "selection": rule, **metrics,
                                                "detectors": list(signals), "fusion": dp.fusion,
                                                "detect_seconds": round(detect_seconds, 2),
                                                "isolate_seconds": round(train_seconds, 2)})
    print(f"[isolate] isolated {len(isolated)} of {len(store)} samples ({rule['rule']}); " +
          ", ".join(f"{k}={v}" for k, v in metrics.items() if k.startswith("isolation_")), file=sys.stderr)
