"""Unlearning: ABL stage two (Li et al., NeurIPS 2021, sec. 4.2), and the released model's training.

Continue from the isolation model: fine-tune on the clean set with cross-entropy, then unlearn the quarantined
suspects, which breaks the trigger -> target link: plain ABL's gradient ascent, or the full defense's joint mode,
where every clean batch also pushes the suspects away from their label. A held-out share of the clean set watches
clean accuracy; an epoch that costs too much of it is rolled back and retried at half the learning rate. After a
separated group, a short clean fine-tune repairs what unlearning cost. When isolation found no evidence, the released
model starts from the second look's model (sanitizer/recheck.py) and its flags are unlearned (`after_second_look`).
docs/method.md, "Unlearning", says why.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass

import numpy as np
import torch

from sanitizer.config import Params
from sanitizer.data import Store
from sanitizer.isolation import implicated_class, implicated_classes
from sanitizer.models import reinitialise
from sanitizer.train import (Progress, TrainSettings, accuracy, joint_unlearn_epoch, make_optimizer, seed_everything,
                             to_tensor, train_epoch)


@dataclass(frozen=True)
class Unlearning:
    """How suspects are unlearned; mode, epochs and lr follow `defense.method`, the rest are research constants."""
    mode: str  # "joint" (full defense) or "ascent" (plain ABL)
    epochs: int  # unlearning epochs (joint: passes over the clean set)
    lr: float
    holdout: float  # share of the clean set held out to watch clean accuracy
    max_accuracy_drop: float  # an epoch that costs more held-out accuracy is rolled back
    repair_epochs: int  # clean fine-tuning after unlearning a separated group (plain ABL: none)
    weight: float = 1.0  # joint: weight of the suspects' unlikelihood term
    stop_at: float = 0.05  # stop once at most this share of the suspects is still classified as its label
    anchor: bool = True  # joint: each batch also carries clean samples of the implicated class, as many as suspects
    suspects_per_batch: int = 16  # joint: suspects carried by each clean batch
    ascent_batch_size: int = 64  # ascent: batch size over the quarantined set
    retries: int = 2  # a rolled-back epoch is retried at half the learning rate, at most this many times in all
    implicated_keep: float = 0.5  # after a fallback, roll back when the implicated class keeps less than this share
    repair_lr: float = 2e-3  # learning rate of the repair epochs


ABL_ASCENT = {"mode": "ascent", "epochs": 20, "lr": 5e-4}  # Li et al. 2021, sec. 5: 20 epochs of ascent at 5e-4


def unlearning_for(params: Params) -> Unlearning:
    adv = params.advanced.unlearn
    common = {"holdout": adv.holdout, "max_accuracy_drop": adv.max_accuracy_drop}
    if params.defense.method == "abl":
        return Unlearning(**ABL_ASCENT, **common, repair_epochs=0)
    return Unlearning(mode="joint", epochs=adv.epochs, lr=adv.lr, **common, repair_epochs=1)


def holdout_split(n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (fit, holdout) index split of the clean set."""
    order = np.random.default_rng([seed, 0x40]).permutation(n)
    k = max(1, int(round(share * n)))
    return np.sort(order[k:]), np.sort(order[:k])


def finetune(model, tp: TrainSettings, x, y, x_val, y_val, gen, curve: list, watch, epochs: int,
             lr: float | None = None, phase: str = "finetune") -> None:
    """Cross-entropy on (x, y) with augmentation and a cosine schedule from `lr` (train.lr), for `epochs`; each epoch's
    held-out accuracy on (x_val, y_val) goes to `curve`."""
    opt = make_optimizer(model, lr or tp.lr, tp)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    progress = Progress(f"unlearn:{phase}", epochs, len(y))
    for epoch in range(epochs):
        loss = train_epoch(model, opt, x, y, lambda losses: losses.mean(), tp.batch_size, gen, tp.crop_padding, tp.flip)
        sched.step()
        acc = accuracy(model, x_val, y_val)
        curve.append({"phase": phase, "epoch": epoch + 1, "loss": loss, "clean_accuracy": acc,
                      **(watch(model) if watch else {})})
        progress.epoch(epoch + 1, loss=loss, clean_accuracy=acc)


