"""unlearn: ABL stage two (Li et al., NeurIPS 2021, sec. 4.2).

Continue from the isolation checkpoint (or, when isolation found no evidence of a backdoor, from a
fresh initialisation: `unlearn.restart`, optionally trained on sub-pixel-resampled images:
`unlearn.restart_resample`): fine-tune on the clean set with cross-entropy, then unlearn
the quarantined suspects, which breaks the trigger -> target link: plain ABL gradient ascent
(`unlearn.mode: ascent`), or the joint mode (default), where every clean batch also pushes the
suspects away from their label. A held-out share of the clean set watches clean accuracy;
an epoch after which it dropped by more than `unlearn.max_accuracy_drop` is rolled back and retried at
half the learning rate (`unlearn.retries` times), then unlearning stops. When isolation found a separated
group, a short clean fine-tune at a low learning rate then repairs what unlearning cost
(`unlearn.repair_epochs`; plain ABL has none). When nothing is unlearned, nothing is held out: the model
trains on every clean sample. After a fresh start, the trained model takes a second look (`unlearn.recheck`)
for a trigger that isolation could not see because it is learned late (WaNet), and unlearns what it finds.
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import torch

from stages import paths
from stages.config import Params
from stages.data import Store, load_store
from stages.detectors import centroid_distance, features, input_spectral, noise_fragility
from stages.fileio import write_csv, write_json
from stages.isolate import kittler_split, lowest
from stages.models import load_checkpoint, reinitialise, save_checkpoint
from stages.plots import unlearn_plot
from stages.train import (Progress, accuracy, joint_unlearn_epoch, make_optimizer, per_sample_losses, pick_device,
                          seed_everything, to_tensor, train_epoch)


def holdout_split(n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (fit, holdout) index split of the clean set."""
    order = np.random.default_rng([seed, 0x40]).permutation(n)
    k = max(1, int(round(share * n)))
    return np.sort(order[k:]), np.sort(order[:k])


def finetune(model, params: Params, x, y, x_val, y_val, gen, curve: list, watch, epochs: int,
             lr: float | None = None, phase: str = "finetune", max_shift: float = 0.0) -> None:
    """Cross-entropy on the clean set with augmentation (and sub-pixel resampling up to `max_shift` pixels) and a
    cosine schedule from `lr` (train.lr), for `epochs`."""
    tp = params.train
    opt = make_optimizer(model, lr or tp.lr, tp)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    progress = Progress(f"unlearn:{phase}", epochs, len(y))
    for epoch in range(epochs):
        loss = train_epoch(model, opt, x, y, lambda losses: losses.mean(), tp.batch_size, gen, tp.crop_padding, tp.flip,
                           max_shift=max_shift)
        sched.step()
        acc = accuracy(model, x_val, y_val)
        curve.append({"phase": phase, "epoch": epoch + 1, "loss": loss, "clean_accuracy": acc,
                      **(watch(model) if watch else {})})
        progress.epoch(epoch + 1, loss=loss, clean_accuracy=acc)


def implicated_class(labels: np.ndarray) -> int:
    """The label most suspects carry: where a backdoor points (ABL isolates it in one class)."""
    return int(np.bincount(labels).argmax())


