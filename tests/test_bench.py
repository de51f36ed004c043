"""The benchmark scripts run outside the pipeline and its tests; these keep them importable and working."""

from __future__ import annotations

import torch

from bench import spread
from bench.defense import ROOT, budget, case_params, load_case, profiles, train_undefended
from sanitizer.config import Params


def test_spread_measures_a_trained_digits_model_against_pgd():
    from sanitizer.models import model_spec
    from sanitizer.train import channel_stats

    params, data, x_test, y_test, touched, _ = load_case("digits", "badnets", 0.0)
    assert not len(touched)  # rate 0: the clean recipe
    params = params.model_copy(update={"train": params.train.model_copy(update={"isolate_epochs": 2,
                                                                                "finetune_epochs": 1})})
    train = data.train
    spec = model_spec(train.image_shape, 10, params.model.width, *channel_stats(train.x))
    model = train_undefended(params, train, data.rules, spec, torch.device("cpu")).eval()
    row = spread.measure(model, params, data.rules, train, x_test, y_test, torch.device("cpu"))
    assert row["clean_accuracy"] > 0.5  # three epochs learn digits
    assert 0 <= row["fpr"] <= 1 and 0 <= row["pgd_tpr"] <= 1 and row["pgd_auroc"] > 0.5  # PGD moves the activations
    confidence = Params().advanced.guard.confidence
    text = spread.markdown([{"dataset": "digits", "seed": 0, **row, "seconds": 1.0}],
                           {"machine": "test", "guard_fpr": 0.05, "guard_confidence": confidence})
    assert f"{confidence:.0%} confidence" in text


def test_the_benchmark_runs_params_yaml_as_shipped():
    """Only the data (and, where a profile says so, the budget) differ from what a user runs."""
    from sanitizer.config import load_params

    shipped = load_params(ROOT / "params.yaml").model_dump()
    for dataset in profiles():
        for method in ("full", "abl", "off"):
            case = case_params(dataset, "wanet", 0.05, method).model_dump()
            assert case["redteam"]["attack"] == "wanet" and case["defense"]["method"] == method
            differs = {k for k in shipped if case[k] != shipped[k]} - {"data", "redteam", "defense", "device"}
            assert differs <= set(budget(dataset)), (dataset, differs)


def test_resplits_recalibrate_the_guard_on_other_splits_of_the_test_set():
    import numpy as np

    from bench.defense import resplit_rates

    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(1000, 2, generator=gen, dtype=torch.float64)
    y = np.arange(1000) % 10
    from sanitizer.guard import guard_settings
    from sanitizer.rules import DataRules

    params = Params.model_validate({"data": {"calibration_size": 0.5}})
    g = guard_settings(params, DataRules(1, False, 6, "share", True))
    made_from = np.arange(1000)
    # Malicious images scoring as their clean originals: flagged exactly as often as clean evaluation images, which
    # holds only if each split counts the ones made from its own evaluation part.
    same = resplit_rates(clean, {"copy": (clean.clone(), made_from), "far": (clean + 10, made_from)}, y, params, g,
                         [0.5, 0.5], range(1, 21))
    assert same["splits"] == 20
    assert same["tpr_mean"]["copy"] == same["fpr_mean"] and same["tpr_mean"]["far"] == 1.0
    assert 0.01 < same["fpr_mean"] < g.fpr  # the bound holds on average, with its margin
    # Each column on any positive affine scale: the calibration undoes it.
    rescaled = clean * torch.tensor([3.0, 0.5], dtype=torch.float64) + torch.tensor([1.0, -7.0], dtype=torch.float64)
    again = resplit_rates(rescaled, {"copy": (rescaled.clone(), made_from), "far": (rescaled + 50, made_from)}, y,
                          params, g, [0.5, 0.5], range(1, 21))
    assert again["fpr_mean"] == same["fpr_mean"] and again["fpr_p95"] == same["fpr_p95"]


def test_the_readme_results_table_is_generated_from_the_committed_results():
    from bench.table import END, START, current_table

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    committed = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert committed == current_table().strip(), "run `python -m bench.table` and commit README.md"


def test_selftest_units_change_only_the_seed_canaries_and_defense():
    from bench.selftest import CANARY_RATE, unit_params
    from sanitizer.config import load_params

    shipped = load_params(ROOT / "params.yaml").model_dump()
    for kind, method, canaries in [("canary", "full", CANARY_RATE), ("nocanary", "full", 0.0), ("off", "off", CANARY_RATE),
                                   ("clean", "off", 0.0), ("oracle", "off", 0.0)]:
        unit = unit_params("digits", None, 0.0, 3, kind).model_dump()
        assert (unit["seed"], unit["defense"]["method"], unit["canary"]["rate"]) == (3, method, canaries)
        assert unit["redteam"]["poison_rate"] == 0.0  # no attack: nothing planted
        differs = {k for k in shipped if unit[k] != shipped[k]} - {"seed", "data", "redteam", "defense", "canary", "device"}
        assert not differs, (kind, differs)


def test_a_merged_run_replaces_only_the_rows_it_ran():
    """--merge: a row is its case and defense (a guard row its case and detector, a cost its case); rows of the earlier
    run that this run did not produce survive, the ones it did are replaced, and the tables stay in their order."""
    from bench.defense import combined

    def row(attack, rate, defense, asr):
        return {"dataset": "cifar10", "attack": attack, "poison_rate": rate, "defense": defense, "asr": asr}

    def guard(attack, rate, tpr):
        return {"dataset": "cifar10", "attack": attack, "poison_rate": rate, "detector": "guard", "tpr": tpr}

    earlier = ([row("bpp", 0.1, "full", 0.003), row("bpp", 0.1, "none", 0.9), row("blend", 0.05, "none", 1.0)],
               [guard("bpp", 0.1, 1.0), guard("multi_target:blend", 0.05, 0.2)],
               [{"dataset": "cifar10", "attack": "bpp", "poison_rate": 0.1, "seconds": 1}])
    now = ([row("bpp", 0.1, "none", 0.997), row("bpp", 0.1, "oracle", 0.013)],
           [guard("multi_target:blend", 0.05, 0.9)], [])
    rows, guards, costs = combined(now, earlier)
    assert [(r["attack"], r["defense"], r["asr"]) for r in rows] == [
        ("blend", "none", 1.0), ("bpp", "none", 0.997), ("bpp", "oracle", 0.013), ("bpp", "full", 0.003)]
    assert sorted((g["attack"], g["tpr"]) for g in guards) == [("bpp", 1.0), ("multi_target:blend", 0.9)]
    assert costs == earlier[2]