def unlearn(model, u: Unlearning, tp: TrainSettings, xq, yq, x, y, x_val, y_val, gen, curve: list, watch=None,
            watch_class: bool = False) -> dict:
    """Unlearn the suspects (xq, yq) with a clean-accuracy check and rollback, and an early stop once at most
    `u.stop_at` of them are still classified as their label.

    The check leaves out held-out samples of the implicated classes (`implicated_classes`: several backdoors may be
    unlearned at once): unlearning is meant to change how the model treats those labels, so a drop there is the
    defense working. With `watch_class` (after a fallback, whose suspects may be
    easy clean samples of that class) the class is watched too, for collapse only (`u.implicated_keep`).
    """
    targets = implicated_classes(yq.cpu().numpy())
    target = targets[0]
    guard = ~torch.isin(y_val, torch.as_tensor(targets, device=y_val.device))
    baseline = accuracy(model, x_val[guard], y_val[guard])
    watch_implicated = watch_class and u.implicated_keep > 0 and bool((~guard).any())
    implicated_before = accuracy(model, x_val[~guard], y_val[~guard]) if watch_implicated else None
    anchors = torch.nonzero(torch.isin(y, torch.as_tensor(targets, device=y.device))).flatten() if u.anchor else None
    opt = torch.optim.SGD(model.parameters(), lr=u.lr, momentum=tp.momentum)
    progress = Progress(f"unlearn:{u.mode}", u.epochs, len(y) if u.mode == "joint" else len(yq))
    epochs_run, rolled_back, retries_left = 0, False, u.retries
    while epochs_run < u.epochs:
        previous, previous_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        if u.mode == "joint":
            loss, suspect_loss = joint_unlearn_epoch(model, opt, x, y, xq, yq, u.weight, tp.batch_size, gen,
                                                      u.suspects_per_batch, anchors)
        else:
            # Minimising -CE is ascent on the suspects' loss (ABL eq. 5); BN keeps its running statistics.
            suspect_loss = -train_epoch(model, opt, xq, yq, lambda losses: -losses.mean(), u.ascent_batch_size, gen,
                                        freeze_bn=True)
            loss = suspect_loss
        acc = accuracy(model, x_val[guard], y_val[guard])
        obeyed = accuracy(model, xq, yq)
        implicated = accuracy(model, x_val[~guard], y_val[~guard]) if watch_implicated else None
        collapsed = watch_implicated and implicated < u.implicated_keep * implicated_before
        if baseline - acc > u.max_accuracy_drop or collapsed:
            model.load_state_dict(previous)
            opt.load_state_dict(previous_opt)
            lr = opt.param_groups[0]["lr"]
            fell = (f"[unlearn] class(es) {targets}' held-out accuracy fell from {implicated_before:.3f} to {implicated:.3f}"
                    if collapsed else f"[unlearn] guard accuracy fell {baseline - acc:.3f} below {baseline:.3f}")
            fell += f" at lr {lr:g}: rolled back epoch {epochs_run + 1}"
            if not retries_left:
                rolled_back = True
                print(f"{fell} and stopped", file=sys.stderr)
                break
            # One bad epoch at this lr does not prove unlearning cannot work: a smaller step may.
            retries_left -= 1
            for group in opt.param_groups:
                group["lr"] = lr / 2
            print(f"{fell}, retrying at lr {lr / 2:g}", file=sys.stderr)
            continue
        epochs_run += 1
        curve.append({"phase": u.mode, "epoch": epochs_run, "loss": loss, "clean_accuracy": accuracy(model, x_val, y_val),
                      **(watch(model) if watch else {})})
        progress.epoch(epochs_run, loss=loss, suspect_loss=suspect_loss, guard_accuracy=acc, suspects_obeyed=obeyed)
        # Unlearned: the model no longer maps the suspects to their label. Going on only erodes the implicated
        # class's clean samples, which share features with the suspects.
        if obeyed <= u.stop_at:
            break
    return {"unlearn_epochs_run": epochs_run, "rolled_back": rolled_back, "retries_used": u.retries - retries_left,
            "final_lr": opt.param_groups[0]["lr"], "implicated_class": target, "implicated_classes": targets,
            "suspects_obeyed": round(accuracy(model, xq, yq), 4),
            "guard_accuracy_before": round(baseline, 4),
            "guard_accuracy_after": round(accuracy(model, x_val[guard], y_val[guard]), 4),
            "implicated_watched": watch_implicated}


