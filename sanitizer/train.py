"""The training loop shared by isolate and unlearn.

The whole store sits on the device as one tensor; batches are shuffled, cropped and flipped as
tensors (airbench style), so the GPU never waits for a data loader and there is no per-sample Python.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

from sanitizer.config import Params
from sanitizer.rules import DataRules


@dataclass(frozen=True)
class TrainSettings:
    """One training run's optimiser and augmentation: params.train, params.advanced.train and the data's rules."""
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    crop_padding: int
    flip: bool


def train_settings(params: Params, rules: DataRules) -> TrainSettings:
    adv = params.advanced.train
    return TrainSettings(params.train.batch_size, params.train.lr, adv.momentum, adv.weight_decay,
                         rules.crop_padding, rules.flip)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from sanitizer.errors import SanitizeError

        raise SanitizeError("params.yaml: device: cuda, but no CUDA device is available; use device: auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 N x H x W x C -> float32 N x C x H x W in [0, 1], on the device."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
    return flat.mean(axis=0).tolist(), np.maximum(flat.std(axis=0), 1e-3).tolist()


def augment(x: torch.Tensor, padding: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding) and optional horizontal flip of a whole batch."""
    if padding:
        n, _, h, w = x.shape
        padded = F.pad(x, (padding,) * 4)
        shifts = torch.randint(0, 2 * padding + 1, (n, 2), generator=gen, device=x.device)
        out = torch.empty_like(x)
        # One slice per distinct shift ((2p+1)^2 of them), not one per sample.
        for dy in range(2 * padding + 1):
            for dx in range(2 * padding + 1):
                sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
                out[sel] = padded[sel, :, dy:dy + h, dx:dx + w]
        x = out
    if flip:
        mask = torch.rand(x.shape[0], generator=gen, device=x.device) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def lga_loss(losses: torch.Tensor, gamma: float) -> torch.Tensor:
    """Local Gradient Ascent (ABL, Li et al. 2021, eq. 3): sign(L - gamma) * L on the batch mean.

    Once the batch loss falls under gamma the gradient flips, holding clean samples near gamma, while
    backdoor samples, learned much faster, still fall towards zero: that gap isolates them.
    """
    mean = losses.mean()
    return torch.sign(mean - gamma) * mean


def make_optimizer(model: nn.Module, lr: float, p: TrainSettings) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=p.momentum, weight_decay=p.weight_decay, nesterov=True)


def batches(n: int, batch_size: int, gen: torch.Generator, device) -> tuple[torch.Tensor, ...]:
    """One epoch's random order in ceil(n / batch_size) batches of nearly equal size (differing by at most one).

    Slicing by batch_size would leave a remainder batch, as small as one sample, whose BatchNorm statistics and
    gradient step are noise; it is the last update of every epoch (docs/method.md, "The training loop")."""
    order = torch.randperm(n, generator=gen, device=device)
    return torch.tensor_split(order, -(-n // batch_size)) if n else ()


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                loss_fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int, gen: torch.Generator,
                padding: int = 0, flip: bool = False, freeze_bn: bool = False) -> float:
    """One pass in random order; loss_fn maps per-sample CE losses to the loss to minimise.

    freeze_bn keeps BatchNorm on its running statistics (for ascent on a few suspects, whose batch
    statistics would otherwise overwrite those learned from the whole set).
    """
    model.train(not freeze_bn)
    total = 0.0
    for idx in batches(len(y), batch_size, gen, y.device):
        xb = augment(x[idx], padding, flip, gen)
        loss = loss_fn(F.cross_entropy(model(xb), y[idx], reduction="none"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
    return total / max(len(y), 1)


def unlikelihood(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-log(1 - p(y | x)) per sample (Welleck et al. 2020): pushes p(y) down without saturating.

    Plain ascent on CE stalls on a backdoor the model is sure of: its gradient is 1 - p(y), nearly 0;
    this one's is about p(y), so it acts hardest exactly where the model obeys the trigger (docs/method.md,
    "Unlearning").
    """
    log_p = F.log_softmax(logits, dim=1).gather(1, y[:, None])[:, 0]
    return -torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))


def joint_unlearn_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                        xq: torch.Tensor, yq: torch.Tensor, weight: float, batch_size: int,
                        gen: torch.Generator, suspects_per_batch: int,
                        anchors: torch.Tensor | None = None) -> tuple[float, float]:
    """One pass over the clean set; every batch also carries suspects, pushed away from their label.

    Clean rows and suspects share one forward pass in train mode, so BatchNorm sees one distribution:
    with the suspects in eval mode and clean rows in train mode, the clean loss cannot repair what the
    ascent does to the eval-mode path, and clean accuracy collapses. A batch carries all suspects, or a
    random `suspects_per_batch` of them when there are more: a large quarantine (adaptive isolation at
    10% poison) would otherwise outweigh the clean rows, and the push away from the implicated label
    would spill over onto its clean samples. `anchors` (indices into x of clean samples with the
    suspects' label) adds as many of them as suspects to each batch, with cross-entropy: the push away
    from the label must separate the suspects from that class's clean samples, not erase the class
    (docs/method.md, "Unlearning").
    """
    model.train()
    clean_total, suspect_total = 0.0, 0.0
    for idx in batches(len(y), batch_size, gen, y.device):
        if len(yq) > suspects_per_batch:
            pick = torch.randperm(len(yq), generator=gen, device=yq.device)[:suspects_per_batch]
            xs, ys = xq[pick], yq[pick]
        else:
            xs, ys = xq, yq
        if anchors is not None and len(anchors):
            pick = torch.randint(0, len(anchors), (len(ys),), generator=gen, device=anchors.device)
            idx = torch.cat([idx, anchors[pick]])
        logits = model(torch.cat([x[idx], xs]))
        clean_loss = F.cross_entropy(logits[:len(idx)], y[idx])
        suspect_loss = unlikelihood(logits[len(idx):], ys).mean()
        opt.zero_grad(set_to_none=True)
        (clean_loss + weight * suspect_loss).backward()
        opt.step()
        clean_total += float(clean_loss.detach()) * len(idx)
        suspect_total += float(suspect_loss.detach()) * len(idx)
    # BatchNorm's running statistics re-estimated on clean images alone (one pass, cumulative average): the
    # batches carried suspects, whose statistics (a blended pattern over the whole image) leaked into the
    # ones the released model normalises with (docs/method.md, "Unlearning").
    update_bn((x[i:i + 256] for i in range(0, len(x), 256)), model)
    return clean_total / max(len(y), 1), suspect_total / max(len(y), 1)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else \
        torch.empty(0, device=x.device)


@torch.no_grad()
def per_sample_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every sample in eval mode, no augmentation: the score ABL ranks by."""
    return F.cross_entropy(predict_logits(model, x), y, reduction="none")


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if len(y) == 0:
        return float("nan")
    return float((predict_logits(model, x).argmax(1) == y).float().mean())


class Progress:
    """Epoch lines with throughput on stderr; results go to files, never only here."""

    def __init__(self, stage: str, epochs: int, n_samples: int):
        self.stage, self.epochs, self.n, self.t0 = stage, epochs, n_samples, time.perf_counter()

    def epoch(self, epoch: int, **figures) -> None:
        elapsed = time.perf_counter() - self.t0
        rate = self.n * epoch / elapsed if elapsed > 0 else 0.0
        shown = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
        print(f"[{self.stage}] epoch {epoch}/{self.epochs} {shown} ({rate:,.0f} samples/s)", file=sys.stderr, flush=True)
