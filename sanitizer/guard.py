"""The inference-time guard, shipped beside the model: models/guard.onnx.

A second ONNX file, not a second output of model.onnx: the released model stays exactly the graph the
gate measured and parity-checked, deployments that do not want the guard run the model alone at its own
cost, and the guard can be recalibrated without touching the model. It takes the model's input (float32
[N, C, H, W] in [0, 1]) and returns `score` (float32 [N]) and `flag` (bool [N], score > threshold).

The shipped guard (`SHIPPED`, for all data) is three detectors: `quarantine_probe` (triggered inputs: the released
model unlearned the trigger's label, not the trigger's look) and `probe` (adversarial inputs), two linear probes on
the released model's block statistics of one pass, and `quarantine_net`, a small CNN of its own trained on the pixels
of the quarantine, for a trigger that the released model no longer represents (a warp). The alternatives the
benchmark compares (knn, quarantine_knn, disagreement, mahalanobis, mismatch) live in bench/guard_alternatives.py
and plug in through `FITTERS`.

Each score is put on one scale by the clean calibration split: 0 at its median, 1 at its own calibration
score of the rank of its share (`fpr_shares`, `SHIPPED_SHARES`) of the calibration images the threshold may flag; the
guard's score is the largest, and its threshold keeps the false-positive rate at most `guard.fpr` with probability
`advanced.guard.confidence` (`calibrated_threshold`), judged on that split, as the gate measures it: on the clean
images of the rest of the test split, whose own sampling noise the bound takes in. The threshold, the calibration
data's hash and the detectors are in the file's metadata. docs/method.md, "The guard", says why.

`python -m stages guard IMAGE... [--json]` (sanitizer/guard_cli.py) scores images with the shipped files.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from sanitizer import paths
from sanitizer.config import Params
from sanitizer.rules import DataRules
from sanitizer.data import Store, store_hash
from sanitizer.detectors import (Probe, features, fit_adversarial_probe, fit_quarantine_net, fit_quarantine_probe,
                                 probe_score, quarantine_net_score)
from sanitizer.errors import SanitizeError
from sanitizer.onnx_io import input_batches, open_session
from sanitizer.models import model_spec
from sanitizer.train import channel_stats, to_tensor

FAMILIES = {"probe": "activation space (Metzen et al. 2017: a detector on intermediate activations, here a logistic "
                     "regression on the channel statistics of the last conv blocks, fitted on FGSM and PGD "
                     "examples of clean training images)",
            "quarantine_probe": "activation space (the probe's logistic regression on the same block statistics, "
                                "clean training images against the quarantined suspects; Chen et al. 2019 found "
                                "poison separable in activations)",
            "quarantine_net": "feature space, learned (Metzen et al. 2017's detector network, trained on the pixels: "
                              "clean training images against the quarantined suspects)"}


# Left out of the guard when nothing is quarantined.
NEEDS_QUARANTINE = ("quarantine_probe@", "quarantine_net@")


SHIPPED = ("quarantine_net@input", "quarantine_probe@released", "probe@released")
# Each shipped detector's weight in the false-positive split: the net catches triggers the released model no longer
# represents, the probe adversarial inputs (docs/method.md, "The guard"; bench/results/guard.md).
SHIPPED_SHARES = {"quarantine_net@input": 0.7, "quarantine_probe@released": 0.1, "probe@released": 0.2}


@dataclass(frozen=True)
class GuardSettings:
    """The guard's detectors and constants: `guard_settings` fills them from params and the data's rules."""
    detectors: tuple[str, ...]  # entries "<detector>@<model>"; the guard's score is the largest calibrated one
    shares: dict | None  # each detector's weight in the false-positive split; None: released_share's split
    fpr: float  # params guard.fpr
    confidence: float  # params advanced.guard.confidence
    probe_blocks: int  # conv blocks the probes read (sanitizer/rules.py)
    seed: int = 0
    released_share: float = 0.7  # without shares: the released model's detectors' share of fpr
    probe_eps: float = 8 / 255  # probe: L-infinity budget of the FGSM / PGD examples it is fitted on
    probe_steps: tuple[int, ...] = (1, 10)  # probe: FGSM and a 10-step PGD
    probe_samples: int = 2000  # probes: clean training images they are fitted on
    net_width: int = 4  # quarantine_net: width of its small CNN
    net_epochs: int = 20  # quarantine_net: epochs of each round
    net_rounds: int = 3  # quarantine_net: each round after the first trains on the suspects the last scored highest
    net_refine: float = 0.55  # quarantine_net: share of suspects each later round leaves out


def guard_settings(params: Params, rules: DataRules, detectors=SHIPPED, shares=SHIPPED_SHARES) -> GuardSettings:
    return GuardSettings(tuple(detectors), shares, params.guard.fpr, params.advanced.guard.confidence,
                         rules.probe_blocks, params.seed)


class ProbeHead(nn.Module):
    """A linear probe (`probe`, `quarantine_probe`) on the statistics of its model's last `blocks` conv blocks
    (`SmallCNN.activations`): the last columns of the statistics GuardNet computes, which may span more blocks
    for another head on the same model."""

    def __init__(self, p: Probe, blocks: int):
        super().__init__()
        self.reads_block_statistics = blocks
        for name in ("mean", "scale", "weight"):
            self.register_buffer(name, getattr(p, name))
        self.register_buffer("bias", torch.tensor(p.bias))

    def forward(self, stats: torch.Tensor) -> torch.Tensor:
        return probe_score(stats[:, stats.shape[1] - len(self.mean):], Probe(self.mean, self.scale, self.weight,
                                                                              self.bias))


class QuarantineNetHead(nn.Module):
    """`quarantine_net` (`fit_quarantine_net`): its own small CNN, reading the input (source "input")."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quarantine_net_score(self.net, x)


