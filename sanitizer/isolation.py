"""Isolation: Anti-Backdoor Learning stage one (Li et al., NeurIPS 2021, sec. 4.1), and how suspects are chosen.

Train from scratch with the LGA loss sign(L - gamma) * L and record every sample's loss after each epoch: backdoor
samples are learned fastest, so they sit at the bottom. Plain ABL isolates a fixed share; the full defense sizes the
isolated set from the loss curves fused with malicious-example detectors (docs/method.md, "Isolation").
The red-team truth is never read here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch

from sanitizer.config import Params
from sanitizer.data import Store
from sanitizer.paths import SUSPECT_COLUMNS
from sanitizer.detectors import TRAINING_DETECTORS, features, robust_z, training_scores
from sanitizer.models import build_model, model_spec
from sanitizer.rules import DataRules
from sanitizer.train import (Progress, channel_stats, lga_loss, make_optimizer, per_sample_losses, seed_everything,
                             to_tensor, train_epoch, train_settings)

FUSED_DETECTORS = ("strip", "knn_density")  # fused with the loss: one model-sensitivity, one feature-space detector


@dataclass(frozen=True)
class Selection:
    """How suspects are chosen from the loss curves (`adaptive_selection`); ratio and max_ratio are params.advanced."""
    ratio: float  # the share isolated when no group separates (plain ABL's fixed share)
    max_ratio: float  # never isolate more than this share of the set
    adaptive: bool = True  # False: plain ABL, the `ratio` lowest final losses
    concentrate: bool = True  # isolate only the implicated label: an all-to-one backdoor lives in one label
    min_separation: float = 3.5  # pooled SDs (of the mean log-loss) a low group must lie below the rest to count
    class_margin: float = 1.2  # a class's own split counts when this many times clearer than the next class's
    weak_margin: float = 1.1  # no group: evidence is "weak", not "none", when one class stands out this much
    refine_k: int = 20  # neighbours (penultimate features) that decide membership in the implicated class; 0: off
    refine_keep: float = 0.5  # an isolated sample stays when this share of its neighbours is isolated
    refine_add: float = 0.9  # a class-mate joins when this share of its neighbours is isolated
    fusion: tuple[str, ...] = field(default=FUSED_DETECTORS)  # detectors fused with the loss; (): the loss alone


def selection_for(params: Params, rules: DataRules) -> Selection:
    """The selection of `defense.method`: the full defense's, or plain ABL's fixed share of the lowest final losses
    (also the full defense's on easy data, `rules.isolation`: sanitizer/rules.py)."""
    adv = params.advanced.isolate
    if params.defense.method == "abl" or rules.isolation == "share":
        return Selection(ratio=adv.ratio, max_ratio=adv.max_ratio, adaptive=False, refine_k=0, fusion=())
    return Selection(ratio=adv.ratio, max_ratio=adv.max_ratio)


def implicated_class(labels: np.ndarray) -> int:
    """The label most suspects carry: where a backdoor points (ABL isolates it in one class)."""
    return int(np.bincount(labels).argmax())


IMPLICATED_SHARE = 0.1  # a label with this share of the suspects is implicated too: several backdoors, several labels


def implicated_classes(labels: np.ndarray) -> list[int]:
    """The labels the suspects point at, most first: `implicated_class`, and every other label that holds at least
    IMPLICATED_SHARE of them (an isolation that found several groups)."""
    counts = np.bincount(labels)
    return [int(c) for c in np.argsort(-counts, kind="stable")
            if counts[c] and (c == counts.argmax() or counts[c] >= IMPLICATED_SHARE * len(labels))]


def lowest(score: np.ndarray, ids: np.ndarray, ratio: float) -> np.ndarray:
    """Indices of the round(ratio * N) lowest scores; ties broken by id (reproducible)."""
    n = int(round(ratio * len(score)))
    return np.sort(np.lexsort((ids, score))[:n])


LOG_FLOOR = 1e-6  # float32 cross-entropy of a sure prediction reaches 0; log needs a floor


def suspicion_score(loss_history: np.ndarray) -> np.ndarray:
    """Mean log-loss over all isolation epochs: low = learned early and kept learned.

    In log space a backdoor sample sits orders of magnitude below clean ones (docs/method.md, "Isolation"), and
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
    large one: in a class that a clean-label backdoor fills nearly whole, Otsu splits the poison itself
    where this cut falls before the few clean samples (docs/method.md, "Isolation")."""
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


def adaptive_selection(score: np.ndarray, labels: np.ndarray, ids: np.ndarray, p: Selection,
                       cut_score: np.ndarray | None = None, final_loss: np.ndarray | None = None):
    """Isolation sized from the loss curves instead of a fixed share (docs/method.md, "Isolation").

    `score` (low = suspicious) is the mean log-loss over the isolation epochs (`suspicion_score`); `cut_score`
    (default: `score`) ranks the samples inside the implicated class (the fused score, `fused_suspicion`).
    1. Otsu's threshold splits the whole set in two; the low group counts when it lies `min_separation` pooled
       standard deviations below the rest. With `concentrate`, only its majority label (the implicated class) is
       isolated, cut inside the class by Kittler-Illingworth on either score.
    2. Otherwise each class is split on its own: one class whose split is clear and `class_margin` times clearer
       than any other's is implicated and cut the same way.
    3. Otherwise the `ratio` lowest `cut_score`s and (given `final_loss`) plain ABL's `ratio` lowest final losses.
       The report's `evidence` is "weak" when one class still stands out (`weak_margin`), "none" when all look
       alike: the released model then starts from fresh weights and takes a second look (sanitizer/recheck.py).
       After rules 1 and 2 it is "group".
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
            # (docs/method.md, "Isolation").
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


def refine_by_neighbours(feats: torch.Tensor, labels: np.ndarray, isolated: np.ndarray, p: Selection) -> np.ndarray:
    """The isolated set, smoothed over the isolation model's feature space: within the implicated class, an isolated
    sample stays when `refine_keep` of its `refine_k` nearest class-mates (cosine, penultimate features) are isolated
    too, and a class-mate joins when `refine_add` of its neighbours are. The model that learned the trigger puts its
    samples in one clump, away from the class's clean ones (the label-consistency check of Peri et al. 2020)."""
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


def train_lga(params: Params, store: Store, rules: DataRules, device: torch.device):
    """Returns the model, its spec and the loss history [N, epochs]."""
    seed_everything(params.seed)
    mean, std = channel_stats(store.x)
    spec = model_spec(store.image_shape, len(store.class_names), params.model.width, mean, std)
    model = build_model(spec).to(device)
    x, y = to_tensor(store.x, device), torch.from_numpy(store.labels).to(device)
    tp, epochs, gamma = train_settings(params, rules), params.train.isolate_epochs, params.advanced.isolate.gamma
    opt = make_optimizer(model, tp.lr, tp)
    gen = torch.Generator(device=device).manual_seed(params.seed)
    history = np.zeros((len(store), epochs), dtype=np.float32)
    progress = Progress("isolate", epochs, len(store))
    augment = rules.augment_isolation
    for epoch in range(epochs):
        train_loss = train_epoch(model, opt, x, y, lambda losses: lga_loss(losses, gamma), tp.batch_size, gen,
                                 tp.crop_padding if augment else 0, tp.flip and augment)
        history[:, epoch] = per_sample_losses(model, x, y).cpu().numpy()
        progress.epoch(epoch + 1, lga_loss=train_loss, mean_loss=float(history[:, epoch].mean()))
    return model, spec, history


def fused_suspicion(history: np.ndarray, signals: dict[str, np.ndarray], names) -> np.ndarray | None:
    """Minus the mean of robust z-scores (median / MAD over the training set) of minus the loss score and of each
    named detector's score; low = suspicious, like the loss. z-scores keep the gaps that ranks would erase, and the
    cut inside the implicated class looks for a gap. None without detectors."""
    if not names:
        return None
    parts = [robust_z(torch.from_numpy(-suspicion_score(history)))]
    parts += [robust_z(torch.as_tensor(signals[n], dtype=torch.float64)) for n in names]
    return -torch.stack(parts).mean(0).numpy()


def choose(history: np.ndarray, store: Store, p: Selection, fused: np.ndarray | None = None,
           feats: torch.Tensor | None = None):
    """(isolated indices, the score they were ranked by (low = suspicious), a report of the rule). `fused` (from
    `fused_suspicion`) replaces the loss as the ranking. The report's `evidence` is the adaptive rule's ("group",
    "weak" or "none"), None for plain ABL's share. A separated group is refined over `feats` (the isolation model's
    penultimate features); a fallback's share is no group and is left as it is.

    Several backdoors may aim at several labels at once (an attacker's option, and the canaries'): after a group is
    isolated, its label leaves the pool and the rule looks again at the other labels, until it finds no group. Each
    group's report is kept in `groups`."""
    suspicion = suspicion_score(history)
    rank_by = fused if fused is not None else suspicion if p.adaptive else history[:, -1]
    if not p.adaptive:
        return lowest(rank_by, store.ids, p.ratio), rank_by, {"rule": "ratio", "evidence": None}
    labels, pool, groups = store.labels, np.arange(len(store)), []
    isolated, cap = np.empty(0, dtype=np.int64), int(round(p.max_ratio * len(store)))
    fallback = None
    while len(np.unique(labels[pool])) > 1 and len(isolated) < cap:  # rules 1 and 2, one label a round
        chosen, report = adaptive_selection(suspicion[pool], labels[pool], store.ids[pool], p, rank_by[pool],
                                            history[pool, -1])
        if report["evidence"] != "group":
            fallback = (pool[chosen], report)
            break
        groups.append(report)
        isolated = np.union1d(isolated, _refined(pool[chosen], feats, labels, p, report))
        pool = pool[labels[pool] != report["implicated_label"]]
    if not groups:  # no group: the fallback's share, as the rule reports it (one label: nothing to compare)
        chosen, report = fallback or (np.empty(0, dtype=np.int64), {"rule": "one label", "evidence": "none"})
        return chosen, rank_by, report
    if len(isolated) > cap:
        isolated = np.sort(isolated[np.lexsort((store.ids[isolated], rank_by[isolated]))[:cap]])
    report = {**groups[0], "evidence": "group", "implicated_labels": [g["implicated_label"] for g in groups],
              "groups": groups}
    return isolated, rank_by, report


def _refined(chosen: np.ndarray, feats, labels: np.ndarray, p: Selection, report: dict) -> np.ndarray:
    """`refine_by_neighbours` of one label's group, recorded in its report."""
    if not p.refine_k or feats is None:
        return chosen
    refined = refine_by_neighbours(feats, labels, chosen, p)
    report["refined"] = {"dropped": int(len(np.setdiff1d(chosen, refined))),
                         "added": int(len(np.setdiff1d(refined, chosen)))}
    return refined


@dataclass
class Isolation:
    """What isolation learned: the model, each sample's loss per epoch and detector scores (higher = more suspicious),
    the suspects (indices), the score they were ranked by (low = suspicious) and the rule's report."""
    model: torch.nn.Module
    spec: dict
    history: np.ndarray
    signals: dict[str, np.ndarray]
    penultimate: torch.Tensor
    isolated: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    score: np.ndarray | None = None
    report: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


def train_isolation(params: Params, store: Store, rules: DataRules, device: torch.device,
                    detectors=TRAINING_DETECTORS) -> Isolation:
    """The isolation model (LGA) and the training-set detectors scored with it; no choice yet (`select`)."""
    t0 = time.perf_counter()
    model, spec, history = train_lga(params, store, rules, device)
    t1 = time.perf_counter()
    x = to_tensor(store.x, device)
    feats = features(model, x)
    signals = {name: v.cpu().numpy() for name, v in training_scores(
        model, x, torch.from_numpy(store.labels).to(device), detectors, params.seed, feats).items()}
    return Isolation(model, spec, history, signals, feats[-1], seconds={
        "isolate_seconds": round(t1 - t0, 2), "detect_seconds": round(time.perf_counter() - t1, 2)})


def select(isolation: Isolation, store: Store, p: Selection) -> Isolation:
    """The suspects of `isolation` under selection `p` (a new Isolation; the model and scores are shared)."""
    fused = fused_suspicion(isolation.history, isolation.signals, p.fusion)
    isolated, score, report = choose(isolation.history, store, p, fused, isolation.penultimate)
    ranked_by = "fused" if fused is not None else "log_loss" if p.adaptive else "final_loss"
    report = {**report, "fusion": list(p.fusion), "ranked_by": ranked_by}
    return Isolation(isolation.model, isolation.spec, isolation.history, isolation.signals, isolation.penultimate,
                     isolated, score, report, isolation.seconds)


def choose_suspects(isolation: Isolation, store: Store, params: Params, rules: DataRules) -> Isolation:
    """`select` by `defense.method` (off: no suspect, the ranking kept for the review)."""
    chosen = select(isolation, store, selection_for(params, rules))
    if params.defense.method == "off":
        return replace(chosen, isolated=chosen.isolated[:0], report={**chosen.report, "rule": "off (defense.method: off)",
                                                                      "evidence": None})
    return chosen


def isolate(params: Params, store: Store, rules: DataRules, device: torch.device) -> Isolation:
    """ABL stage one as the pipeline runs it: `train_isolation`, then `choose_suspects`."""
    return choose_suspects(train_isolation(params, store, rules, device), store, params, rules)


def isolation_table(isolation: Isolation, store: Store) -> pd.DataFrame:
    """Isolation's suspects as the quarantine reads them (data/isolate/isolated.csv): id, label, signal, score (higher
    = more suspicious), most suspicious first."""
    order = isolation.isolated[np.lexsort((store.ids[isolation.isolated], isolation.score[isolation.isolated]))]
    ranked_by = isolation.report.get("ranked_by", "final_loss")
    low = isolation.score[order]  # the ranking, low = suspicious: a final loss in plain ABL's, a log or fused score else
    score = -np.log(low + LOG_FLOOR) if ranked_by == "final_loss" else -low
    return pd.DataFrame({"id": store.ids[order], "label": store.labels[order].astype(int),
                         "signal": f"isolation:{ranked_by}", "score": np.round(score, 4)}, columns=SUSPECT_COLUMNS)