def unlearn_and_repair(model, u: Unlearning, tp: TrainSettings, xq, yq, x, y, x_val, y_val, gen, curve: list, watch,
                       repair: bool, watch_class: bool = False) -> dict:
    """`unlearn` the suspects, then, with `repair` (after a separated group), the repair epochs: a short, gentle
    fine-tune restores the clean features unlearning bent, without bringing the trigger back. Only after a group: a
    fixed share or a fallback leaves most poison in the clean set, and the repair would relearn it."""
    report = unlearn(model, u, tp, xq, yq, x, y, x_val, y_val, gen, curve, watch, watch_class)
    if u.repair_epochs and repair:
        finetune(model, tp, x, y, x_val, y_val, gen, curve, watch, u.repair_epochs, u.repair_lr, "repair")
        report["suspects_obeyed_after_repair"] = round(accuracy(model, xq, yq), 4)
    return report


def unlearning_suspects(labels: np.ndarray, evidence: str | None) -> np.ndarray:
    """Which quarantined isolation suspects (indices) are unlearned; the others stay quarantined all the same. After
    a fallback ("weak"), only the implicated label's: the fallback's union also holds easy clean samples of other
    classes, and unlearning them costs their classes' accuracy."""
    suspects = np.arange(len(labels))
    if evidence == "weak" and len(labels):
        return np.flatnonzero(labels == implicated_class(labels))
    return suspects


def sanitize(model, params: Params, u: Unlearning, tp: TrainSettings, clean: Store, suspects: Store,
             device: torch.device, evidence: str | None, watch=None) -> tuple[list, dict]:
    """Fine-tune the isolation model on the clean set, then unlearn the isolation suspects (`evidence` is isolation's:
    "group", "weak" or None for plain ABL's share). `defense.method: off` trains afresh on the clean set for the
    whole budget and unlearns nothing. Returns the curve (one dict per epoch) and a report; `model` changes in place."""
    seed_everything(params.seed)
    off = params.defense.method == "off"
    if off:
        reinitialise(model)
    chosen = unlearning_suspects(suspects.labels, evidence) if not off else np.empty(0, dtype=np.int64)
    unlearning = bool(len(chosen) and u.epochs)
    fit, val = holdout_split(len(clean), u.holdout, params.seed)
    if not unlearning:
        # The hold-out exists for unlearning's accuracy check; without unlearning it would only withhold training data.
        fit = np.arange(len(clean))
    x_all, y_all = to_tensor(clean.x, device), torch.from_numpy(clean.labels).to(device)
    x, y, x_val, y_val = x_all[fit], y_all[fit], x_all[val], y_all[val]
    gen = torch.Generator(device=device).manual_seed(params.seed)
    curve: list = []
    epochs = params.train.finetune_epochs + (params.train.isolate_epochs if off else 0)
    finetune(model, tp, x, y, x_val, y_val, gen, curve, watch, epochs)
    report: dict = {"unlearn_epochs_run": 0, "rolled_back": False}
    if unlearning:
        xq = to_tensor(suspects.x[chosen], device)
        yq = torch.from_numpy(suspects.labels[chosen]).to(device)
        report = unlearn_and_repair(model, u, tp, xq, yq, x, y, x_val, y_val, gen, curve, watch,
                                    repair=evidence == "group", watch_class=evidence == "weak")
    return curve, {"start": "fresh weights (defense off)" if off else "isolation model", "n_finetune": int(len(fit)),
                   "n_holdout": int(len(val)) if unlearning else 0, "n_unlearned": int(len(chosen)) if unlearning else 0,
                   "holdout_accuracy": round(accuracy(model, x_val, y_val), 4) if unlearning else None, **report}