class GuardNet(nn.Module):
    """Its models' activations, each detector's calibrated score, the largest, the flag. A head's source is
    the model whose activations it reads, None for a head that reads every model's (bench/'s disagreement) or "input"
    for one that reads the input itself (quarantine_net); a head with `reads_block_statistics` reads its model's block
    statistics instead, computed in the same pass."""

    def __init__(self, models: dict[str, nn.Module], heads: list[tuple[str | None, nn.Module]]):
        super().__init__()
        self.models = nn.ModuleDict({name: m for name, m in models.items()
                                     if any(source in (name, None) for source, _ in heads)})
        self.sources = [source for source, _ in heads]
        self.heads = nn.ModuleList([head for _, head in heads])
        self.block_statistics = {}  # per model, the most blocks any of its heads reads
        for source, head in heads:
            blocks = getattr(head, "reads_block_statistics", 0)
            if blocks:
                self.block_statistics[source] = max(blocks, self.block_statistics.get(source, 0))
        self.register_buffer("centre", torch.zeros(len(heads)))
        self.register_buffer("scale", torch.ones(len(heads)))
        self.register_buffer("threshold", torch.tensor(0.0))

    def detector_scores(self, x: torch.Tensor) -> torch.Tensor:
        acts, stats = {}, {}
        for name, m in self.models.items():
            if name in self.block_statistics:
                acts[name], stats[name] = m.activations(x, block_statistics=self.block_statistics[name])
            else:
                acts[name] = m.activations(x)
        raw = torch.stack([head(stats[source] if getattr(head, "reads_block_statistics", 0)
                                else x if source == "input" else acts if source is None else acts[source])
                           for source, head in zip(self.sources, self.heads)], dim=1)
        return (raw - self.centre) / self.scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score = self.detector_scores(x).amax(dim=1)
        return score, score > self.threshold


def allowed_flags(n: int, fpr: float, confidence: float, check_size: int = 0) -> int:
    """How many of n clean calibration scores may lie above the threshold (`calibrated_threshold`): the most, k,
    that keep P(FPR > fpr) at most 1 - confidence.

    Flagging the k highest of n leaves a true FPR distributed as Beta(k + 1, n - k) (order statistics; Vovk 2012,
    training-conditional conformal validity), so P(FPR > fpr) = P(Binomial(n, fpr) <= k). Measured on `check_size`
    fresh clean images instead (the gate's evaluation split), the flagged count among them is beta-binomial: their
    sampling noise comes on top, and k is smaller (docs/method.md, "The guard").
    """
    from scipy.stats import betabinom, binom

    ks = np.arange(n)
    if check_size:  # P(more than fpr of check_size flagged), rising with k
        over = betabinom.sf(np.floor(fpr * check_size + 1e-9), check_size, ks + 1, n - ks)
    else:
        over = binom.cdf(ks, n, fpr)
    return max(int(np.searchsorted(over, 1 - confidence, side="right")) - 1, 0)