def unlearn(model, params: Params, xq, yq, x, y, x_val, y_val, gen, curve: list, watch=None,
            evidence: str | None = None, watch_class: bool = False) -> dict:
    """Unlearn the suspects (plain ABL ascent or joint), with a clean-accuracy guard and rollback, and
    an early stop once at most `unlearn.stop_at` of the suspects are still classified as their label.

    The guard leaves out held-out samples of the implicated class: unlearning is meant to change how
    the model treats samples labelled with it (poison that escaped isolation sits there), so a drop
    there is the defense working, not damage. After a fallback (`evidence` "weak"), or with `watch_class`, that class
    is watched too, for collapse only (`unlearn.implicated_keep`): the suspects may then be its easy clean samples.
    """
    up = params.unlearn
    target = implicated_class(yq.cpu().numpy())
    guard = y_val != target
    baseline = accuracy(model, x_val[guard], y_val[guard])
    watch_implicated = (evidence == "weak" or watch_class) and up.implicated_keep > 0 and bool((~guard).any())
    implicated_before = accuracy(model, x_val[~guard], y_val[~guard]) if watch_implicated else None
    anchors = torch.nonzero(y == target).flatten() if up.anchor else None
    opt = torch.optim.SGD(model.parameters(), lr=up.lr, momentum=params.train.momentum)
    progress = Progress(f"unlearn:{up.mode}", up.epochs, len(y) if up.mode == "joint" else len(yq))
    epochs_run, rolled_back, retries_left = 0, False, up.retries
    while epochs_run < up.epochs:
        previous, previous_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        if up.mode == "joint":
            loss, suspect_loss = joint_unlearn_epoch(model, opt, x, y, xq, yq, up.weight, params.train.batch_size, gen,
                                                      up.suspects_per_batch, anchors)
        else:
            # Minimising -CE is ascent on the suspects' loss (ABL eq. 5); BN keeps its running statistics.
            suspect_loss = -train_epoch(model, opt, xq, yq, lambda losses: -losses.mean(), up.batch_size, gen,
                                        freeze_bn=True)
            loss = suspect_loss
        acc = accuracy(model, x_val[guard], y_val[guard])
        obeyed = accuracy(model, xq, yq)
        implicated = accuracy(model, x_val[~guard], y_val[~guard]) if watch_implicated else None
        collapsed = watch_implicated and implicated < up.implicated_keep * implicated_before
        if baseline - acc > up.max_accuracy_drop or collapsed:
            model.load_state_dict(previous)
            opt.load_state_dict(previous_opt)
            lr = opt.param_groups[0]["lr"]
            fell = (f"[unlearn] class {target}'s held-out accuracy fell from {implicated_before:.3f} to {implicated:.3f}"
                    if collapsed else f"[unlearn] guard accuracy fell {baseline - acc:.3f} below {baseline:.3f}")
            fell += f" at lr {lr:g}: rolled back epoch {epochs_run + 1}"
            if not retries_left:
                rolled_back = True
                print(f"{fell} and stopped", file=sys.stderr)
                break
            # One bad epoch at this lr does not prove unlearning cannot work: a smaller step may (CIFAR-10
            # subset, Blend 10%: stopping at the first drop left ASR 1.0; the retry at half lr cost 0.044
            # of guard accuracy, within the limit, and ASR fell to 0.0).
            retries_left -= 1
            for group in opt.param_groups:
                group["lr"] = lr / 2
            print(f"{fell}, retrying at lr {lr / 2:g}", file=sys.stderr)
            continue
        epochs_run += 1
        curve.append({"phase": up.mode, "epoch": epochs_run, "loss": loss, "clean_accuracy": accuracy(model, x_val, y_val),
                      **(watch(model) if watch else {})})
        progress.epoch(epochs_run, loss=loss, suspect_loss=suspect_loss, guard_accuracy=acc, suspects_obeyed=obeyed)
        # Unlearned: the model no longer maps the suspects to their label. Going on only erodes the
        # implicated class's clean samples, which share features with the suspects (measured on digits:
        # test accuracy of class 0 fell from 0.99 to 0.69 over two more epochs with ASR already 0).
        if obeyed <= up.stop_at:
            break
    return {"unlearn_epochs_run": epochs_run, "rolled_back": rolled_back, "retries_used": up.retries - retries_left,
            "final_lr": opt.param_groups[0]["lr"], "implicated_class": target,
            "suspects_obeyed": round(accuracy(model, xq, yq), 4),
            "guard_accuracy_before": round(baseline, 4),
            "guard_accuracy_after": round(accuracy(model, x_val[guard], y_val[guard]), 4),
            "implicated_watched": watch_implicated}


def restarts(mode: str, evidence: str | None) -> bool:
    """Whether the released model starts from fresh weights instead of the isolation model (`unlearn.restart`).

    ABL fine-tunes the isolation model on purpose: it learned the backdoor, and unlearning the isolated
    samples breaks it. When adaptive isolation found no evidence (`evidence` "none": no separated group,
    no class standing out), there is nothing to unlearn it with, and the model keeps whatever it learned:
    its LGA training without augmentation learns a sparse trigger that standard training does not
    (CIFAR-10 subset, BadNets 1%: ASR 0.05 without any defense, 0.99 after fine-tuning the isolation
    model). A fresh start learns only what standard training on the sanitized set would."""
    return mode == "always" or (mode == "no_evidence" and evidence == "none")


