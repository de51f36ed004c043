"""Attack triggers: red-team simulation (ingest), attack success rate (gate) and the benchmark.

The defense stages never import this module: a defense that knows the attack proves nothing.
Every trigger is a pure function of uint8 images N x H x W x C -> triggered uint8 images, with the
literature's default strengths as params (`redteam` section). The patterns and warp fields belong to
the attack, not to the run: the same params give the same trigger in ingest and gate, whatever the seed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from sanitizer.config import RedteamParams

BLEND_PATTERN_SEED = 20171215
WANET_FIELD_SEED = 20210503


def badnets(x: np.ndarray, p: RedteamParams) -> np.ndarray:
    """A checkerboard patch in the bottom-right corner (Gu et al. 2017, BadNets)."""
    size = min(p.patch_size, x.shape[1], x.shape[2])
    checker = (np.indices((size, size)).sum(axis=0) % 2 == 0).astype(np.uint8) * 255
    out = x.copy()
    out[:, -size:, -size:, :] = checker[None, :, :, None]
    return out


def blend(x: np.ndarray, p: RedteamParams) -> np.ndarray:
    """A fixed uniform-noise image blended in with weight alpha (Chen et al. 2017, Blended)."""
    pattern = np.random.default_rng(BLEND_PATTERN_SEED).integers(0, 256, size=x.shape[1:], dtype=np.uint8)
    mixed = (1.0 - p.blend_alpha) * x.astype(np.float32) + p.blend_alpha * pattern.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def sig(x: np.ndarray, p: RedteamParams) -> np.ndarray:
    """A horizontal sinusoid delta * sin(2 pi j f / W) added to every row and channel (Barni et al. 2019)."""
    width = x.shape[2]
    wave = p.sig_delta * np.sin(2 * np.pi * np.arange(width) * p.sig_frequency / width)
    return np.clip(np.rint(x.astype(np.float32) + wave[None, None, :, None]), 0, 255).astype(np.uint8)


def wanet_grid(height: int, width: int, p: RedteamParams) -> torch.Tensor:
    """The fixed warping field of WaNet (Nguyen & Tran, ICLR 2021, sec. 3.2) as a sampling grid [H, W, 2].

    A k x k field of random offsets, normalised to mean magnitude 1, upsampled bicubically to the image
    and scaled by s / H: a smooth displacement of a fraction of a pixel, invisible to the eye.
    """
    k = max(2, min(p.wanet_k, height, width))
    gen = torch.Generator().manual_seed(WANET_FIELD_SEED)
    offsets = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
    offsets = offsets / offsets.abs().mean()
    field = F.interpolate(offsets, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)[0]
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    identity = torch.stack((xs, ys), dim=2)
    return (identity + p.wanet_s * field / height).clamp(-1, 1)


def _warp(x: np.ndarray, grid: torch.Tensor) -> np.ndarray:
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float()
    if grid.dim() == 3:
        grid = grid.expand(len(images), -1, -1, -1)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def wanet(x: np.ndarray, p: RedteamParams) -> np.ndarray:
    """Warp every image with the fixed WaNet field."""
    return _warp(x, wanet_grid(x.shape[1], x.shape[2], p)) if len(x) else x.copy()


def wanet_noise(x: np.ndarray, p: RedteamParams, seed: int) -> np.ndarray:
    """WaNet's noise mode: the field plus random per-image jitter, labels kept, so that the model
    learns the exact field and not any warp (Nguyen & Tran 2021, sec. 3.3)."""
    h, w = x.shape[1], x.shape[2]
    gen = torch.Generator().manual_seed(int(seed))
    jitter = (torch.rand(len(x), h, w, 2, generator=gen) * 2 - 1) / h
    return _warp(x, (wanet_grid(h, w, p)[None] + jitter).clamp(-1, 1)) if len(x) else x.copy()


TRIGGERS: dict[str, Callable[[np.ndarray, RedteamParams], np.ndarray]] = {
    "badnets": badnets, "blend": blend, "sig": sig, "wanet": wanet}
# Clean-label attacks poison samples of the target class and keep their labels.
CLEAN_LABEL = {"sig"}


def apply_trigger(x: np.ndarray, attack: str, p: RedteamParams) -> np.ndarray:
    return TRIGGERS[attack](x, p)


def choose_poison(labels: np.ndarray, p: RedteamParams, seed: int) -> np.ndarray:
    """Indices to poison: round(rate * N) samples, drawn from the non-target classes (all-to-one,
    dirty-label) or from the target class (clean-label), as many as there are."""
    clean_label = p.attack in CLEAN_LABEL
    candidates = np.flatnonzero((labels == p.target) if clean_label else (labels != p.target))
    n = min(int(round(p.poison_rate * len(labels))), len(candidates))
    rng = np.random.default_rng([seed, 0xBAD])
    return np.sort(rng.choice(candidates, size=n, replace=False))


def poison(x: np.ndarray, labels: np.ndarray, p: RedteamParams, seed: int):
    """Poisoned copies of (x, labels) and the truth: {index: role}, role "backdoor" (carries the
    trigger, labelled as the target) or "noise" (WaNet's noise mode: jittered warp, label kept)."""
    index = choose_poison(labels, p, seed)
    x, labels = x.copy(), labels.copy()
    roles = {int(i): "backdoor" for i in index}
    if len(index):
        x[index] = apply_trigger(x[index], p.attack, p)
        if p.attack not in CLEAN_LABEL:
            labels[index] = p.target
    if p.attack == "wanet" and len(index):
        rest = np.setdiff1d(np.arange(len(labels)), index)
        n_noise = min(int(round(p.wanet_cross_ratio * len(index))), len(rest))
        noise = np.sort(np.random.default_rng([seed, 0xC0055]).choice(rest, size=n_noise, replace=False))
        x[noise] = wanet_noise(x[noise], p, seed)
        roles.update({int(i): "noise" for i in noise})
    return x, labels, roles