def fpr_shares(entries: list[str], released_share: float, weights: dict[str, float] | None = None) -> list[float]:
    """Each detector's share of the false-positive budget, for its scale (`build_guard`): its weight in `weights`
    (`SHIPPED_SHARES`) over theirs all, or, without weights, the released model's detectors split `released_share`,
    the others (the isolation checkpoint's, the input's) the rest; a group alone takes it all.

    Shares shape the scales only; the threshold's bound holds for any. With every detector scaled at the full
    budget, the union of their tails would push the threshold past all of them. A learned trigger lies far out for
    the isolation checkpoint's detectors, an adversarial example just past the clean tail of the released model's,
    so the released model's take the larger share (docs/method.md, "The guard")."""
    if weights:
        total = sum(weights[entry] for entry in entries)
        return [weights[entry] / total for entry in entries]
    released = [entry.endswith("@released") for entry in entries]
    n_released, n_isolation = sum(released), len(entries) - sum(released)
    if not n_released or not n_isolation:
        return [1 / len(entries)] * len(entries)
    return [released_share / n_released if r else (1 - released_share) / n_isolation for r in released]


def detector_scales(raw: torch.Tensor, shares: list[float], fpr: float, confidence: float, check_size: int = 0):
    """(centre, scale) per detector from clean calibration scores [n, detectors]: 0 at its median, 1 at the
    calibration rank of its share of the flags the threshold allows (`allowed_flags` of the whole budget, the rank
    interpolated). Each share's own bound instead (allowed_flags(n, fpr * share)) would set a small share's scale at
    the calibration maximum when the confidence is high, and catch far less (docs/method.md, "The guard")."""
    ranked, n = raw.sort(dim=0).values, len(raw)
    rank = (n - 1 - torch.tensor(shares, dtype=torch.float64) * allowed_flags(n, fpr, confidence, check_size)).clamp_min(0)
    below, above = rank.floor().long().to(raw.device), rank.ceil().long().to(raw.device)
    weight = (rank - rank.floor()).to(raw.device, raw.dtype)
    columns = torch.arange(raw.shape[1], device=raw.device)
    kept = ranked[below, columns] * (1 - weight) + ranked[above, columns] * weight
    centre = raw.median(dim=0).values
    return centre, (kept - centre).clamp_min(1e-6)


def calibrate_scores(raw: torch.Tensor, shares: list[float], fpr: float, confidence: float, check_size: int = 0):
    """The guard's calibration from clean per-detector scores [n, detectors]: each detector's (centre, scale)
    (`detector_scales`), the threshold on the largest scaled score (`calibrated_threshold`) and the share of these
    images it flags."""
    centre, scale = detector_scales(raw, shares, fpr, confidence, check_size)
    score = ((raw - centre) / scale).amax(dim=1).cpu().numpy()
    threshold = calibrated_threshold(score, fpr, confidence, check_size)
    return centre, scale, threshold, float(np.mean(score > threshold))


def calibrated_threshold(scores: np.ndarray, fpr: float, confidence: float = 0.5, check_size: int = 0) -> float:
    """A threshold (flag = score > threshold) under which the guard's false-positive rate is at most `fpr` with
    probability `confidence`, from these clean calibration scores: its true rate, or with `check_size` the rate
    measured on that many fresh clean images (`allowed_flags`).

    confidence 0.5 is about the plain (1 - fpr) quantile, whose FPR on new images overshoots about half the time
    (docs/method.md, "The guard"). The cut lies halfway between the last score kept and the first flagged, so that
    onnxruntime's rounding of a calibration image's score cannot move it across."""
    s = np.sort(scores)
    n = len(s)
    allowed = allowed_flags(n, fpr, confidence, check_size)
    kept = s[n - allowed - 1]
    return float(kept if allowed == 0 else (kept + s[n - allowed]) / 2)