def sanitize(model, params: Params, clean: Store, quarantined: Store, device: torch.device,
             watch=None, evidence: str | None = None) -> tuple[list, dict]:
    """Fine-tune `model` (the isolation checkpoint) on the clean set, then unlearn the quarantined set.
    `evidence` is the isolation report's: with `restarts(...)`, the model is first reinitialised and
    trained for isolate.epochs + finetune_epochs epochs, the budget of the isolation model it replaces.

    Returns the curve (one dict per epoch: phase, epoch, loss, held-out clean accuracy, and what
    `watch(model)` adds) and a report; the model is changed in place.
    """
    seed_everything(params.seed)
    restarted = restarts(params.unlearn.restart, evidence)
    if restarted:
        reinitialise(model)
    suspects = unlearning_suspects(quarantined.labels, restarted, evidence)
    unlearning = bool(len(suspects) and params.unlearn.epochs and params.isolate.ratio > 0)
    fit, val = holdout_split(len(clean), params.unlearn.holdout, params.seed)
    if not unlearning:
        # The hold-out exists for unlearning's accuracy check; without unlearning it would only withhold training data.
        # (Measured on the CIFAR-10 subset at 1% poison, the change in clean accuracy was within run-to-run noise:
        # BadNets 0.672 -> 0.652, SIG 0.652 -> 0.653; four seeds of standard training, bench.spread: 0.662-0.690.)
        # The curve then shows accuracy on that share of the training set, and the report no held-out figure.
        fit = np.arange(len(clean))
    x_all, y_all = to_tensor(clean.x, device), torch.from_numpy(clean.labels).to(device)
    x, y, x_val, y_val = x_all[fit], y_all[fit], x_all[val], y_all[val]
    gen = torch.Generator(device=device).manual_seed(params.seed)

    curve: list = []
    finetune(model, params, x, y, x_val, y_val, gen, curve, watch,
             params.unlearn.finetune_epochs + (params.isolate.epochs if restarted else 0),
             max_shift=params.unlearn.restart_resample if restarted else 0.0)
    report: dict = {"unlearn_epochs_run": 0, "rolled_back": False}
    n_unlearned = len(suspects) if unlearning else 0
    if unlearning:
        xq = to_tensor(quarantined.x[suspects], device)
        yq = torch.from_numpy(quarantined.labels[suspects]).to(device)
        report = unlearn_and_repair(model, params, xq, yq, x, y, x_val, y_val, gen, curve, watch, evidence)
    elif restarted and evidence == "none" and params.unlearn.recheck and params.isolate.ratio > 0:
        looked, flagged, val_flagged = second_look(model, params, x_all, y_all, gen, curve, watch)
        report.update(looked)
        if len(flagged):
            unlearning, n_unlearned, val = bool(len(val_flagged)), len(flagged), val_flagged
            x_val, y_val = x_all[val], y_all[val]
            fit = np.setdiff1d(np.arange(len(clean)), np.union1d(flagged, val))
    return curve, {"restarted": restarted, "n_finetune": int(len(fit)), "n_holdout": int(len(val)) if unlearning else 0,
                   "n_quarantined": len(quarantined), "n_unlearned": int(n_unlearned),
                   "holdout_accuracy": round(accuracy(model, x_val, y_val), 4) if unlearning else None, **report}


def unlearn_and_repair(model, params: Params, xq, yq, x, y, x_val, y_val, gen, curve: list, watch,
                       evidence: str | None, watch_class: bool = False) -> dict:
    """`unlearn` the suspects, then, after a separated group, the repair epochs."""
    report = unlearn(model, params, xq, yq, x, y, x_val, y_val, gen, curve, watch, evidence, watch_class)
    if params.unlearn.repair_epochs and evidence == "group":
        # Unlearning bends features that clean samples share with the suspects; a short, gentle fine-tune
        # restores them without bringing the trigger back. CIFAR-10 subset, one epoch at lr 0.002, clean accuracy
        # (no defense) and ASR: Blend 5% 0.637 -> 0.671 (0.683), ASR 0.000 -> 0.000; Blend 10% 0.641 -> 0.652
        # (0.666), 0.000 -> 0.002; BadNets 10% 0.651 -> 0.663 (0.669), 0.038 -> 0.049; SIG 10% 0.632 -> 0.628.
        # Only after a separated group was isolated: a fixed share or a fallback leaves most of the poison in the
        # clean set, and the repair relearns it (digits, BadNets 10%, the 1% share: ASR 0.19 -> 0.42).
        # `suspects_obeyed` is measured again after it: the share of suspects the model maps to their label.
        finetune(model, params, x, y, x_val, y_val, gen, curve, watch, params.unlearn.repair_epochs,
                 params.unlearn.repair_lr, "repair")
        report["suspects_obeyed_after_repair"] = round(accuracy(model, xq, yq), 4)
    return report


