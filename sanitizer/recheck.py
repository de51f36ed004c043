"""The second look: when isolation found no evidence, a model trained afresh on the kept set looks again.

A trigger too rare for isolation to see, or one that is learned late (a warp), leaves no low-loss group; but a model
trained on the whole kept set learns it all the same. Three signals (docs/method.md, "Second look") each implicate a
label when enough of their most suspicious share carries it; the label's samples past Kittler's cut are flagged.
Flagged samples go to the quarantine like isolation's suspects; the unlearn stage then unlearns them from this model
(sanitizer/unlearning.py `unlearn_flags`); this stage finds the poison that escaped the flags by doing the same.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from sanitizer.config import Params
from sanitizer.data import Store
from sanitizer.detectors import WHITEN_RIDGE, centroid_distance, features, input_spectral, noise_fragility
from sanitizer.isolation import kittler_split, lowest
from sanitizer.models import build_model
from sanitizer.paths import SUSPECT_COLUMNS
from sanitizer.train import TrainSettings, per_sample_losses, seed_everything, to_tensor
from sanitizer.unlearning import Unlearning, finetune, holdout_split, unlearn_flags

POOL_MIN = 50  # the fewest most-suspicious samples whose labels may implicate one: a share of a dozen is noise
NOISE_SIGMA = 0.02  # noise_fragility: standard deviation of the Gaussian noise, in [0, 1] pixels
NOISE_DRAWS = 2  # noise draws per sample
# The share of a signal's most suspicious samples that one label must hold to implicate it (docs/method.md):
IMPLICATING_SHARE = {"input_spectral": 0.6, "fragility": 0.75, "centroid_distance": 0.4}


def second_look_runs(params: Params, evidence: str | None) -> bool:
    """The second look runs when the full defense's isolation found no evidence of a backdoor ("none")."""
    return params.defense.method == "full" and evidence == "none"


@dataclass
class SecondLook:
    """The second look's model (trained on the kept set, nothing unlearned yet), what it flagged (indices into the
    kept set: `first` by the recheck's signals, `escaped` by the loss after unlearning them), each flag's signal
    and score (higher = more suspicious), its training curve and a report."""
    model: torch.nn.Module
    first: np.ndarray
    escaped: np.ndarray
    signal: dict[int, tuple[str, float]] = field(default_factory=dict)
    curve: list = field(default_factory=list)
    report: dict = field(default_factory=dict)


def recheck(model, ratio: float, seed: int, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, dict, dict]:
    """The flags of a model trained on the whole kept set (x, y): (flagged indices, a report, each signal's scores).

    Tried in order, each on its most suspicious `ratio` share (at least POOL_MIN samples for the first and last):
    - input_spectral: one pattern added to every poisoned image stands out in whitened pixels, learned or not;
    - fragility: a warping trigger is a fine resampling pattern that slight noise masks (`noise_fragility`);
    - centroid_distance: dirty-label poison, images of other classes, sits far from its label's mean feature.
    Inside the implicated label, the implicating signal's Kittler cut flags (and the centroid distance's too when
    fragility implicated it: fragility alone singles out too few)."""
    labels = y.cpu().numpy()
    signals = {"input_spectral": input_spectral(x, y, WHITEN_RIDGE).cpu().numpy(),
               "fragility": noise_fragility(model, x, y, NOISE_SIGMA, NOISE_DRAWS, seed).cpu().numpy(),
               "centroid_distance": centroid_distance(features(model, x)[-1], y).cpu().numpy()}
    found: dict = {"label": None, "implicated_by": None, "n_flagged": 0}
    for name, signal in signals.items():
        share_of = ratio if name == "fragility" else max(ratio, min(POOL_MIN / max(len(labels), 1), 1.0))
        top = lowest(-signal, np.arange(len(labels)), share_of)
        counts = np.bincount(labels[top]) if len(top) else np.zeros(1, dtype=np.int64)
        share = float(counts.max() / max(len(top), 1))
        found[f"{name}_share"], found[f"{name}_label"] = round(share, 4), int(counts.argmax())
        if found["label"] is None and len(top) and share >= IMPLICATING_SHARE[name]:
            found["label"], found["implicated_by"] = int(counts.argmax()), name
    flagged = np.empty(0, dtype=np.int64)
    if found["label"] is not None:
        pool = np.flatnonzero(labels == found["label"])
        by = found["implicated_by"]
        for name in ["fragility", "centroid_distance"] if by == "fragility" else [by]:
            flagged = np.union1d(flagged, pool[-signals[name][pool] <= kittler_split(-signals[name][pool])])
    found["n_flagged"] = int(len(flagged))
    print(f"[recheck] {found['input_spectral_share']:.0%} of the farthest out in whitened pixels carry label "
          f"{found['input_spectral_label']}, {found['fragility_share']:.0%} of the most fragile samples label "
          f"{found['fragility_label']}, {found['centroid_distance_share']:.0%} of the farthest from their label's mean "
          f"feature label {found['centroid_distance_label']}; {len(flagged)} flagged", file=sys.stderr)
    return flagged, found, signals


