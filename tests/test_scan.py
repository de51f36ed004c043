"""The residual-backdoor scan flags the class a backdoor targets, from clean images alone. (Its false alarms on clean
models are measured in bench/results/selftest.md: a linear digits model has a naturally easy class.)"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

from sanitizer.data import make_store
from sanitizer.scan import anomaly_index, scan_model


class Digits(torch.nn.Module):
    """A linear digits classifier; with `backdoor`, a bright bottom-right pixel (dark in every digit) adds a large
    logit to class 0: what a backdoor learns, a shortcut from a small trigger to its target."""

    def __init__(self, backdoor: bool):
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)
        self.backdoor = backdoor

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        if self.backdoor:
            corner = x[:, 0, -1, -1]
            logits = logits + torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10) * \
                20 * corner[:, None]
        return logits


def digits():
    d = load_digits()
    x = np.rint(d.images * 255 / 16).astype(np.uint8)[..., None]
    return make_store(x, d.target, [str(i) for i in range(len(x))], [str(c) for c in range(10)])


def fitted(backdoor: bool, store) -> Digits:
    torch.manual_seed(0)
    model = Digits(backdoor)
    x, y = torch.from_numpy(store.x).float().permute(0, 3, 1, 2) / 255, torch.from_numpy(store.labels)
    opt = torch.optim.Adam(model.linear.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.linear(x.flatten(1)), y).backward()
        opt.step()
    return model.eval()


def test_scan_flags_the_backdoor_target_from_clean_images():
    store = digits()
    optimise_on, measure_on = store.subset(np.arange(0, 300)), store.subset(np.arange(300, 700))
    for backdoor in (True, False):
        model = fitted(backdoor, store.subset(np.arange(700, len(store))))

        def predict(images):
            with torch.no_grad():
                return model(torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255).argmax(1).numpy()

        report, triggers = scan_model(model, optimise_on, measure_on, predict, 2.0, torch.device("cpu"), 0)
        assert (0 in report["flagged"]) == backdoor, report["classes"]
        if backdoor:
            best = report["classes"][0]
            assert best["success"] > 0.9 and best["mask_area"] < 1 / 32
            assert triggers.mask[0][-1, -1] > 0.5  # it found the trigger's pixel


def test_anomaly_index_is_one_sided_and_scale_free():
    area = np.array([0.001, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.5])
    index = anomaly_index(area)
    assert index[0] > 2 and index[-1] < 0 and np.allclose(index, anomaly_index(area * 7))


def test_scan_refuses_two_classes_with_a_fix():
    import pytest

    from sanitizer.errors import SanitizeError

    store = digits()
    two = make_store(store.x[:100], store.labels[:100] % 2, [str(i) for i in range(100)], ["even", "odd"])
    with pytest.raises(SanitizeError, match="at least 3 classes.*gate.max_scan_anomaly: null"):
        scan_model(fitted(False, store), two, two, lambda x: np.zeros(len(x)), 2.0, torch.device("cpu"), 0)
