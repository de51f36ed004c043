"""The benchmark scripts run outside the pipeline and its tests; these keep them importable and working."""

from __future__ import annotations

import torch

from bench import spread
from bench.defense import load_case, train_standard
from stages.config import Params


def test_spread_measures_a_trained_digits_model_against_pgd():
    params, train, x_test, y_test, touched, _ = load_case("digits", "badnets", 0.0)
    assert not len(touched)  # rate 0: the clean recipe
    params = params.model_copy(update={"isolate": params.isolate.model_copy(update={"epochs": 2}),
                                       "unlearn": params.unlearn.model_copy(update={"finetune_epochs": 1})})
    model = train_standard(params, train, torch.device("cpu")).eval()
    row = spread.measure(model, params, train, x_test, y_test, torch.device("cpu"))
    assert row["clean_accuracy"] > 0.5  # three epochs learn digits
    assert 0 <= row["fpr"] <= 1 and 0 <= row["pgd_tpr"] <= 1 and row["pgd_auroc"] > 0.5  # PGD moves the activations
    text = spread.markdown([{"dataset": "digits", "seed": 0, **row, "seconds": 1.0}],
                           {"machine": "test", "guard_fpr": 0.05, "guard_confidence": Params().detect.guard_confidence})
    assert f"{Params().detect.guard_confidence:.0%} confidence" in text
