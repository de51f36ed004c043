"""The attack library: deterministic, any H x W x C, exact truth, each attack's own labelling rule."""

from __future__ import annotations

import numpy as np
import pytest

from sanitizer.config import Params, RedteamParams
from sanitizer.errors import SanitizeError
from sanitizer.metrics import backdoor_asr
from sanitizer.triggers import (COVER_RATIO, TRIGGERS, adap_blend, adap_patch, adap_patches, backdoors, bpp, poison,
                                wanet)

SHAPES = [(8, 8, 1), (32, 32, 3), (13, 21, 3)]


def images(shape, n=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def roles_of(truth, role):
    return np.array(sorted(i for i, t in truth.items() if t.role == role), dtype=np.int64)


@pytest.mark.parametrize("attack", sorted(TRIGGERS))
@pytest.mark.parametrize("shape", SHAPES)
def test_trigger_is_deterministic_and_keeps_shape(attack, shape):
    x, p = images(shape), RedteamParams(attack=attack)
    out = TRIGGERS[attack](x, p)
    assert out.dtype == np.uint8 and out.shape == x.shape
    assert np.array_equal(out, TRIGGERS[attack](x.copy(), p))
    assert not np.array_equal(out, x)


@pytest.mark.parametrize("attack", ["badnets", "blend", "wanet", "bpp"])
def test_dirty_label_attacks_relabel_non_target_samples(attack):
    labels = np.arange(200) % 10
    p = RedteamParams(attack=attack, poison_rate=0.1, target=3)
    x, y, truth = poison(images((8, 8, 1), 200), labels, p, seed=7)
    backdoor = roles_of(truth, "backdoor")
    assert len(backdoor) == 20 and (labels[backdoor] != 3).all() and (y[backdoor] == 3).all()
    assert all(truth[i].backdoor == attack and truth[i].target == 3 for i in backdoor)
    untouched = np.setdiff1d(np.arange(200), list(truth))
    assert (y[untouched] == labels[untouched]).all()
    again = poison(images((8, 8, 1), 200), labels, p, seed=7)
    assert again[2] == truth and np.array_equal(again[0], x)
    assert poison(images((8, 8, 1), 200), labels, p, seed=8)[2] != truth


def test_sig_is_clean_label_on_the_target_class_only():
    labels = np.arange(200) % 10
    p = RedteamParams(attack="sig", poison_rate=0.5, target=3)  # asks for 100, the class has 20
    x0 = images((32, 32, 3), 200)
    x, y, truth = poison(x0, labels, p, seed=0)
    index = np.array(sorted(truth))
    assert len(index) == 20 and (labels[index] == 3).all()
    assert np.array_equal(y, labels)
    changed = np.flatnonzero((x != x0).reshape(200, -1).any(axis=1))
    assert np.array_equal(changed, index)


def test_wanet_adds_noise_mode_samples_with_their_labels_and_is_subtle():
    labels = np.arange(300) % 10
    p = RedteamParams(attack="wanet", poison_rate=0.1, target=0)
    x0 = images((32, 32, 3), 300)
    x, y, truth = poison(x0, labels, p, seed=1)
    noise = roles_of(truth, "noise")
    assert len(noise) == 2 * 30  # wanet_cross_ratio 2
    assert np.array_equal(y[noise], labels[noise])
    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.float32), (32, 1))
    smooth = np.repeat(smooth[None, :, :, None], 3, axis=3).astype(np.uint8)
    diff = np.abs(wanet(smooth, p).astype(int) - smooth.astype(int))
    assert 0 < diff.mean() < 4  # a fraction of a pixel's displacement: near invisible


@pytest.mark.parametrize("attack", ["adap_blend", "adap_patch"])
def test_adaptive_attacks_train_on_weak_partial_triggers_and_add_cover_samples(attack):
    labels = np.arange(400) % 10
    p = RedteamParams(attack=attack, poison_rate=0.05, target=2)
    x0 = images((32, 32, 3), 400)
    x, y, truth = poison(x0, labels, p, seed=3)
    backdoor, cover = roles_of(truth, "backdoor"), roles_of(truth, "cover")
    assert len(backdoor) == 20 and len(cover) == COVER_RATIO[attack] * 20 and not set(backdoor) & set(cover)
    assert (y[backdoor] == 2).all() and np.array_equal(y[cover], labels[cover])
    full = TRIGGERS[attack](x0[backdoor], p).astype(int) - x0[backdoor]
    part = x[backdoor].astype(int) - x0[backdoor]
    # Weaker than the test trigger: fewer pixels touched and a smaller change where touched.
    assert (part != 0).sum() < (full != 0).sum() and np.abs(part).sum() < 0.75 * np.abs(full).sum()
    assert (part != 0).reshape(20, -1).any(axis=1).all()  # every poisoned sample carries some of it
    layouts = {tuple(np.flatnonzero((part[k] != 0).any(axis=2).ravel())[:5]) for k in range(20)}
    assert len(layouts) > 1  # random parts, not one fixed sub-trigger


def test_adaptive_cover_ratio_param_overrides_the_paper_s():
    labels = np.arange(400) % 10
    p = RedteamParams(attack="adap_blend", poison_rate=0.05, adaptive_cover_ratio=0.5)
    _, _, truth = poison(images((8, 8, 1), 400), labels, p, seed=0)
    assert len(roles_of(truth, "cover")) == 10