@dataclass
class FitData:
    """What the detectors are fitted on: the models, the clean training set and the quarantine, on the device, and
    a seeded sample of clean rows for the probes."""
    g: GuardSettings
    models: dict
    clean: Store
    quarantined: Store
    x_clean: torch.Tensor
    y_clean: torch.Tensor
    sample: torch.Tensor  # indices into the clean set
    device: torch.device
    _features: dict = field(default_factory=dict)

    def clean_features(self, source: str) -> list[torch.Tensor]:
        """`features` of the clean set on model `source`, computed once for every head that reads them."""
        if source not in self._features:
            self._features[source] = features(self.models[source], self.x_clean)
        return self._features[source]


def fit_probe(d: FitData, source: str):
    g = d.g
    head = ProbeHead(fit_adversarial_probe(d.models[source], d.x_clean[d.sample], d.y_clean[d.sample], g.probe_eps,
                                           list(g.probe_steps), g.probe_blocks), g.probe_blocks)
    return source, head, {"eps": g.probe_eps, "steps": list(g.probe_steps), "blocks": g.probe_blocks,
                          "n_fit": int(len(d.sample))}


def fit_quarantine_probe_head(d: FitData, source: str):
    g = d.g
    head = ProbeHead(fit_quarantine_probe(d.models[source], d.x_clean[d.sample], to_tensor(d.quarantined.x, d.device),
                                          g.probe_blocks), g.probe_blocks)
    return source, head, {"blocks": g.probe_blocks, "n_clean": int(len(d.sample)), "n_suspects": len(d.quarantined)}


def fit_quarantine_net_head(d: FitData, source: str):
    g = d.g
    spec = model_spec(d.clean.image_shape, 2, g.net_width, *channel_stats(d.clean.x))
    head = QuarantineNetHead(fit_quarantine_net(d.x_clean, to_tensor(d.quarantined.x, d.device), spec, g.net_epochs,
                                                g.net_rounds, g.net_refine, g.seed))
    return source, head, {"width": g.net_width, "epochs": g.net_epochs, "rounds": g.net_rounds, "refine": g.net_refine,
                          "n_clean": len(d.clean), "n_suspects": len(d.quarantined)}


# detector -> fitter(FitData, source) -> (what the head reads, the head, its description); bench/ adds alternatives.
FITTERS = {"probe": fit_probe, "quarantine_probe": fit_quarantine_probe_head, "quarantine_net": fit_quarantine_net_head}


@torch.no_grad()
def fit_heads(g: GuardSettings, models: dict[str, nn.Module], clean: Store, quarantined: Store,
              device: torch.device, fitters=None, families=None, needs_quarantine=NEEDS_QUARANTINE) -> dict[str, tuple]:
    """Each detector of `g.detectors` fitted on the clean training set (and the quarantine): entry -> (what it reads:
    a model's name, None for every model's or "input" (GuardNet), head, description). The detectors that need the
    quarantine are left out when it is empty. A head does not depend on which others are fitted beside it."""
    fitters, families = fitters or FITTERS, families or FAMILIES
    entries = [e for e in g.detectors if len(quarantined) or not e.startswith(needs_quarantine)]
    rng = np.random.default_rng([g.seed, 0x6A7D])
    rng.permutation(len(clean))  # the first draw is the alternatives' feature bank (bench/guard_alternatives.py)
    sample = torch.from_numpy(np.sort(rng.permutation(len(clean))[:g.probe_samples])).to(device)
    data = FitData(g, models, clean, quarantined, to_tensor(clean.x, device), torch.from_numpy(clean.labels).to(device),
                   sample, device)
    heads = {}
    for entry in entries:
        detector, source = entry.split("@")
        reads, head, extra = fitters[detector](data, source)
        heads[entry] = (reads, head.to(device), {"detector": detector, "model": source, "family": families[detector],
                                                 **extra})
    return heads


