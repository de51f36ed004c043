"""Residual-backdoor scan of a released model: trigger inversion after Neural Cleanse (Wang et al., "Neural Cleanse:
Identifying and Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019).

It needs no trigger and no poisoned data: for every class t it searches, on held-out clean images only, the smallest
mask m and pattern p such that (1 - m) * x + m * p sends clean images of the other classes to t. A class that a
backdoor targets has a shortcut, so its reversed mask is far smaller than the others'; the median-absolute-deviation
anomaly index of the mask areas (NC's sec. IV-A; here of their logarithms) flags it. All classes are optimised
together in one batched pass, each with its own penalty weight, adjusted as in NC: up while the reversed trigger
succeeds, down while it fails.
The figures and the choice of the threshold are in docs/method.md (Residual-backdoor scan).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sanitizer.errors import SanitizeError
from sanitizer.train import to_tensor

MAD_CONSISTENCY = 1.4826  # MAD * this estimates a normal standard deviation (NC's anomaly index)


@dataclass(frozen=True)
class ScanSettings:
    steps: int = 80  # Adam steps, all classes at once: with the batch, about a quarter of one clean training's passes
    batch: int = 24  # clean images a step, per class
    lr: float = 0.1  # Adam on the mask's and pattern's tanh logits, as NC
    success: float = 0.99  # NC's bar: a reversed trigger counts once it sends this share of a batch to its class
    init_cost: float = 1.0  # penalty weight on the mask's area share when a class's trigger first succeeds
    cost_step: float = 1.5  # NC's multiplier: weight * step after a window of success, / step ** 1.5 after failure
    window: int = 5  # steps between adjustments of the penalty weight


@dataclass
class ReversedTriggers:
    mask: np.ndarray  # [K, H, W] in [0, 1]: the smallest successful mask found for each class
    pattern: np.ndarray  # [K, C, H, W] in [0, 1]
    area: np.ndarray  # [K] share of the image the mask covers (its mean)
    succeeded: np.ndarray  # [K] bool: a trigger reached settings.success during the search


def _squash(logits: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(logits) + 1) / 2


def stamp(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """(1 - m) * x + m * p: images [N, C, H, W], mask [H, W] or [N, 1, H, W], pattern [C, H, W] or [N, C, H, W]."""
    return (1 - mask) * images + mask * pattern


def reverse_triggers(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, n_classes: int,
                     settings: ScanSettings, device: torch.device, seed: int) -> ReversedTriggers:
    """For each class, the smallest-area (mask, pattern) that reached `settings.success` on batches of clean images of
    the other classes; a class whose search never succeeded keeps its last (mask, pattern) and is marked so."""
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # gradients flow to the trigger only; restored below
        p.requires_grad_(False)
    x_all = to_tensor(images, device)
    y_all = torch.as_tensor(labels, device=device)
    _, c, h, w = x_all.shape
    gen = torch.Generator().manual_seed(int(seed))
    mask_logits = (torch.randn(n_classes, 1, h, w, generator=gen) * 0.1 - 1.0).to(device).requires_grad_(True)
    pattern_logits = (torch.randn(n_classes, c, h, w, generator=gen) * 0.1).to(device).requires_grad_(True)
    optimiser = torch.optim.Adam([mask_logits, pattern_logits], lr=settings.lr, betas=(0.5, 0.9))
    targets = torch.arange(n_classes, device=device).repeat_interleave(settings.batch)
    weight = torch.zeros(n_classes, device=device)
    best_area = torch.full((n_classes,), float("inf"), device=device)
    best_mask = torch.zeros(n_classes, 1, h, w, device=device)
    best_pattern = torch.zeros(n_classes, c, h, w, device=device)
    window_hits = torch.zeros(n_classes, device=device)
    for step in range(settings.steps):
        # Per class, a batch of clean images of the other classes (the trigger must move them, not its own).
        idx = torch.stack([_other_class_batch(y_all, t, settings.batch, gen) for t in range(n_classes)]).to(device)
        mask, pattern = _squash(mask_logits), _squash(pattern_logits)
        x = stamp(x_all[idx.flatten()], mask.repeat_interleave(settings.batch, 0),
                  pattern.repeat_interleave(settings.batch, 0))
        logits = model(x)
        ce = F.cross_entropy(logits, targets, reduction="none").view(n_classes, settings.batch).mean(1)
        area = mask.mean(dim=(1, 2, 3))
        loss = (ce + weight * area).sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            success = (logits.argmax(1) == targets).float().view(n_classes, settings.batch).mean(1)
            hit = success >= settings.success
            better = hit & (area < best_area)
            best_area = torch.where(better, area, best_area)
            best_mask[better], best_pattern[better] = mask[better], pattern[better]
            weight = torch.where(hit & (weight == 0), torch.full_like(weight, settings.init_cost), weight)
            window_hits += hit.float()
            if (step + 1) % settings.window == 0:
                up = window_hits == settings.window
                weight = torch.where(up, weight * settings.cost_step,
                                     torch.where(window_hits == 0, weight / settings.cost_step ** 1.5, weight))
                window_hits.zero_()
    for p in trainable:
        p.requires_grad_(True)
    with torch.no_grad():
        never = torch.isinf(best_area)
        last_mask, last_pattern = _squash(mask_logits), _squash(pattern_logits)
        best_mask[never], best_pattern[never] = last_mask[never], last_pattern[never]
        best_area = torch.where(never, last_mask.mean(dim=(1, 2, 3)), best_area)
    return ReversedTriggers(best_mask[:, 0].cpu().numpy(), best_pattern.cpu().numpy(), best_area.cpu().numpy(),
                            (~never).cpu().numpy())


def _other_class_batch(labels: torch.Tensor, t: int, size: int, gen: torch.Generator) -> torch.Tensor:
    others = torch.nonzero(labels.cpu() != t).flatten()
    return others[torch.randint(len(others), (size,), generator=gen)]


MIN_CLASSES = 3  # the anomaly index compares a class with the others' median: with fewer there is nothing to compare
MIN_LOG_MAD = 0.05  # floor of the robust spread of log-areas (5%): identical areas must not make a tiny gap infinite


def anomaly_index(area: np.ndarray) -> np.ndarray:
    """NC's anomaly index on the log of the mask areas, one-sided: how many robust standard deviations a class's
    log-area lies below the median (negative above it). Sizes spread multiplicatively, and a search stopped within a
    budget leaves the clean classes' masks at various sizes above their minimum: on the log scale a backdoor's mask,
    orders of magnitude smaller, stands out of that spread. Only small masks are suspicious."""
    log_area = np.log(np.maximum(area, 1e-8))
    median = np.median(log_area)
    mad = MAD_CONSISTENCY * np.median(np.abs(log_area - median))
    return (median - log_area) / max(mad, MIN_LOG_MAD)


def trigger_images(images: np.ndarray, mask: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """uint8 images N x H x W x C `stamp`ed with one reversed trigger (mask [H, W], pattern [C, H, W])."""
    x = stamp(to_tensor(images, torch.device("cpu")), torch.from_numpy(mask), torch.from_numpy(pattern))
    return x.mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def trigger_picture(mask: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """The reversed trigger as one uint8 H x W x C image: the pattern where the mask is, black elsewhere."""
    return np.clip(np.rint(mask[:, :, None] * pattern.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)


def scan_model(model: torch.nn.Module, optimise_on, measure_on, predict, threshold: float, device: torch.device,
               seed: int, settings: ScanSettings = ScanSettings()) -> tuple[dict, ReversedTriggers]:
    """Reverse a trigger for every class on `optimise_on` (a clean held-out Store), then measure each one's success
    with `predict` (uint8 images -> labels: the released ONNX model) on the clean images of `measure_on` of the other
    classes. A class is flagged when its anomaly index exceeds `threshold`. Returns the report (per class: mask area,
    anomaly index, success, flagged) and the triggers."""
    n_classes = len(optimise_on.class_names)
    present = np.unique(optimise_on.labels)
    if n_classes < MIN_CLASSES or len(present) < 2:
        raise SanitizeError(f"the residual-backdoor scan needs at least {MIN_CLASSES} classes and held-out images of "
                            f"two (the calibration split has {len(present)} of {n_classes}); set gate.max_scan_anomaly: "
                            "null or data.calibration_size higher")
    triggers = reverse_triggers(model, optimise_on.x, optimise_on.labels, n_classes, settings, device, seed)
    index = anomaly_index(triggers.area)
    classes = []
    for t in range(n_classes):
        others = measure_on.labels != t
        stamped = trigger_images(measure_on.x[others], triggers.mask[t], triggers.pattern[t])
        success = round(float(np.mean(predict(stamped) == t)), 4) if others.any() else None
        # A search that never reached the success bar found no trigger: its mask's size says nothing.
        flagged = bool(triggers.succeeded[t] and index[t] > threshold)
        classes.append({"class": t, "class_name": optimise_on.class_names[t],
                        "mask_area": round(float(triggers.area[t]), 5),
                        "anomaly_index": round(float(index[t]), 3), "success": success,
                        "converged": bool(triggers.succeeded[t]), "flagged": flagged})
    flagged = [c["class"] for c in classes if c["flagged"]]
    return {"method": "neural_cleanse", "threshold": threshold, "steps": settings.steps,
            "batch": settings.batch, "n_optimise": len(optimise_on), "n_measure": len(measure_on),
            "flagged": flagged, "classes": classes}, triggers
