"""isolate: LGA training catches the poison, and the same seed gives the same isolated ids."""

from __future__ import annotations

import numpy as np
import torch

from stages.config import Params
from stages.data import make_store
from stages.isolate import select_isolated, train_lga
from stages.sources import read_digits
from stages.train import lga_loss
from stages.triggers import poison


def test_lga_loss_flips_sign_below_gamma():
    assert lga_loss(torch.tensor([1.0, 2.0]), 0.5) > 0
    below = torch.tensor([0.1, 0.2], requires_grad=True)
    lga_loss(below, 0.5).backward()
    assert (below.grad < 0).all()  # under gamma, minimising the LGA loss *raises* the loss


def test_select_isolated_takes_lowest_final_loss_with_stable_ties():
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
    params = Params.model_validate({"device": "cpu", "isolate": {"epochs": 3}})
    store, _ = small_poisoned_digits(params)
    runs = []
    for _ in range(2):
        _, _, history = train_lga(params, store, torch.device("cpu"))
        runs.append(store.ids[select_isolated(history, store.ids, params.isolate.ratio)].tolist())
    assert runs[0] == runs[1] and len(runs[0]) == 14


def test_lga_isolates_badnets_poison_on_digits():
    params = Params.model_validate({"device": "cpu", "isolate": {"epochs": 10}})
    store, truth = small_poisoned_digits(params)
    _, _, history = train_lga(params, store, torch.device("cpu"))
    chosen = select_isolated(history, store.ids, params.isolate.ratio)
    precision = np.isin(chosen, truth).mean()
    assert precision >= 0.9, precision
