"""Unlearning's clean-accuracy check: a damaging epoch is rolled back, retried at half the learning rate,
and unlearning stops when the retries are spent."""

from __future__ import annotations

import numpy as np
import torch

import stages.unlearn as unlearn_stage
from stages.config import Params
from stages.train import train_epoch


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


def run_unlearn(monkeypatch, retries: int, harmful_from_lr: float, evidence: str | None = None, erase_class_0=False):
    """An epoch that wrecks the model (or, with `erase_class_0`, only class 0, the suspects' label) when the
    learning rate is at least `harmful_from_lr` and changes nothing below it; the suspects (class-1 images
    labelled 0) are never classified as 0, so one kept epoch ends unlearning."""
    def epoch(model, opt, *args, **kwargs):
        if opt.param_groups[0]["lr"] >= harmful_from_lr:
            with torch.no_grad():
                (model[1].weight[0] if erase_class_0 else model[1].weight).neg_()
        return 0.0, 0.0

    monkeypatch.setattr(unlearn_stage, "joint_unlearn_epoch", epoch)
    params = Params.model_validate({"unlearn": {"lr": 0.002, "retries": retries, "epochs": 3}})
    x, y = bright_pixel_data()
    xq, yq = x[y == 1][:5], torch.zeros(5, dtype=torch.long)
    model = perfect_model()
    report = unlearn_stage.unlearn(model, params, xq, yq, x, y, x, y, torch.Generator(), [], evidence=evidence)
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
    model, report = run_unlearn(monkeypatch, retries=0, harmful_from_lr=0.0, evidence="group", erase_class_0=True)
    assert not report["rolled_back"] and not report["implicated_watched"] and model[1].weight[0, 0] < 0
    # A fallback ("weak"): its suspects may be easy clean samples of that class, whose collapse is rolled back ...
    model, report = run_unlearn(monkeypatch, retries=1, harmful_from_lr=0.002, evidence="weak", erase_class_0=True)
    assert report["implicated_watched"] and report["retries_used"] == 1 and report["unlearn_epochs_run"] == 1
    assert torch.equal(model[1].weight, torch.eye(3))
    # ... and unlearning stops when every retry erases it too.
    model, report = run_unlearn(monkeypatch, retries=1, harmful_from_lr=0.0, evidence="weak", erase_class_0=True)
    assert report["rolled_back"] and report["unlearn_epochs_run"] == 0 and torch.equal(model[1].weight, torch.eye(3))


def digits_model_and_sets(init_seed: int):
    from stages.data import make_store
    from stages.models import build_model, model_spec
    from stages.sources import read_digits
    from stages.train import channel_stats

    src = read_digits(0.2, 0)
    store = make_store(src.train.x, src.train.y, src.train.ids, [str(i) for i in range(10)])
    mean, std = channel_stats(store.x)
    torch.manual_seed(init_seed)
    model = build_model(model_spec(store.image_shape, 10, 8, mean, std))
    return model, store.subset(np.arange(40, len(store))), store.subset(np.arange(40))


def released_weights(init_seed: int, evidence, restart: str = "no_evidence", restart_resample: float = 0.0,
                     recheck: bool = True):
    params = Params.model_validate({"device": "cpu", "isolate": {"epochs": 1},
                                    "unlearn": {"finetune_epochs": 1, "epochs": 1, "restart": restart,
                                                "restart_resample": restart_resample, "recheck": recheck}})
    model, clean, quarantined = digits_model_and_sets(init_seed)
    _, report = unlearn_stage.sanitize(model, params, clean, quarantined, torch.device("cpu"), evidence=evidence)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), report


def test_without_evidence_the_released_model_carries_nothing_of_the_isolation_model():
    # Two different "isolation models" (initialisations) give the same released model after a restart ...
    a, report = released_weights(1, evidence="none")
    b, _ = released_weights(2, evidence="none")
    assert report["restarted"] and torch.equal(a, b)
    # ... and different ones when unlearning continues from them (a separated group, a hint, or plain ABL).
    for evidence in ("group", "weak", None):
        c, report = released_weights(1, evidence=evidence)
        d, _ = released_weights(2, evidence=evidence)
        assert not report["restarted"] and not torch.equal(c, d)
    e, report = released_weights(1, evidence="none", restart="never")
    assert not report["restarted"] and not torch.equal(a, e)
    assert unlearn_stage.restarts("always", "group")