def second_look(model, params: Params, x: torch.Tensor, y: torch.Tensor, gen, curve: list, watch):
    """`recheck` the restarted model trained on the whole clean set (x, y); what it flags leaves training and is
    unlearned; when unlearning cannot break the link (rolled back, the flagged still obeyed) the model is trained
    again without them (`retrained` in the report); with `unlearn.recheck_loss`, when fragility implicated the label,
    the label is looked at once more (`escaped_poison`).
    Returns ({"recheck": its report, and unlearning's}, the flagged indices, the indices of the held-out share that
    watched clean accuracy, empty after a retrain)."""
    flagged, found = recheck(model, params, x, y)
    report: dict = {"recheck": found}
    # A label implicated by the feature signal alone may be a clean class whose far samples are merely unusual: its
    # held-out accuracy is watched for collapse (digits, a clean label 9 implicated: clean accuracy 0.992 -> 0.906).
    watch_class = found["implicated_by"] in ("centroid_distance", "input_spectral")

    def split_rest() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # The flagged samples leave training from here on; the accuracy check watches a share of the rest, which the
        # restarted model trained on (a drop there is forgetting all the same). (the rest, its fit and held-out shares)
        keep = np.setdiff1d(np.arange(len(y)), flagged)
        keep_fit, keep_val = holdout_split(len(keep), params.unlearn.holdout, params.seed)
        return keep, keep[keep_fit], keep[keep_val]

    def unlearn_flagged() -> tuple[np.ndarray, dict]:
        _, fit, val = split_rest()
        return val, unlearn_and_repair(model, params, x[flagged], y[flagged], x[fit], y[fit], x[val], y[val], gen,
                                       curve, watch, "group", watch_class)

    val = np.empty(0, dtype=np.int64)
    if len(flagged):
        val, unlearned = unlearn_flagged()
        report.update(unlearned)
        if unlearned["rolled_back"] and unlearned["suspects_obeyed"] > params.unlearn.stop_at:
            # Unlearning could not break the link without costing clean accuracy: train again from fresh weights
            # without the flagged samples, as the oracle does, for the restart's budget (CIFAR-10 subset, blend 1%:
            # the 51 flagged were all the poison, and every unlearning try cost 0.061-0.066 of held-out accuracy).
            keep, _, shown = split_rest()  # the curve's accuracy is shown on a share of what the model trains on
            reinitialise(model)
            finetune(model, params, x[keep], y[keep], x[shown], y[shown], gen, curve, watch,
                     params.isolate.epochs + params.unlearn.finetune_epochs, phase="retrain",
                     max_shift=params.unlearn.restart_resample)
            report["retrained"] = True
            val = val[:0]  # nothing held out: the model trained on all of the rest
        elif params.unlearn.recheck_loss and found["implicated_by"] == "fragility":
            # Only after fragility: after a feature implication the poison is rare and the cut caught most of it;
            # another cut there took clean samples, at a cost in clean accuracy (BadNets 1%: 186 more, 3 of them
            # poison, 0.676 -> 0.664; blend 1%, 276 more, 5 poison, 0.662 -> 0.657).
            escaped = escaped_poison(model, x, y, flagged, found["label"])
            found["escaped"] = int(len(escaped))
            if len(escaped):
                flagged = np.union1d(flagged, escaped)
                val, report["escaped_unlearning"] = unlearn_flagged()
    found["flagged"] = flagged.tolist()
    return report, flagged, val