@torch.no_grad()
def calibrate_guard(g: GuardSettings, models: dict[str, nn.Module], heads: dict[str, tuple], calibration: Store,
                    device: torch.device, check_size: int = 0) -> tuple[GuardNet, dict]:
    """The guard of these fitted heads (`fit_heads`), its scales and threshold calibrated on the calibration split
    (never trained on) for an FPR measured on `check_size` clean images (the gate's; 0: the true FPR), and its
    report."""
    entries = [e for e in g.detectors if e in heads]
    if not entries:
        raise SanitizeError(f"the guard lists only {list(g.detectors)}, which need quarantined samples, and the quarantine "
                            "is empty: add probe@released to the guard's detectors (GuardSettings.detectors)")
    guard = GuardNet(models, [heads[e][:2] for e in entries]).to(device).eval()
    described = [dict(heads[e][2]) for e in entries]
    x_cal = to_tensor(calibration.x, device)
    raw = guard.detector_scores(x_cal)  # centre 0, scale 1 so far: the raw scores
    # Each detector on one scale by its upper tail, where the threshold lies: 0 at its calibration median, 1 at the
    # calibration rank of its share of the flags the threshold allows. A spread such as the MAD would let one
    # detector's heavy tail set the threshold for all; so would a fixed percentile when the calibration split is small
    # and the threshold lies at its maximum (docs/method.md, "The guard").
    shares = fpr_shares(entries, g.released_share, g.shares)
    centre, scale, threshold, calibration_fpr = calibrate_scores(raw, shares, g.fpr, g.confidence,
                                                                 check_size)
    guard.centre.copy_(centre)
    guard.scale.copy_(scale)
    guard.threshold.fill_(threshold)
    for d, c, s, share in zip(described, guard.centre.tolist(), guard.scale.tolist(), shares):
        d.update(centre=round(c, 6), scale=round(s, 6), fpr_share=round(share, 4))
    report = {"threshold": threshold, "target_fpr": g.fpr, "confidence": g.confidence,
              "check_size": check_size, "n_calibration": len(calibration),
              "calibration_fpr": calibration_fpr, "calibration_hash": store_hash(calibration),
              "detectors": described, "left_out": [e for e in g.detectors if e not in entries]}
    return guard, report


@torch.no_grad()
def build_guard(g: GuardSettings, models: dict[str, nn.Module], clean: Store, quarantined: Store,
                calibration: Store, device: torch.device, check_size: int = 0) -> tuple[GuardNet, dict]:
    """`fit_heads`, then `calibrate_guard`: the guard of `g.detectors` and its report."""
    heads = fit_heads(g, models, clean, quarantined, device)
    return calibrate_guard(g, models, heads, calibration, device, check_size)


def export_guard(guard: GuardNet, image_shape: tuple[int, int, int], path: Path, opset: int, meta: dict) -> None:
    import onnx

    h, w, c = image_shape
    guard = guard.cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(guard, (torch.rand(2, c, h, w),), str(path), input_names=["input"],
                          output_names=["score", "flag"], opset_version=opset, external_data=False,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=65536)}}, verbose=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    onnx.helper.set_model_props(proto, meta)
    onnx.save(proto, str(path))


def onnx_guard(path: Path, batch_size: int = 512):
    """uint8 N x H x W x C -> (score, flag), through onnxruntime, with the file's metadata."""
    sess = open_session(path, "guard")
    meta = dict(sess.get_modelmeta().custom_metadata_map)

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = [sess.run(["score", "flag"], {"input": x}) for x in input_batches(images, batch_size)]
        if not parts:
            return np.empty(0, np.float32), np.empty(0, bool)
        scores, flags = zip(*parts)
        return np.concatenate(scores), np.concatenate(flags)

    return run, meta


def guard_rates(params, test, checks: list, guard) -> dict:
    """The shipped guard (`guard`: `onnx_guard`'s (score, metadata) of models/guard.onnx) on the test split:
    false-positive rate on the clean images and, with a red team, true-positive rate on the triggered non-target ones
    that ingest wrote; checked by gate.min_guard_tpr."""
    from sanitizer.data import load_store

    score, meta = guard
    out = {"threshold": float(meta.get("threshold", "nan")), "fpr": round(float(np.mean(score(test.x)[1])), 4)}
    minimum = params.gate.min_guard_tpr
    if params.redteam.attack:
        triggered = load_store(paths.REDTEAM_TEST).x
        out["tpr"] = round(float(np.mean(score(triggered)[1])), 4) if len(triggered) else float("nan")
    if minimum is not None:
        if "tpr" not in out:
            raise SanitizeError("params.yaml: gate.min_guard_tpr is set but redteam.attack is null, so there are no "
                                "triggered images to measure the guard on; set gate.min_guard_tpr: null")
        checks.append({"name": "guard_tpr", "value": out["tpr"], "threshold": minimum, "rule": ">=",
                       "passed": out["tpr"] >= minimum})
    return out
