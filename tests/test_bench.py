"""The benchmark scripts run outside the pipeline and its tests; these keep them importable and working."""

from __future__ import annotations

import torch

from bench import spread
from bench.defense import load_case, train_standard
from stages.config import Params


def test_spread_measures_a_trained_digits_model_against_pgd():
    params, train, x_test, y_test, touched, _ = load_case("digits", "badnets", 0.0)
    assert not len(touched)  # rate 0: the clean recipe
    default_guard = {k: getattr(Params().detect, k) for k in ("guard", "guard_shares")}  # the CIFAR-10 profile's
    assert default_guard["guard_shares"] and "mahalanobis@released" not in default_guard["guard_shares"]
    params = params.model_copy(update={"isolate": params.isolate.model_copy(update={"epochs": 2}),
                                       "unlearn": params.unlearn.model_copy(update={"finetune_epochs": 1}),
                                       "detect": params.detect.model_copy(update=default_guard)})
    model = train_standard(params, train, torch.device("cpu")).eval()
    row = spread.measure(model, params, train, x_test, y_test, torch.device("cpu"))
    assert row["clean_accuracy"] > 0.5  # three epochs learn digits
    assert 0 <= row["fpr"] <= 1 and 0 <= row["pgd_tpr"] <= 1 and row["pgd_auroc"] > 0.5  # PGD moves the activations
    text = spread.markdown([{"dataset": "digits", "seed": 0, **row, "seconds": 1.0}],
                           {"machine": "test", "guard_fpr": 0.05, "guard_confidence": Params().detect.guard_confidence})
    assert f"{Params().detect.guard_confidence:.0%} confidence" in text


def test_variants_share_a_sanitize_run_only_where_sanitize_reads_the_same():
    import numpy as np

    from bench.defense import DEFENSES, profile_params, sanitize_key

    isolated = np.array([3, 5, 8])
    adaptive, fused, resample = (profile_params("cifar10", "wanet", 0.1, DEFENSES[name])
                                 for name in ("abl+adaptive", "fused", "fused+resample"))
    # The ranking (detect.fusion) differs; with the same samples isolated, sanitize runs the same.
    assert sanitize_key(adaptive, isolated, "group") == sanitize_key(fused, isolated, "group")
    # Sub-pixel resampling only trains a restarted model: it matters after no evidence, not after a group.
    assert sanitize_key(fused, isolated, "group") == sanitize_key(resample, isolated, "group")
    assert sanitize_key(fused, isolated, "none") != sanitize_key(resample, isolated, "none")
    # Other samples, other evidence or other unlearning settings: a run of its own.
    assert sanitize_key(fused, isolated, "group") != sanitize_key(fused, np.array([3, 5, 9]), "group")
    assert sanitize_key(fused, isolated, "group") != sanitize_key(fused, isolated, "weak")
    plain = profile_params("cifar10", "wanet", 0.1, DEFENSES["abl"])
    assert sanitize_key(plain, isolated, None) != sanitize_key(fused, isolated, None)  # ascent against joint


def test_resplits_recalibrate_the_guard_on_other_splits_of_the_test_set():
    import numpy as np

    from bench.defense import resplit_rates

    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(1000, 2, generator=gen, dtype=torch.float64)
    y = np.arange(1000) % 10
    params = Params.model_validate({"data": {"calibration_size": 0.5}})
    made_from = np.arange(1000)
    # Malicious images scoring as their clean originals: flagged exactly as often as clean evaluation images, which
    # holds only if each split counts the ones made from its own evaluation part.
    same = resplit_rates(clean, {"copy": (clean.clone(), made_from), "far": (clean + 10, made_from)}, y, params,
                         [0.5, 0.5], range(1, 21))
    assert same["splits"] == 20
    assert same["tpr_mean"]["copy"] == same["fpr_mean"] and same["tpr_mean"]["far"] == 1.0
    assert 0.01 < same["fpr_mean"] < params.detect.guard_fpr  # the bound holds on average, with its margin
    # Each column on any positive affine scale: the calibration undoes it.
    rescaled = clean * torch.tensor([3.0, 0.5], dtype=torch.float64) + torch.tensor([1.0, -7.0], dtype=torch.float64)
    again = resplit_rates(rescaled, {"copy": (rescaled.clone(), made_from), "far": (rescaled + 50, made_from)}, y,
                          params, [0.5, 0.5], range(1, 21))
    assert again["fpr_mean"] == same["fpr_mean"] and again["fpr_p95"] == same["fpr_p95"]