def escaped_poison(model, x: torch.Tensor, y: torch.Tensor, flagged: np.ndarray, label: int) -> np.ndarray:
    """After the flagged samples were unlearned, the label's other samples past Kittler's cut of their loss.

    Unlearning breaks the trigger -> label link, so dirty-label poison that the recheck missed (an image of another
    class that carries the label) loses the trigger's support and its loss rises, while the label's clean samples
    keep theirs. CIFAR-10 subset, restarted model, in the label after unlearning: AUROC 0.83 (WaNet 10%, 140 poison
    left of 566) and 0.85 (WaNet 5%, 161 of 642); unlearning the cut too, ASR 0.066 -> 0.032 and 0.094 -> 0.034 at
    clean accuracy 0.649 -> 0.646 and 0.655 -> 0.659."""
    labels = y.cpu().numpy()
    rest = np.setdiff1d(np.flatnonzero(labels == label), flagged)
    if len(rest) < 2:
        return rest[:0]
    index = torch.from_numpy(rest).to(x.device)
    loss = per_sample_losses(model, x[index], y[index]).cpu().numpy()
    return rest[-loss <= kittler_split(-loss)]


POOL_MIN = 50  # the fewest far samples whose labels can implicate one (CIFAR-10 subset at isolate.ratio 0.01: 50)
RECHECK_DRAWS = 2  # noise draws per sample; measured at 2, the 1% most fragile of WaNet 10% were all poison


def recheck(model, params: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, dict]:
    """A second look for a backdoor the isolation model did not learn early (`unlearn.recheck`), with the model
    trained on the whole clean set, which by now has learned whatever trigger it holds.

    Three signals, each a share of the set (`isolate.ratio`; at least `POOL_MIN` samples for the first and last) that
    implicates a label when enough of it carries one, as isolation's class concentration does, tried in this order:
    - a trigger that adds one pattern to every poisoned image (a patch, a blend, SIG's sinusoid) stands out in
      whitened pixels whether or not a model learned it: the highest in `input_spectral`, `recheck_input_share` of them
      (CIFAR-10 subset at 1%: 0.94-0.98 for BadNets and blend, 0.74-0.76 for SIG, whose clean-label poison the other
      two signals miss; at most 0.34 elsewhere, 0.44 on digits);
    - a warping trigger (WaNet) is learned slowly, so ABL's low-loss signature never shows, but the trained model maps
      its samples to the target through a fine resampling pattern that slight noise masks: the most fragile samples
      (`noise_fragility`), `recheck_share` of them;
    - a dirty-label trigger too rare for isolation to see is learned all the same, and its samples, images of other
      classes, sit far from the label's mean feature: the farthest (`centroid_distance`), `recheck_centroid_share` of
      them (CIFAR-10 subset, restarted model: 0.22-0.58 at blend 1% from run to run, 0.42-0.46 at BadNets 1%, 0.20 on
      clean data).
    The implicated label's samples past Kittler's cut of the implicating signal, and of the centroid distance too when
    fragility implicated it, are flagged (CIFAR-10 subset, WaNet 10%: 459-490 flagged, precision 0.68-0.72, recall
    0.72-0.82)."""
    up = params.unlearn
    labels = y.cpu().numpy()
    signals = {"input_spectral": input_spectral(x, y, params.detect.whiten_ridge).cpu().numpy(),
               "fragility": noise_fragility(model, x, y, up.recheck_sigma, RECHECK_DRAWS, params.seed).cpu().numpy(),
               "centroid_distance": centroid_distance(features(model, x)[-1], y).cpu().numpy()}
    needed = {"input_spectral": up.recheck_input_share, "fragility": up.recheck_share,
              "centroid_distance": up.recheck_centroid_share}
    found: dict = {"label": None, "implicated_by": None, "n_flagged": 0}
    for name, signal in signals.items():
        share_of = params.isolate.ratio
        if name != "fragility":  # a share of a dozen samples is noise (digits: 6 of 14 in a clean label)
            share_of = max(share_of, min(POOL_MIN / max(len(labels), 1), 1.0))
        top = lowest(-signal, np.arange(len(labels)), share_of)
        counts = np.bincount(labels[top]) if len(top) else np.zeros(1, dtype=np.int64)
        share = float(counts.max() / max(len(top), 1))
        found[f"{name}_share"], found[f"{name}_label"] = round(share, 4), int(counts.argmax())
        if found["label"] is None and len(top) and share >= needed[name]:
            found["label"], found["implicated_by"] = int(counts.argmax()), name
    flagged = np.empty(0, dtype=np.int64)
    if found["label"] is not None:
        # Inside the label, the centroid distance's cut flags, and fragility's when fragility implicated it, as
        # isolation's class cut takes either score's: CIFAR-10 subset, the benchmark's restarted model at WaNet 5%,
        # fragility's cut 16 flagged (P/R 0.31/0.02: AUROC 0.56 in the label), with the feature cut 172 (0.83/0.56).
        # Fragility that singles out no group in the label cuts anywhere: BadNets 1%, label 0 implicated by the
        # feature signal, both cuts flagged 562 (nearly the whole class; clean accuracy 0.674 -> 0.619).
        pool = np.flatnonzero(labels == found["label"])
        by = found["implicated_by"]
        for name in ["fragility", "centroid_distance"] if by == "fragility" else [by]:
            signal = signals[name]
            flagged = np.union1d(flagged, pool[-signal[pool] <= kittler_split(-signal[pool])])
    found["n_flagged"] = int(len(flagged))
    print(f"[unlearn] recheck: {found['input_spectral_share']:.0%} of the farthest out in whitened pixels carry label "
          f"{found['input_spectral_label']}, {found['fragility_share']:.0%} of the most fragile samples label "
          f"{found['fragility_label']}, {found['centroid_distance_share']:.0%} of the farthest from their label's mean "
          f"feature label {found['centroid_distance_label']}; {len(flagged)} flagged", file=sys.stderr)
    return flagged, found