def test_only_a_restarted_model_trains_on_resampled_images(monkeypatch):
    shifts = []

    def recording_epoch(*args, max_shift: float = 0.0, **kwargs):
        shifts.append(max_shift)
        return train_epoch(*args, max_shift=max_shift, **kwargs)

    monkeypatch.setattr(unlearn_stage, "train_epoch", recording_epoch)
    resampled, _ = released_weights(1, evidence="none", restart_resample=0.5)
    assert shifts and set(shifts) == {0.5}  # every epoch of the fresh model
    shifts.clear()
    released_weights(1, evidence="group", restart_resample=0.5)  # fine-tuning the isolation model: never
    assert shifts and set(shifts) == {0.0}
    plain, _ = released_weights(1, evidence="none")  # the default: off
    assert not torch.equal(resampled, plain)


def test_a_fallback_unlearns_only_the_implicated_label():
    # 40 quarantined digits: the fallback's union mixes the implicated label with easy samples of others.
    _, report = released_weights(1, evidence="weak")
    _, clean, quarantined = digits_model_and_sets(1)
    majority = np.bincount(quarantined.labels).max()
    assert report["n_quarantined"] == 40 and report["n_unlearned"] == majority < 40
    _, report = released_weights(1, evidence="group")  # a separated group is unlearned whole
    assert report["n_unlearned"] == 40
    assert report["n_finetune"] + report["n_holdout"] == len(clean) and report["n_holdout"] > 0
    # No evidence: restarted, nothing unlearned (the second look, which may find something in this two-epoch model, off) ...
    _, report = released_weights(1, evidence="none", recheck=False)
    assert report["restarted"] and report["n_unlearned"] == 0 and report["unlearn_epochs_run"] == 0
    # ... so nothing is held out for unlearning's accuracy check: the released model trains on every clean sample.
    assert report["n_finetune"] == len(clean) and report["n_holdout"] == 0 and report["holdout_accuracy"] is None


def test_unlearning_ends_with_the_repair_epochs_after_a_separated_group_only():
    def phases(repair_epochs: int, evidence: str | None = "group"):
        params = Params.model_validate({"device": "cpu", "unlearn": {"finetune_epochs": 1, "epochs": 1, "stop_at": 0,
                                                                     "repair_epochs": repair_epochs}})
        model, clean, quarantined = digits_model_and_sets(1)
        curve, report = unlearn_stage.sanitize(model, params, clean, quarantined, torch.device("cpu"), evidence=evidence)
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
    from stages.detectors import auroc, noise_fragility

    x, y = fine_trigger_data()
    model = FineTriggerModel()
    assert (model(x).argmax(1) == y).all()  # the model obeys the trigger
    fragility = noise_fragility(model, x, y, sigma=0.02, draws=16, seed=0)
    assert auroc(fragility[:10], fragility[10:]) > 0.9
    assert fragility[:10].mean() > 5 * fragility[10:].mean()
    assert torch.equal(fragility, noise_fragility(model, x, y, sigma=0.02, draws=16, seed=0))  # seeded


def test_recheck_implicates_a_label_by_whitened_pixels_fragility_or_distance_to_its_mean_feature_and_nothing_when_all_spread(
        monkeypatch):
    params = Params.model_validate({"isolate": {"ratio": 0.05}})
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
        monkeypatch.setattr(unlearn_stage, "noise_fragility", lambda *a, f=fragility: torch.from_numpy(f))
        monkeypatch.setattr(unlearn_stage, "features", lambda model, x, f=feats: [f])
        flagged, report = unlearn_stage.recheck(None, params, images, y)
        assert report["implicated_by"] == by, report
        if by == "fragility":
            assert np.array_equal(flagged, np.arange(50)), report  # the fragile group and the far one, both in label 0
        elif by:
            group = np.arange(30, 50) if by == "centroid_distance" else np.arange(50, 90)
            assert report["label"] == 0 and np.isin(group, flagged).all(), report
            assert np.isin(flagged, np.arange(100)).all() and len(flagged) <= len(group) + 5  # label 0's, few others
        else:
            assert not len(flagged) and report["label"] is None
    assert report["fragility_share"] < params.unlearn.recheck_share
    assert report["centroid_distance_share"] < params.unlearn.recheck_centroid_share
    assert report["input_spectral_share"] < params.unlearn.recheck_input_share


