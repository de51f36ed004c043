"""isolate: LGA training catches the poison, and the same seed gives the same isolated ids."""

from __future__ import annotations

import numpy as np
import torch

from dataclasses import replace

from sanitizer.config import Params
from sanitizer.data import make_store
from sanitizer.isolation import (Selection, adaptive_selection, choose, lowest, otsu_split, refine_by_neighbours,
                                 selection_for, suspicion_score, train_lga)
from sanitizer.rules import decide
from sanitizer.sources import read_digits
from sanitizer.train import batches, lga_loss
from sanitizer.triggers import poison


def test_lga_loss_flips_sign_below_gamma():
    assert lga_loss(torch.tensor([1.0, 2.0]), 0.5) > 0
    below = torch.tensor([0.1, 0.2], requires_grad=True)
    lga_loss(below, 0.5).backward()
    assert (below.grad < 0).all()  # under gamma, minimising the LGA loss *raises* the loss


SEL = Selection(ratio=0.01, max_ratio=0.25)  # the full defense's adaptive selection, advanced's defaults


def select_isolated(history: np.ndarray, ids: np.ndarray, ratio: float) -> np.ndarray:
    """Plain ABL: the `ratio` share with the lowest final loss."""
    return lowest(history[:, -1], ids, ratio)


def test_plain_abl_takes_lowest_final_loss_with_stable_ties():
    history = np.array([[5, 0.3], [5, 0.1], [5, 0.1], [5, 0.9]])
    ids = np.array(["d", "c", "b", "a"])
    assert select_isolated(history, ids, 0.5).tolist() == [1, 2]
    assert select_isolated(history, ids, 0.25).tolist() == [2]  # tie at 0.1 goes to id "b"
    assert select_isolated(history, ids, 0.0).tolist() == []


def small_poisoned_digits(params: Params):
    src = read_digits(0.2, params.seed)
    x, y, roles = poison(src.train.x, src.train.y, params.redteam, params.seed)
    return make_store(x, y, src.train.ids, [str(i) for i in range(10)]), np.array(sorted(roles))


def test_same_seed_gives_same_isolated_ids_on_cpu():
    params = Params.model_validate({"device": "cpu", "train": {"isolate_epochs": 3}})
    store, _ = small_poisoned_digits(params)
    rules, _ = decide(store.x, store.labels, params.seed)
    runs = []
    for _ in range(2):
        _, _, history = train_lga(params, store, rules, torch.device("cpu"))
        runs.append(store.ids[select_isolated(history, store.ids, params.advanced.isolate.ratio)].tolist())
    assert runs[0] == runs[1] and len(runs[0]) == 14


def test_lga_isolates_badnets_poison_on_digits():
    params = Params.model_validate({"device": "cpu", "train": {"isolate_epochs": 10}})
    store, truth = small_poisoned_digits(params)
    rules, _ = decide(store.x, store.labels, params.seed)
    assert rules.isolation == "share" and rules.augment_isolation  # digits are easy data (sanitizer/rules.py)
    assert not selection_for(params, rules).adaptive
    _, _, history = train_lga(params, store, rules, torch.device("cpu"))
    chosen = select_isolated(history, store.ids, params.advanced.isolate.ratio)
    precision = np.isin(chosen, truth).mean()
    assert precision >= 0.9, precision


def synthetic_history(seed=0):
    """200 samples in 4 classes, 5 epochs: log-losses around -1 (clean), 20 backdoor samples of
    class 2 near -12, and 10 easy clean samples of class 1 near -5."""
    rng = np.random.default_rng(seed)
    labels = np.arange(200) % 4
    log_loss = rng.normal(-1, 0.5, size=(200, 5))
    backdoor = np.flatnonzero(labels == 2)[:20]
    easy = np.flatnonzero(labels == 1)[:10]
    log_loss[backdoor] = rng.normal(-12, 0.5, size=(20, 5))
    log_loss[easy] = rng.normal(-5, 0.5, size=(10, 5))
    return np.exp(log_loss), labels, np.array([f"s{i:03d}" for i in range(200)]), backdoor, easy


