"""Guard detectors the benchmark compares with the shipped ones (sanitizer/guard.py SHIPPED), never shipped: feature-
and activation-space distances and the disagreement of the isolation model with the released one. They plug into
`sanitizer.guard.fit_heads` through its fitter table; bench/results/guard.md has their rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sanitizer.detectors import (Gaussians, conv_stages, features, fit_gaussians, kth_distance, mahalanobis,
                                 mismatch)
from sanitizer.guard import FAMILIES, FITTERS, NEEDS_QUARANTINE, FitData
from sanitizer.isolation import implicated_class
from sanitizer.train import to_tensor

ALTERNATIVE_FAMILIES = {
    "knn": "feature space (Sun et al. 2022, deep nearest neighbours)",
    "quarantine_knn": "feature space (k-NN after Sun et al. 2022, clean neighbours against quarantined ones)",
    "mahalanobis": "activation space (Lee et al. 2018, class-conditional Mahalanobis)",
    "mismatch": "activation space (Lee et al.'s Gaussians: distance to the predicted class beyond the nearest, the "
                "consistency check of Papernot & McDaniel 2018)",
    "disagreement": "model sensitivity (Jin et al.: prediction change under a mutation of the model; here the isolation "
                    "checkpoint against the released model, its unlearned descendant)"}


@dataclass(frozen=True)
class AlternativeSettings:
    knn_k: int = 10  # knn heads: the clean neighbour whose distance is the score
    knn_bank: int = 2000  # knn heads: clean training features kept in the guard
    quarantine_k: int = 5  # quarantine_knn: the quarantined neighbour whose distance is subtracted
    disagreement_eps: float = 0.05  # disagreement: added to both probabilities before their log-ratio
    mahalanobis_stages: str = "last"  # mahalanobis, mismatch: the conv stages they read


SETTINGS = AlternativeSettings()


class KnnHead(nn.Module):
    def __init__(self, bank: torch.Tensor, k: int):
        super().__init__()
        self.register_buffer("bank", F.normalize(bank, dim=1))
        self.k = min(k, len(bank))

    def forward(self, acts: list[torch.Tensor]) -> torch.Tensor:
        return kth_distance(acts[-1], self.bank, self.k)


class QuarantineKnnHead(nn.Module):
    """How much nearer the input lies to the quarantined suspects than to clean training samples:
    d_k(x, clean) - d_k'(x, suspects), on normalised penultimate features. The isolation model learned the
    trigger, so a triggered input lands beside the poison it quarantined, whatever the trigger looks like
    (bench/results/guard.md, CIFAR-10 subset, TPR at FPR <= 5%: BadNets 5% 1.00 against 0.89 for
    mahalanobis and 0.50 for knn on the same model; Blend 5% 1.00 against 0.11 and 0.03)."""

    def __init__(self, clean: torch.Tensor, suspects: torch.Tensor, k_clean: int, k_suspects: int):
        super().__init__()
        self.clean, self.suspects = KnnHead(clean, k_clean), KnnHead(suspects, k_suspects)

    def forward(self, acts: list[torch.Tensor]) -> torch.Tensor:
        return self.clean(acts) - self.suspects(acts)


class DisagreementHead(nn.Module):
    """How much more the isolation checkpoint than the released model believes the implicated label (the
    label most quarantined suspects carry): log(p_iso + eps) - log(p_rel + eps). The isolation model
    learned the trigger; unlearning taught its descendant, the released model, to refuse it. On a clean
    input the two agree (both low, or both high on a clean image of that class); a triggered input gets
    near 1 from one and near 0 from the other. `eps` keeps the released model's confidence on clean
    inputs (log-probabilities of -20 and below) from counting as disagreement; a log-ratio, not the plain
    difference of probabilities, whose heavier clean tail raised the guard's threshold (measured, CIFAR-10
    subset: PGD TPR of the whole guard 0.59 against 0.53). Measured alone (TPR at FPR <= 5%, 90%
    confidence): default digits run 1.00 against 0.48 for quarantine_knn; CIFAR-10 subset, BadNets 10%
    0.97, Blend 5% 1.00."""

    def __init__(self, isolation_head: nn.Linear, released_head: nn.Linear, label: int, eps: float):
        super().__init__()
        # The models' own output layers, shared with the guard's backbones, not copies of their weights.
        self.isolation_head, self.released_head = isolation_head, released_head
        self.label, self.eps = label, eps

    def forward(self, acts: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        p_iso = F.softmax(self.isolation_head(acts["isolation"][-1]), dim=1)[:, self.label]
        p_rel = F.softmax(self.released_head(acts["released"][-1]), dim=1)[:, self.label]
        return torch.log(p_iso + self.eps) - torch.log(p_rel + self.eps)


class MahalanobisHead(nn.Module):
    def __init__(self, g: Gaussians, stages: str):
        super().__init__()
        self.n, self.stages = len(g.means), stages
        for i, (mu, prec, scale) in enumerate(zip(g.means, g.precisions, g.scales)):
            self.register_buffer(f"mean{i}", mu)
            self.register_buffer(f"precision{i}", prec)
            self.register_buffer(f"scale{i}", scale.reshape(()))

    def gaussians(self) -> Gaussians:
        return Gaussians([getattr(self, f"mean{i}") for i in range(self.n)],
                         [getattr(self, f"precision{i}") for i in range(self.n)],
                         [getattr(self, f"scale{i}") for i in range(self.n)])

    def forward(self, acts: list[torch.Tensor]) -> torch.Tensor:
        return mahalanobis(conv_stages(acts, self.stages), self.gaussians())


class MismatchHead(MahalanobisHead):
    """`mismatch` on the model whose `head` (its output layer, shared with the guard's backbone) predicts."""

    def __init__(self, g: Gaussians, stages: str, head: nn.Linear):
        super().__init__(g, stages)
        self.head = head

    def forward(self, acts: list[torch.Tensor]) -> torch.Tensor:
        return mismatch(conv_stages(acts, self.stages), self.gaussians(), self.head(acts[-1]).argmax(dim=1))


def feature_bank(d: FitData) -> torch.Tensor:
    """The clean rows the knn heads keep: the first draw of fit_heads' seeded generator."""
    rng = np.random.default_rng([d.g.seed, 0x6A7D])
    return torch.from_numpy(np.sort(rng.permutation(len(d.clean))[:SETTINGS.knn_bank])).to(d.device)


def fit_disagreement(d: FitData, source: str):
    label = implicated_class(d.quarantined.labels)
    head = DisagreementHead(d.models["isolation"].head, d.models["released"].head, label, SETTINGS.disagreement_eps)
    return None, head, {"model": "isolation against released", "label": label}


def fit_knn(d: FitData, source: str):
    return source, KnnHead(d.clean_features(source)[-1][feature_bank(d)], SETTINGS.knn_k), {}


def fit_quarantine_knn(d: FitData, source: str):
    suspects = features(d.models[source], to_tensor(d.quarantined.x, d.device))[-1]
    clean = d.clean_features(source)[-1][feature_bank(d)]
    return source, QuarantineKnnHead(clean, suspects, SETTINGS.knn_k, SETTINGS.quarantine_k), {}


def fit_mahalanobis(d: FitData, source: str, mismatch_head: bool = False):
    stage_acts = conv_stages(d.clean_features(source), SETTINGS.mahalanobis_stages)
    gaussians = fit_gaussians(stage_acts, d.y_clean, len(d.clean.class_names))
    head = (MismatchHead(gaussians, SETTINGS.mahalanobis_stages, d.models[source].head) if mismatch_head
            else MahalanobisHead(gaussians, SETTINGS.mahalanobis_stages))
    return source, head, {}


ALL_FITTERS = {**FITTERS, "disagreement": fit_disagreement, "knn": fit_knn, "quarantine_knn": fit_quarantine_knn,
               "mahalanobis": fit_mahalanobis, "mismatch": lambda d, s: fit_mahalanobis(d, s, mismatch_head=True)}
ALL_FAMILIES = {**FAMILIES, **ALTERNATIVE_FAMILIES}
ALL_NEEDS_QUARANTINE = (*NEEDS_QUARANTINE, "quarantine_knn@", "disagreement@")