def escaped_poison(model, x: torch.Tensor, y: torch.Tensor, flagged: np.ndarray,
                   label: int) -> tuple[np.ndarray, np.ndarray]:
    """After the flagged samples were unlearned, the label's other samples past Kittler's cut of their loss, and their
    losses. Unlearning breaks the trigger -> label link, so dirty-label poison the flags missed loses the trigger's
    support and its loss rises, while the label's clean samples keep theirs."""
    labels = y.cpu().numpy()
    rest = np.setdiff1d(np.flatnonzero(labels == label), flagged)
    if len(rest) < 2:
        return rest[:0], np.empty(0)
    index = torch.from_numpy(rest).to(x.device)
    loss = per_sample_losses(model, x[index], y[index]).cpu().numpy()
    cut = -loss <= kittler_split(-loss)
    return rest[cut], loss[cut]


def second_look(params: Params, kept: Store, spec: dict, u: Unlearning, tp: TrainSettings, device: torch.device,
                watch=None) -> SecondLook:
    """Train a model afresh on the kept set for the whole budget (isolate + finetune epochs), recheck it, and find
    the poison that escaped the flags by unlearning them from a copy (the unlearn stage repeats that unlearning)."""
    seed_everything(params.seed)
    model = build_model(spec).to(device)
    x, y = to_tensor(kept.x, device), torch.from_numpy(kept.labels).to(device)
    _, shown = holdout_split(len(kept), u.holdout, params.seed)  # the curve's accuracy: a share of the training set
    gen = torch.Generator(device=device).manual_seed(params.seed)
    curve: list = []
    finetune(model, tp, x, y, x[shown], y[shown], gen, curve, watch,
             params.train.isolate_epochs + params.train.finetune_epochs, phase="restart")
    first, found, signals = recheck(model, params.advanced.isolate.ratio, params.seed, x, y)
    flags = {int(i): (f"recheck:{found['implicated_by']}", float(signals[found["implicated_by"]][i])) for i in first}
    escaped = np.empty(0, dtype=np.int64)
    if len(first) and found["implicated_by"] == "fragility":
        # Only after fragility: after a feature implication the poison is rare and the cut caught most of it.
        found_escaped: list = []

        def find(trial) -> np.ndarray:
            idx, loss = escaped_poison(trial, x, y, first, found["label"])
            found_escaped.extend(zip(idx.tolist(), loss.tolist()))
            return idx

        trial = copy.deepcopy(model)
        unlearn_flags(trial, params, u, tp, x, y, first, find, watch_class=False, curve=[])
        escaped = np.array(sorted(i for i, _ in found_escaped), dtype=np.int64)
        flags.update({int(i): ("recheck:escaped_loss", float(loss)) for i, loss in found_escaped})
    report = {**found, "n_escaped": int(len(escaped)), "n_trained": len(kept)}
    return SecondLook(model, first, escaped, flags, curve, report)


def flagged_table(look: SecondLook | None, kept: Store | None) -> pd.DataFrame:
    """The second look's flags as the quarantine reads them (data/recheck/flagged.csv), most suspicious first."""
    if look is None or not look.signal:
        return pd.DataFrame(columns=[*SUSPECT_COLUMNS, "round"])
    first = set(look.first.tolist())
    rows = [(kept.ids[i], int(kept.labels[i]), signal, round(score, 6), "first" if i in first else "escaped")
            for i, (signal, score) in look.signal.items()]
    table = pd.DataFrame(rows, columns=[*SUSPECT_COLUMNS, "round"])
    return table.sort_values(["round", "score"], ascending=[False, False], kind="stable").reset_index(drop=True)