def test_adaptive_selection_isolates_the_separated_group_of_the_implicated_class():
    history, labels, ids, backdoor, _ = synthetic_history()
    chosen, report = adaptive_selection(suspicion_score(history), labels, ids, SEL)
    assert report["rule"].startswith("adaptive") and report["implicated_label"] == 2 and report["evidence"] == "group"
    assert chosen.tolist() == backdoor.tolist()
    # Without concentration the easy samples of class 1 may join; the cap bounds the share.
    capped, _ = adaptive_selection(suspicion_score(history), labels, ids, replace(SEL, concentrate=False, max_ratio=0.05))
    assert len(capped) == 10 and set(capped) <= set(backdoor)


def test_adaptive_selection_falls_back_to_the_fixed_ratio_without_a_separated_group():
    rng = np.random.default_rng(1)
    # 500 per class, as in real sets: with 100, noise alone splits one class 1.1 times clearer a third of the time.
    history = np.exp(rng.normal(-1, 0.5, size=(1500, 5)))
    labels, ids = np.arange(1500) % 3, np.array([f"s{i:04d}" for i in range(1500)])
    chosen, report = adaptive_selection(suspicion_score(history), labels, ids, replace(SEL, ratio=0.02))
    assert report["rule"].startswith("ratio") and report["separation"] < 3.5
    assert chosen.tolist() == lowest(suspicion_score(history), ids, 0.02).tolist()
    assert report["evidence"] == "none"  # every class splits alike: nothing points at a backdoor
    # Given plain ABL's final losses, its share joins the fallback: a fused ranking never drops one of its suspects.
    final = history[:, -1]
    both, report = adaptive_selection(suspicion_score(history), labels, ids, replace(SEL, ratio=0.02), final_loss=final)
    assert set(both) == set(chosen) | set(lowest(final, ids, 0.02)) and len(both) > len(chosen)
    assert report["evidence"] == "none" and "plain ABL" in report["rule"]


def test_a_class_that_stands_out_short_of_a_separated_group_is_weak_evidence():
    rng = np.random.default_rng(2)
    labels, ids = np.arange(1500) % 3, np.array([f"s{i:04d}" for i in range(1500)])
    log_loss = rng.normal(-1, 0.5, size=(1500, 5))
    hint = np.flatnonzero(labels == 1)[:25]
    log_loss[hint] = rng.normal(-2.5, 0.3, size=(25, 5))
    # Rules 1 and 2 made strict enough not to fire: class 1 stands out, but not as a separated group.
    p = replace(SEL, ratio=0.02, min_separation=20, class_margin=5)
    _, report = adaptive_selection(suspicion_score(np.exp(log_loss)), labels, ids, p)
    seps = sorted(report["class_separation"].values(), reverse=True)
    assert report["rule"].startswith("ratio") and seps[0] >= p.weak_margin * seps[1]
    assert report["evidence"] == "weak" and max(report["class_separation"], key=report["class_separation"].get) == "1"
    _, strict = adaptive_selection(suspicion_score(np.exp(log_loss)), labels, ids, replace(p, weak_margin=5))
    assert strict["evidence"] == "none"


def clumped_features(rng, labels: np.ndarray, clump: np.ndarray) -> torch.Tensor:
    """Random directions in 16 dimensions, orthogonal to the first; the `clump` rows near the first (a learned
    trigger)."""
    feats = rng.normal(size=(len(labels), 16))
    feats[:, 0] = 0
    feats[clump] = 10 * np.eye(16)[0] + rng.normal(scale=0.5, size=(len(clump), 16))
    return torch.from_numpy(feats).float()


