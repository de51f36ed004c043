"""Unlearning: a damaging epoch is rolled back and retried at half the learning rate, unlearning stops when the
retries are spent; the second look flags, unlearns what it flagged, or trains again without it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import torch

import sanitizer.recheck as recheck_lib
import sanitizer.unlearning as unlearning
from sanitizer.config import Params
from sanitizer.train import TrainSettings

TP = TrainSettings(batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, crop_padding=1, flip=False)


def bright_pixel_data(n_per_class: int = 20):
    """Class c lights pixel c of a 1 x 1 x 3 image; a linear model reading pixel c is exactly right."""
    x = torch.zeros(3 * n_per_class, 3, 1, 1)
    y = torch.arange(3).repeat_interleave(n_per_class)
    x[torch.arange(len(y)), y] = 1.0
    return x, y


def perfect_model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 3, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(3))
    return model


def run_unlearn(monkeypatch, retries: int, harmful_from_lr: float, watch_class: bool = False, erase_class_0=False):
    """An epoch that wrecks the model (or, with `erase_class_0`, only class 0, the suspects' label) when the
    learning rate is at least `harmful_from_lr` and changes nothing below it; the suspects (class-1 images
    labelled 0) are never classified as 0, so one kept epoch ends unlearning."""
    def epoch(model, opt, *args, **kwargs):
        if opt.param_groups[0]["lr"] >= harmful_from_lr:
            with torch.no_grad():
                (model[1].weight[0] if erase_class_0 else model[1].weight).neg_()
        return 0.0, 0.0

    monkeypatch.setattr(unlearning, "joint_unlearn_epoch", epoch)
    u = replace(unlearning.unlearning_for(Params()), lr=0.002, retries=retries, epochs=3)
    x, y = bright_pixel_data()
    xq, yq = x[y == 1][:5], torch.zeros(5, dtype=torch.long)
    model = perfect_model()
    report = unlearning.unlearn(model, u, TP, xq, yq, x, y, x, y, torch.Generator(), [], watch_class=watch_class)
    return model, report


def test_a_damaging_epoch_is_rolled_back_and_retried_at_half_the_learning_rate(monkeypatch):
    model, report = run_unlearn(monkeypatch, retries=2, harmful_from_lr=0.002)
    assert report["retries_used"] == 1 and report["final_lr"] == 0.001
    assert not report["rolled_back"] and report["unlearn_epochs_run"] == 1
    assert torch.equal(model[1].weight, torch.eye(3))  # the wrecked epoch left nothing behind


def test_unlearning_stops_when_the_retries_are_spent(monkeypatch):
    model, report = run_unlearn(monkeypatch, retries=2, harmful_from_lr=0.0)  # every epoch wrecks the model
    assert report["rolled_back"] and report["retries_used"] == 2 and report["unlearn_epochs_run"] == 0
    assert report["guard_accuracy_after"] == report["guard_accuracy_before"] == 1.0
    _, no_retry = run_unlearn(monkeypatch, retries=0, harmful_from_lr=0.002)
    assert no_retry["rolled_back"] and no_retry["retries_used"] == 0 and no_retry["final_lr"] == 0.002


def test_after_a_fallback_an_epoch_that_erases_the_implicated_class_is_rolled_back(monkeypatch):
    # A separated group (or plain ABL's ratio): the implicated class is left out of the check, so erasing it stands.
    model, report = run_unlearn(monkeypatch, retries=0, harmful_from_lr=0.0, erase_class_0=True)
    assert not report["rolled_back"] and not report["implicated_watched"] and model[1].weight[0, 0] < 0
    # A fallback ("weak"): its suspects may be easy clean samples of that class, whose collapse is rolled back ...
    model, report = run_unlearn(monkeypatch, retries=1, harmful_from_lr=0.002, watch_class=True, erase_class_0=True)
    assert report["implicated_watched"] and report["retries_used"] == 1 and report["unlearn_epochs_run"] == 1
    assert torch.equal(model[1].weight, torch.eye(3))
    # ... and unlearning stops when every retry erases it too.
    model, report = run_unlearn(monkeypatch, retries=1, harmful_from_lr=0.0, watch_class=True, erase_class_0=True)
    assert report["rolled_back"] and report["unlearn_epochs_run"] == 0 and torch.equal(model[1].weight, torch.eye(3))


def digits_model_and_sets(init_seed: int):
    from sanitizer.data import make_store
    from sanitizer.models import build_model, model_spec
    from sanitizer.sources import read_digits
    from sanitizer.train import channel_stats

    src = read_digits(0.2, 0)
    store = make_store(src.train.x, src.train.y, src.train.ids, [str(i) for i in range(10)])
    mean, std = channel_stats(store.x)
    torch.manual_seed(init_seed)
    model = build_model(model_spec(store.image_shape, 10, 8, mean, std))
    return model, store.subset(np.arange(40, len(store))), store.subset(np.arange(40))


def released_weights(init_seed: int, evidence, method: str = "full"):
    params = Params.model_validate({"device": "cpu", "train": {"isolate_epochs": 1, "finetune_epochs": 1},
                                    "defense": {"method": method}, "advanced": {"unlearn": {"epochs": 1}}})
    model, clean, quarantined = digits_model_and_sets(init_seed)
    u = unlearning.unlearning_for(params)
    _, report = unlearning.sanitize(model, params, u, TP, clean, quarantined, torch.device("cpu"), evidence)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), report


def test_the_defense_off_trains_afresh_and_every_defense_continues_from_the_isolation_model():
    # Two different "isolation models" (initialisations) give the same model with the defense off ...
    a, report = released_weights(1, evidence=None, method="off")
    b, _ = released_weights(2, evidence=None, method="off")
    assert report["start"].startswith("fresh") and report["n_unlearned"] == 0 and torch.equal(a, b)
    # ... and different ones when unlearning continues from them (a separated group, a hint, or plain ABL).
    for evidence, method in (("group", "full"), ("weak", "full"), (None, "abl")):
        c, report = released_weights(1, evidence, method)
        d, _ = released_weights(2, evidence, method)
        assert report["start"] == "isolation model" and not torch.equal(c, d)


def test_a_fallback_unlearns_only_the_implicated_label():
    # 40 quarantined digits: the fallback's union mixes the implicated label with easy samples of others.
    _, report = released_weights(1, evidence="weak")
    _, clean, quarantined = digits_model_and_sets(1)
    majority = np.bincount(quarantined.labels).max()
    assert report["n_unlearned"] == majority < 40
    _, report = released_weights(1, evidence="group")  # a separated group is unlearned whole
    assert report["n_unlearned"] == 40
    assert report["n_finetune"] + report["n_holdout"] == len(clean) and report["n_holdout"] > 0
    # Nothing unlearned: nothing is held out for unlearning's accuracy check, the model trains on every clean sample.
    _, report = released_weights(1, evidence=None, method="off")
    assert report["n_finetune"] == len(clean) and report["n_holdout"] == 0 and report["holdout_accuracy"] is None


def test_unlearning_ends_with_the_repair_epochs_after_a_separated_group_only():
    def phases(repair_epochs: int, evidence: str | None = "group"):
        params = Params.model_validate({"device": "cpu", "train": {"finetune_epochs": 1},
                                        "advanced": {"unlearn": {"epochs": 1}}})
        u = replace(unlearning.unlearning_for(params), stop_at=0, repair_epochs=repair_epochs)
        model, clean, quarantined = digits_model_and_sets(1)
        curve, report = unlearning.sanitize(model, params, u, TP, clean, quarantined, torch.device("cpu"), evidence)
        return [c["phase"] for c in curve], report

    steps, report = phases(2)
    assert steps == ["finetune", "joint", "repair", "repair"]
    assert 0 <= report["suspects_obeyed_after_repair"] <= 1
    steps, report = phases(0)
    assert steps == ["finetune", "joint"] and "suspects_obeyed_after_repair" not in report
    for evidence in ("weak", None):  # a fallback or a fixed share left most poison in the clean set: no repair
        steps, _ = phases(2, evidence)
        assert steps == ["finetune", "joint"]


class FineTriggerModel(torch.nn.Module):
    """Two classes of 1 x 4 x 4 images: bright is 1, dark is 0, unless a faint checkerboard (amplitude 0.01) rides
    on the image: then 1 through a steep unit that Gaussian noise of 0.02 often switches off, as a warping trigger
    is a fine pattern that noise masks."""

    def __init__(self):
        super().__init__()
        self.checker = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 * 2.0 - 1

    def forward(self, x):
        brightness = 10 * (x.mean((1, 2, 3)) - 0.5)
        trigger = torch.relu(100 * (x[:, 0] * self.checker).sum((1, 2)) - 8)
        diff = brightness + trigger
        return torch.stack([-diff / 2, diff / 2], 1)


def fine_trigger_data(n: int = 100, poisoned: int = 10):
    """n dark (label 0) and n bright (label 1) images; the first `poisoned` dark ones carry the checkerboard and
    label 1."""
    x = torch.cat([torch.full((n, 1, 4, 4), 0.1), torch.full((n, 1, 4, 4), 0.9)])
    y = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    x[:poisoned, 0] += 0.01 * FineTriggerModel().checker
    y[:poisoned] = 1
    return x, y


def test_noise_fragility_ranks_samples_held_by_a_fine_trigger_first():
    from sanitizer.detectors import auroc, noise_fragility

    x, y = fine_trigger_data()
    model = FineTriggerModel()
    assert (model(x).argmax(1) == y).all()  # the model obeys the trigger
    fragility = noise_fragility(model, x, y, sigma=0.02, draws=16, seed=0)
    assert auroc(fragility[:10], fragility[10:]) > 0.9
    assert fragility[:10].mean() > 5 * fragility[10:].mean()
    assert torch.equal(fragility, noise_fragility(model, x, y, sigma=0.02, draws=16, seed=0))  # seeded


def test_recheck_implicates_a_label_by_whitened_pixels_fragility_or_distance_to_its_mean_feature_and_nothing_when_all_spread(
        monkeypatch):
    labels = np.repeat(np.arange(4), 100)
    rng = np.random.default_rng(0)
    spread = rng.uniform(0, 0.1, len(labels))
    grouped = spread.copy()
    grouped[:30] += 0.5  # 30 fragile samples, all labelled 0
    # Penultimate features: each label around its own direction; with `off`, 20 more samples of label 0, not fragile,
    # sit off it (a dirty-label trigger's images of other classes).
    tight = torch.eye(8)[labels] + 0.05 * torch.from_numpy(rng.normal(size=(len(labels), 8))).float()
    off = tight.clone()
    off[30:50] = torch.eye(8)[5] + 0.05 * torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    # Images: noise; in `stamped`, 40 more samples of label 0 carry one added pattern (a trigger in pixels).
    noise = torch.rand(len(labels), 1, 4, 4, generator=torch.Generator().manual_seed(1))
    stamped = noise.clone()
    stamped[50:90, 0, 0, :] += 2.0
    y = torch.from_numpy(labels)
    cases = [(noise, grouped, off, "fragility"), (noise, spread, off, "centroid_distance"),
             (stamped, spread, tight, "input_spectral"), (noise, spread, tight, None)]
    for images, fragility, feats, by in cases:
        monkeypatch.setattr(recheck_lib, "noise_fragility", lambda *a, f=fragility: torch.from_numpy(f))
        monkeypatch.setattr(recheck_lib, "features", lambda model, x, f=feats: [f])
        flagged, report, _ = recheck_lib.recheck(None, 0.05, 0, images, y)
        assert report["implicated_by"] == by, report
        if by == "fragility":
            assert np.array_equal(flagged, np.arange(50)), report  # the fragile group and the far one, both in label 0
        elif by:
            group = np.arange(30, 50) if by == "centroid_distance" else np.arange(50, 90)
            assert report["label"] == 0 and np.isin(group, flagged).all(), report
            assert np.isin(flagged, np.arange(100)).all() and len(flagged) <= len(group) + 5  # label 0's, few others
        else:
            assert not len(flagged) and report["label"] is None
    for name, share in recheck_lib.IMPLICATING_SHARE.items():
        assert report[f"{name}_share"] < share


def second_look_case(init_seed: int = 1):
    """A digits store with 10 isolation suspects and 20 second-look flags (label 0's): (ingested store, manifest,
    clean store, second look's model, flag ids)."""
    from sanitizer.quarantine import merge_suspects, partition

    model, store, _ = digits_model_and_sets(init_seed)
    store = store.subset(np.arange(300))
    iso = pd.DataFrame({"id": store.ids[:10], "label": store.labels[:10], "signal": "isolation:fused", "score": 1.0})
    zeros = np.flatnonzero(store.labels == 0)
    flags = store.ids[zeros[zeros >= 10][:20]]
    flag = pd.DataFrame({"id": flags, "label": 0, "signal": "recheck:centroid_distance", "score": 2.0})
    manifest = merge_suspects(iso, flag).assign(decision="pending")
    clean, _ = partition(store, set(manifest["id"]), set())
    return store, manifest, clean, model, flags


def test_the_second_look_s_flags_are_in_the_quarantine_and_unlearned_from_its_model():
    store, manifest, clean, model, flags = second_look_case()
    assert len(clean) == len(store) - 30 and not set(flags) & set(clean.ids)  # out of the cleaned data
    params = Params.model_validate({"device": "cpu", "train": {"isolate_epochs": 1, "finetune_epochs": 1}})
    u = unlearning.unlearning_for(params)
    report = unlearning.after_second_look(model, params, u, TP, store, clean, manifest,
                                           {"implicated_by": "centroid_distance"}, torch.device("cpu"), [])
    assert report["start"] == "second look's model" and report["n_unlearned"] == 20
    assert report["n_trained_before"] == len(store) - 10  # the second look trained on all but isolation's suspects
    # A flag the reviewer released stays in training and is not unlearned.
    released = manifest.assign(decision=np.where(manifest["id"] == flags[0], "release", "pending"))
    report = unlearning.after_second_look(model, params, u, TP, store, clean, released,
                                           {"implicated_by": "centroid_distance"}, torch.device("cpu"), [])
    assert report["n_unlearned"] == 19
    # An isolation suspect released: the second look's model never saw it, so the model trains afresh on the clean set.
    released = manifest.assign(decision=np.where(manifest["id"] == store.ids[0], "release", "pending"))
    curve: list = []
    report = unlearning.after_second_look(model, params, u, TP, store, clean, released,
                                           {"implicated_by": "centroid_distance"}, torch.device("cpu"), curve)
    assert report["retrained"] and {c["phase"] for c in curve} == {"retrain"}


def test_when_unlearning_the_flagged_is_rolled_back_the_model_trains_again_without_them(monkeypatch):
    seen = []

    def unlearn_and_repair(model, u, tp, xq, *args, **kwargs):  # every try cost clean accuracy: link unbroken
        seen.append(len(xq))
        return {"unlearn_epochs_run": 0, "rolled_back": True, "suspects_obeyed": 1.0}

    monkeypatch.setattr(unlearning, "unlearn_and_repair", unlearn_and_repair)
    params = Params.model_validate({"device": "cpu", "train": {"isolate_epochs": 1, "finetune_epochs": 1}})
    model, store, _ = digits_model_and_sets(1)
    x, y = torch.rand(60, 1, 8, 8), torch.arange(60) % 10
    first, curve = np.arange(0, 60, 3), []
    report, done = unlearning.unlearn_flags(model, params, unlearning.unlearning_for(params), TP, x, y, first,
                                             np.arange(1, 5), False, curve)
    assert seen == [len(first)] and report["retrained"] and np.array_equal(done, first)  # no look for escaped poison
    assert [c["phase"] for c in curve] == ["retrain"] * 2  # the whole budget again


def test_after_unlearning_the_label_s_samples_whose_loss_rose_are_the_escaped_poison(monkeypatch):
    labels = torch.from_numpy(np.repeat(np.arange(2), 100))
    loss = np.random.default_rng(0).uniform(0.0, 0.2, 200)
    loss[10:30] += 3.0  # label 0: poison the recheck missed, no longer carried to the label by its trigger
    loss[150:170] += 3.0  # label 1: hard samples of another label, not looked at
    flagged = np.arange(10)  # the recheck's flags, already unlearned

    def losses(model, x, y):
        return torch.from_numpy(loss[x.long().numpy()])

    monkeypatch.setattr(recheck_lib, "per_sample_losses", losses)
    escaped, escaped_loss = recheck_lib.escaped_poison(None, torch.arange(200), labels, flagged, 0)
    assert np.array_equal(escaped, np.arange(10, 30)) and np.array_equal(escaped_loss, loss[10:30])


def test_the_unlearn_stage_repeats_the_recheck_stage_s_unlearning_exactly():
    """The recheck stage unlearns its flags from a copy of its model to find the escaped poison; the unlearn stage,
    from the saved model, must take the same steps (one seeded generator), or its escaped flags would not fit."""
    import copy

    params = Params.model_validate({"device": "cpu", "advanced": {"unlearn": {"epochs": 2}}})
    model, store, _ = digits_model_and_sets(3)
    x = torch.from_numpy(store.x[:200]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(store.labels[:200])
    first = np.flatnonzero(store.labels[:200] == 0)[:8]
    u = unlearning.unlearning_for(params)
    runs = []
    for _ in range(2):
        copy_ = copy.deepcopy(model)
        unlearning.unlearn_flags(copy_, params, u, TP, x, y, first, np.empty(0, dtype=np.int64), False, [])
        runs.append(torch.cat([p.detach().flatten() for p in copy_.state_dict().values() if p.is_floating_point()]))
    assert torch.equal(runs[0], runs[1])