def unlearn_flags(model, params: Params, u: Unlearning, tp: TrainSettings, x: torch.Tensor, y: torch.Tensor,
                  first: np.ndarray, escaped, watch_class: bool, curve: list, watch=None) -> tuple[dict, np.ndarray]:
    """Unlearn the second look's flags from its model (x, y: the set it trained on): `first`, then, unless that was
    rolled back, `first` with the escaped poison (`escaped`: indices, or a function of the model that finds them).
    When unlearning cannot break the link without costing clean accuracy, the model trains afresh without `first`.
    Returns (a report, the indices unlearned or left out); the seeded generator makes both stages' runs identical."""
    gen = torch.Generator(device=x.device).manual_seed(params.seed)

    def split_rest(flagged: np.ndarray):
        keep = np.setdiff1d(np.arange(len(y)), flagged)
        fit, val = holdout_split(len(keep), u.holdout, params.seed)
        return keep, keep[fit], keep[val]

    def unlearn_these(flagged: np.ndarray) -> dict:
        _, fit, val = split_rest(flagged)
        return unlearn_and_repair(model, u, tp, x[flagged], y[flagged], x[fit], y[fit], x[val], y[val], gen, curve,
                                  watch, repair=True, watch_class=watch_class)

    report = unlearn_these(first)
    if report["rolled_back"] and report["suspects_obeyed"] > u.stop_at:
        keep, _, shown = split_rest(first)
        reinitialise(model)
        finetune(model, tp, x[keep], y[keep], x[shown], y[shown], gen, curve, watch,
                 params.train.isolate_epochs + params.train.finetune_epochs, phase="retrain")
        return {**report, "retrained": True}, first
    more = escaped(model) if callable(escaped) else escaped
    if len(more):
        both = np.union1d(first, more)
        report["escaped_unlearning"] = unlearn_these(both)
        return report, both
    return report, first


def after_second_look(model, params: Params, u: Unlearning, tp: TrainSettings, ingested: Store, clean: Store,
                      manifest, found: dict, device: torch.device, curve: list, watch=None) -> dict:
    """The released model from the second look's: its flags that the reviewer did not release are unlearned
    (`unlearn_flags`, as the recheck stage did). The second look trained on the ingested set less isolation's
    suspects; when the reviewer released some of those, it never saw them, and the model trains afresh on the clean
    set instead."""
    signal, decision = manifest["signal"].astype(str), manifest["decision"].astype(str)
    isolation_ids = manifest.loc[signal.str.startswith("isolation"), "id"].to_numpy()
    trained = ingested.subset(np.flatnonzero(~np.isin(ingested.ids, isolation_ids)))
    x, y = to_tensor(trained.x, device), torch.from_numpy(trained.labels).to(device)
    report = {"start": "second look's model", "n_trained_before": len(trained)}
    if (decision[signal.str.startswith("isolation")] == "release").any():
        seed_everything(params.seed)
        reinitialise(model)
        xc, yc = to_tensor(clean.x, device), torch.from_numpy(clean.labels).to(device)
        _, shown = holdout_split(len(clean), u.holdout, params.seed)
        gen = torch.Generator(device=device).manual_seed(params.seed)
        finetune(model, tp, xc, yc, xc[shown], yc[shown], gen, curve, watch,
                 params.train.isolate_epochs + params.train.finetune_epochs, phase="retrain")
        return {**report, "start": "fresh weights: the reviewer released isolation suspects", "retrained": True}
    pending = decision != "release"
    position = {sample_id: k for k, sample_id in enumerate(trained.ids)}

    def indices(mask) -> np.ndarray:
        return np.array(sorted(position[i] for i in manifest.loc[mask & pending, "id"]), dtype=np.int64)

    escaped = indices(signal == "recheck:escaped_loss")
    first = indices(signal.str.startswith("recheck:") & (signal != "recheck:escaped_loss"))
    if not len(first):
        first, escaped = escaped, escaped[:0]
    if not len(first):
        return {**report, "n_unlearned": 0}
    watch_class = found.get("implicated_by") in ("centroid_distance", "input_spectral")
    unlearned, done = unlearn_flags(model, params, u, tp, x, y, first, escaped, watch_class, curve, watch)
    return {**report, **unlearned, "n_unlearned": int(len(done))}