def test_refinement_drops_isolated_samples_outside_the_clump_and_adds_clump_members_the_cut_missed():
    rng = np.random.default_rng(3)
    labels = np.arange(400) % 4
    poison = np.flatnonzero(labels == 2)[:40]
    feats = clumped_features(rng, labels, poison)
    easy = np.flatnonzero(labels == 2)[60:66]  # clean class-2 samples the cut let through
    other = np.flatnonzero(labels == 1)[:2]    # a suspect outside the implicated class stays as it is
    isolated = np.sort(np.concatenate([poison[:37], easy, other]))  # 3 poison missed
    p = replace(SEL, refine_k=10)
    refined = refine_by_neighbours(feats, labels, isolated, p)
    assert refined.tolist() == np.sort(np.concatenate([poison, other])).tolist()
    assert refine_by_neighbours(feats, labels, isolated, replace(SEL, refine_k=0)).tolist() == isolated.tolist()  # off


def test_only_a_separated_group_is_refined():
    history, labels, ids, backdoor, _ = synthetic_history()
    feats = clumped_features(np.random.default_rng(4), labels, backdoor[:10])  # half the group off the clump
    store = make_store(np.zeros((len(labels), 2, 2, 1), np.uint8), labels, ids, [str(c) for c in range(4)])
    p = replace(SEL, refine_k=5)
    isolated, _, report = choose(history, store, p, feats=feats)
    assert report["evidence"] == "group" and isolated.tolist() == backdoor[:10].tolist()
    assert report["refined"] == {"dropped": 10, "added": 0}
    flat = np.exp(np.random.default_rng(1).normal(-1, 0.5, size=history.shape))  # no group: the fallback share
    isolated, _, report = choose(flat, store, p, feats=feats)
    assert report["evidence"] != "group" and "refined" not in report
    assert isolated.tolist() == choose(flat, store, replace(p, refine_k=0))[0].tolist()


def test_otsu_split_separates_two_clusters():
    values = np.r_[np.full(5, -10.0), np.linspace(-2, 0, 50)]
    threshold, separation = otsu_split(values)
    assert threshold == -10.0 and separation > 10
    assert otsu_split(np.zeros(10)) == (0.0, 0.0)


def test_an_epoch_has_no_remainder_batch_and_visits_every_sample_once():
    gen = torch.Generator().manual_seed(0)
    for n, size in ((4997, 128), (5085, 128), (14, 64), (128, 128)):
        parts = batches(n, size, gen, "cpu")
        sizes = [len(b) for b in parts]
        assert len(parts) == -(-n // size) and max(sizes) - min(sizes) <= 1  # 4,997 at 128: no batch of 5
        assert sorted(torch.cat(parts).tolist()) == list(range(n))
    assert batches(0, 64, gen, "cpu") == ()


def test_several_backdoors_with_different_targets_are_each_isolated():
    """Two low-loss groups in two labels: the rule isolates one, then looks again without its label and finds the
    other; nothing else is taken. One label alone has nothing to compare with."""
    from sanitizer.isolation import Selection, choose, implicated_classes

    rng = np.random.default_rng(0)
    labels = np.arange(1000) % 10
    history = np.exp(rng.normal(0, 0.5, size=(1000, 5))).astype(np.float32)
    first, second = np.flatnonzero(labels == 2)[:60], np.flatnonzero(labels == 7)[:40]
    history[first] = 1e-4 * np.exp(rng.normal(0, 0.3, size=(60, 5)))
    history[second] = 1e-3 * np.exp(rng.normal(0, 0.3, size=(40, 5)))
    store = make_store(np.zeros((1000, 4, 4, 1), np.uint8), labels, [f"s{i:04d}" for i in range(1000)],
                       [str(c) for c in range(10)])
    selection = Selection(0.01, 0.25, refine_k=0, fusion=())
    isolated, _, report = choose(history, store, selection)
    assert report["evidence"] == "group" and report["implicated_labels"] == [2, 7]
    assert set(isolated) == set(first) | set(second)
    assert implicated_classes(labels[isolated]) == [2, 7]
    alone = store.subset(np.flatnonzero(labels == 2))
    assert choose(history[labels == 2], alone, selection)[2]["evidence"] == "none"