def test_what_the_recheck_flags_after_a_restart_leaves_training_and_is_unlearned(monkeypatch):
    flagged = np.arange(0, 60, 3)  # clean-set indices the second look "finds"
    looks = []

    def recheck(model, params, x, y):
        looks.append(len(x))
        # Implicated by the feature signal: no look for escaped poison after it (one unlearning, of exactly these).
        return flagged, {"label": 0, "implicated_by": "centroid_distance", "n_flagged": len(flagged)}

    monkeypatch.setattr(unlearn_stage, "recheck", recheck)
    _, clean, _ = digits_model_and_sets(1)
    _, report = released_weights(1, evidence="none")
    assert looks == [len(clean)] and report["restarted"]
    assert report["recheck"]["flagged"] == flagged.tolist() and report["n_unlearned"] == len(flagged)
    assert report["n_finetune"] + report["n_holdout"] == len(clean) - len(flagged) and report["unlearn_epochs_run"] == 1
    for evidence in ("group", "weak", None):  # isolation found something: no second look
        _, report = released_weights(1, evidence=evidence)
    assert looks == [len(clean)] and "recheck" not in report


def test_when_unlearning_the_flagged_is_rolled_back_the_model_trains_again_without_them(monkeypatch):
    flagged = np.arange(0, 60, 3)
    monkeypatch.setattr(unlearn_stage, "recheck", lambda model, params, x, y: (
        flagged, {"label": 0, "implicated_by": "input_spectral", "n_flagged": len(flagged)}))
    seen = []

    def unlearn(model, params, xq, *args, **kwargs):  # every try cost clean accuracy: rolled back, link unbroken
        seen.append(len(xq))
        return {"unlearn_epochs_run": 0, "rolled_back": True, "suspects_obeyed": 1.0}

    monkeypatch.setattr(unlearn_stage, "unlearn", unlearn)
    params = Params.model_validate({"device": "cpu", "isolate": {"epochs": 1}, "unlearn": {"finetune_epochs": 1}})
    model, clean, quarantined = digits_model_and_sets(1)
    curve, report = unlearn_stage.sanitize(model, params, clean, quarantined, torch.device("cpu"), evidence="none")
    assert seen == [len(flagged)] and report["retrained"] and report["n_unlearned"] == len(flagged)
    assert report["n_finetune"] == len(clean) - len(flagged) and report["n_holdout"] == 0
    assert report["holdout_accuracy"] is None
    assert [c["phase"] for c in curve] == ["finetune"] * 2 + ["repair"] + ["retrain"] * 2  # the restart's budget again


def test_the_guard_learns_from_the_recheck_flags_as_from_the_quarantine():
    from stages.data import make_store
    from stages.guard import with_flagged

    clean = make_store(np.arange(16).reshape(4, 2, 2, 1), [0, 1, 0, 1], ["a", "b", "c", "d"], ["0", "1"])
    quarantined = make_store(np.full((1, 2, 2, 1), 99), [1], ["q"], ["0", "1"])
    kept, suspects = with_flagged(clean, quarantined, ["b", "d"])
    assert list(kept.ids) == ["a", "c"] and list(suspects.ids) == ["q", "b", "d"]
    assert np.array_equal(suspects.x[1:], clean.x[[1, 3]]) and list(suspects.labels) == [1, 1, 1]
    kept, suspects = with_flagged(clean, quarantined, [])
    assert kept is clean and suspects is quarantined


def test_after_unlearning_the_label_s_samples_whose_loss_rose_are_the_escaped_poison(monkeypatch):
    labels = torch.from_numpy(np.repeat(np.arange(2), 100))
    loss = np.random.default_rng(0).uniform(0.0, 0.2, 200)
    loss[10:30] += 3.0  # label 0: poison the recheck missed, no longer carried to the label by its trigger
    loss[150:170] += 3.0  # label 1: hard samples of another label, not looked at
    flagged = np.arange(10)  # the recheck's flags, already unlearned

    def losses(model, x, y):
        return torch.from_numpy(loss[x.long().numpy()])

    monkeypatch.setattr(unlearn_stage, "per_sample_losses", losses)
    escaped = unlearn_stage.escaped_poison(None, torch.arange(200), labels, flagged, 0)
    assert np.array_equal(escaped, np.arange(10, 30))