def unlearning_suspects(labels: np.ndarray, restarted: bool, evidence: str | None) -> np.ndarray:
    """Which quarantined suspects (indices) are unlearned; the others stay quarantined all the same."""
    suspects = np.arange(len(labels))
    if restarted and evidence == "none":
        # No evidence: the fallback suspects are mostly easy clean samples of one class (CIFAR-10 subset, BadNets 1%,
        # WaNet 10%: precision 0.00-0.02). Unlearning them from the restarted model cost clean accuracy even with the
        # accuracy check watching every class (WaNet 5%/10%: 0.59/0.56 against 0.64/0.61 without; SIG 1%: 0.60
        # against 0.65) and did not lower ASR where it mattered.
        return suspects[:0]
    if evidence in ("weak", "none") and len(labels):
        # The fallback's union also holds easy clean samples of other classes (plain ABL's final-loss share): only the
        # implicated label is unlearned. With the others, every unlearning epoch hurt their classes and was rolled
        # back (CIFAR-10 subset, blend 5%: ASR 0.997 with them, 0.000 without).
        return np.flatnonzero(labels == implicated_class(labels))
    return suspects


def redteam_watch(device: torch.device):
    """ASR per epoch on the red-team test images that ingest wrote, for the plot only: a metric, like
    isolation precision; no choice of the defense reads it (the guard above uses clean data only)."""
    if not paths.REDTEAM_TEST.exists():
        return None
    triggered = load_store(paths.REDTEAM_TEST)
    x, target = to_tensor(triggered.x, device), torch.from_numpy(triggered.labels).to(device)
    return lambda model: {"asr": accuracy(model, x, target)}


def run(params: Params) -> None:
    device = pick_device(params.device)
    model, ckpt = load_checkpoint(paths.ISOLATE_MODEL, device)
    clean = load_store(paths.CLEAN_STORE)
    curve, report = sanitize(model, params, clean, load_store(paths.QUARANTINE_STORE), device,
                             redteam_watch(device), ckpt.get("evidence"))
    # The recheck's flagged samples (ids of the clean set) travel with the model: the guard learns from them as from
    # the quarantined suspects.
    flagged = report.get("recheck", {}).pop("flagged", [])
    save_checkpoint(paths.MODEL, model, ckpt["spec"], {"seed": params.seed,
                                                       "recheck_ids": [str(i) for i in clean.ids[flagged]]})
    columns = ["phase", "epoch", "loss", "clean_accuracy"] + (["asr"] if curve and "asr" in curve[0] else [])
    write_csv(paths.PLOTS / "unlearn.csv", ["step", *columns],
              [(k + 1, *(round(c[col], 6) if isinstance(c[col], float) else c[col] for col in columns))
               for k, c in enumerate(curve)])
    unlearn_plot(curve, paths.PLOTS / "unlearn.png", held_out=report["n_holdout"] > 0)
    write_json(paths.metrics_file("unlearn"), {"device": device.type, **report})