def test_adap_patch_test_trigger_stamps_every_patch_and_adap_blend_the_whole_pattern():
    x, p = np.zeros((2, 32, 32, 3), np.uint8), RedteamParams(attack="adap_patch", adap_patches=3)
    expected = np.zeros((32, 32, 3), np.uint8)
    for pattern, r, c in adap_patches((32, 32, 3), p):  # 4x4 each: an eighth of the side
        assert pattern.shape == (4, 4, 3)
        expected[r:r + 4, c:c + 4] = pattern
    assert np.array_equal(adap_patch(x, p)[0], expected) and expected.any()
    assert (adap_blend(x + 100, p) != 100).mean() > 0.9


def test_the_four_original_attacks_poison_the_samples_they_always_did():
    """The benchmark's earlier rows stay comparable: the draw is the one the attack library started with."""
    labels = np.arange(500) % 10
    for attack, candidates in (("badnets", labels != 0), ("sig", labels == 0)):
        _, _, truth = poison(images((8, 8, 1), 500), labels, RedteamParams(attack=attack, poison_rate=0.04), seed=3)
        first = np.sort(np.random.default_rng([3, 0xBAD]).choice(np.flatnonzero(candidates), 20, replace=False))
        assert np.array_equal(roles_of(truth, "backdoor"), first)


def test_bpp_quantises_each_channel_to_its_levels():
    x, p = images((16, 16, 3), 4), RedteamParams(attack="bpp", bpp_levels=4, bpp_dither=False)
    out = bpp(x, p)
    assert set(np.unique(out)) <= {0, 85, 170, 255}
    dithered = bpp(x, RedteamParams(attack="bpp", bpp_levels=4))
    assert set(np.unique(dithered)) <= {0, 85, 170, 255}
    # Dithering keeps the local mean that plain rounding loses.
    assert np.abs(dithered.astype(float).mean() - x.mean()) <= np.abs(out.astype(float).mean() - x.mean()) + 2


def test_label_consistent_perturbs_target_class_samples_within_epsilon_and_keeps_labels():
    from sanitizer.sources import read_digits

    src = read_digits(0.2, 0)
    x0, labels = src.train.x, src.train.y.astype(np.int64)
    p = RedteamParams(attack="label_consistent", poison_rate=0.05, target=4, lc_epsilon=16, lc_amplitude=32)
    x, y, truth = poison(x0, labels, p, seed=0)
    index = roles_of(truth, "backdoor")
    assert len(index) == round(0.05 * len(labels)) and (labels[index] == 4).all() and np.array_equal(y, labels)
    s, diff = p.patch_size, x[index].astype(int) - x0[index]
    inner = diff[:, s:-s, :, :]  # rows away from the corner patches: the adversarial perturbation alone
    assert 0 < np.abs(inner).max() <= 16 + 1
    assert np.abs(diff[:, :s, :s]).max() <= 16 + 32 + 1  # a weak corner trigger on top
    untouched = np.setdiff1d(np.arange(len(labels)), index)
    assert np.array_equal(x[untouched], x0[untouched])


def test_all_to_all_sends_each_label_to_the_next_and_its_asr_counts_that():
    labels = np.arange(200) % 10
    p = RedteamParams(attack="all_to_all", poison_rate=0.2)
    x0 = images((8, 8, 1), 200)
    x, y, truth = poison(x0, labels, p, seed=0)
    index = roles_of(truth, "backdoor")
    assert len(index) == 40 and len(set(labels[index])) > 5
    assert np.array_equal(y[index], (labels[index] + 1) % 10)
    assert all(truth[i].target == (labels[i] + 1) % 10 for i in index)
    [door] = backdoors(p)
    test_labels, test = np.arange(30) % 10, images((8, 8, 1), 30, seed=5)
    # Every test image is triggered (none is its own next label): a model that obeys scores 1, one that calls
    # everything 0 scores the share of 9s.
    assert backdoor_asr(lambda im: (test_labels + 1) % 10, test, test_labels, 10, door) == 1.0
    assert backdoor_asr(lambda im: np.zeros(len(im), int), test, test_labels, 10, door) == pytest.approx(3 / 30)


def test_multi_target_plants_two_backdoors_with_their_own_targets():
    labels = np.arange(300) % 10
    p = RedteamParams(attack="multi_target", poison_rate=0.1, target=2, second_target=7)
    x, y, truth = poison(images((32, 32, 3), 300), labels, p, seed=0)
    doors = backdoors(p)
    assert [d.name for d in doors] == ["multi_target:badnets", "multi_target:blend"]
    by = {d.name: np.array([i for i, t in truth.items() if t.backdoor == d.name]) for d in doors}
    assert len(by["multi_target:badnets"]) == len(by["multi_target:blend"]) == 15
    assert (y[by["multi_target:badnets"]] == 2).all() and (y[by["multi_target:blend"]] == 7).all()
    assert (labels[by["multi_target:blend"]] != 7).all()
    with pytest.raises(ValueError, match="second_target"):
        RedteamParams(attack="multi_target", target=3, second_target=3)


def test_ingest_refuses_a_second_target_that_is_not_a_class(tmp_path, monkeypatch):
    from sanitizer.ingestion import ingest

    monkeypatch.chdir(tmp_path)
    params = Params.model_validate({"redteam": {"attack": "multi_target", "second_target": 12}})
    with pytest.raises(SanitizeError, match="redteam.second_target=12"):
        ingest(params)
