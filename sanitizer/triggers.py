"""Attack triggers: red-team simulation (ingest), attack success rate (gate) and the benchmark.

The defense stages never import this module: a defense that knows the attack proves nothing.
Every trigger is a pure function of uint8 images N x H x W x C -> triggered uint8 images, with the
literature's default strengths as params (`redteam` section). The patterns and warp fields belong to
the attack, not to the run: the same params give the same trigger in ingest and gate, whatever the seed.

An attack plants one or more `Backdoor`s (a test-time trigger and the label it sends an image to); `poison` writes
the training samples, which for the adaptive and label-consistent attacks carry a weaker trigger than the test's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from sanitizer.config import RedteamParams

BLEND_PATTERN_SEED = 20171215
WANET_FIELD_SEED = 20210503
ADAPTIVE_SEED = 20230501  # Adap-Blend's pattern, Adap-Patch's patches
# Label-consistent: the attacker's surrogate model (trained on the clean training set) and its PGD.
LC_SURROGATE_EPOCHS = 6
LC_SURROGATE_WIDTH = 16
LC_PGD_STEPS = 10  # of epsilon / 4 (Turner et al. 2019 use PGD; Madry et al.'s step rule)
# Adap-Patch and Adap-Blend cover samples per poisoned sample when `adaptive_cover_ratio` is null (Qi et al. 2023's
# CIFAR-10 settings: cover rate 0.006 and 0.003 beside poison rate 0.003).
COVER_RATIO = {"adap_patch": 2.0, "adap_blend": 1.0}


def _blend(x: np.ndarray, pattern: np.ndarray, alpha) -> np.ndarray:
    """(1 - alpha) x + alpha pattern; alpha a scalar or an array broadcasting over N x H x W x C."""
    mixed = (1.0 - alpha) * x.astype(np.float32) + alpha * pattern.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def checker(size: int) -> np.ndarray:
    return (np.indices((size, size)).sum(axis=0) % 2 == 0).astype(np.uint8) * 255


def badnets(x: np.ndarray, p: RedteamParams) -> np.ndarray:
    """A checkerboard patch in the bottom-right corner (Gu et al. 2017, BadNets)."""
    size = min(p.patch_size, x.shape[1], x.shape[2])
    out = x.copy()
    out[:, -size:, -size:, :] = checker(size)[None, :, :, None]
    return out


def noise_pattern(shape: tuple, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def blend(x: np.ndarray, p: RedteamParams) -> np.ndarray:
    """A fixed uniform-noise image blended in with weight alpha (Chen et al. 2017, Blended)."""
    return _blend(x, noise_pattern(x.shape[1:], BLEND_PATTERN_SEED), p.blend_alpha)


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


def adap_blend_pieces(height: int, width: int, grid: int) -> np.ndarray:
    """[H, W]: each pixel's piece of the blended pattern cut into grid x grid pieces (Qi et al. 2023, Adap-Blend)."""
    rows = np.minimum(np.arange(height) * grid // height, grid - 1)
    cols = np.minimum(np.arange(width) * grid // width, grid - 1)
    return rows[:, None] * grid + cols[None, :]


def adap_blend(x: np.ndarray, p: RedteamParams) -> np.ndarray:
    """Adap-Blend's test trigger: its whole pattern at `blend_alpha` (training samples carry half the pieces at
    `adap_blend_alpha`, `adaptive_training_images`)."""
    return _blend(x, noise_pattern(x.shape[1:], ADAPTIVE_SEED), p.blend_alpha)


def adap_patches(shape: tuple, p: RedteamParams) -> list[tuple[np.ndarray, int, int]]:
    """Adap-Patch's `adap_patches` patches (Qi et al. 2023): random black-or-white pixels, a side of an eighth of the
    image (at least 2), each at its own fixed random place: [(pattern [s, s, C], top, left)]."""
    h, w, c = shape
    s = max(2, round(min(h, w) / 8))
    rng = np.random.default_rng([ADAPTIVE_SEED, 1])
    return [((rng.integers(0, 2, size=(s, s, c)) * 255).astype(np.uint8), int(rng.integers(0, h - s + 1)),
             int(rng.integers(0, w - s + 1))) for _ in range(p.adap_patches)]


def _stamp(x: np.ndarray, patch: tuple[np.ndarray, int, int], alpha: float) -> np.ndarray:
    pattern, r, c = patch
    s = pattern.shape[0]
    out = x.copy()
    out[:, r:r + s, c:c + s, :] = _blend(x[:, r:r + s, c:c + s, :], pattern[None], alpha)
    return out


def adap_patch(x: np.ndarray, p: RedteamParams) -> np.ndarray:
    """Adap-Patch's test trigger: every patch at full strength (training samples carry one at `adap_patch_alpha`)."""
    for patch in adap_patches(x.shape[1:], p):
        x = _stamp(x, patch, 1.0)
    return x.copy()


def adaptive_training_images(x: np.ndarray, p: RedteamParams, rng: np.random.Generator) -> np.ndarray:
    """The weak, partial triggers the adaptive attacks train with (Qi et al. 2023): each image gets a random
    (1 - adap_mask_rate) share of Adap-Blend's pieces at adap_blend_alpha, or one of Adap-Patch's patches at
    adap_patch_alpha; only the test input carries the whole trigger."""
    if p.attack == "adap_patch":
        patches = adap_patches(x.shape[1:], p)
        out = x.copy()
        which = rng.integers(0, len(patches), len(x))
        for k, patch in enumerate(patches):
            out[which == k] = _stamp(x[which == k], patch, p.adap_patch_alpha)
        return out
    piece, n_pieces = adap_blend_pieces(x.shape[1], x.shape[2], p.adap_grid), p.adap_grid ** 2
    keep = max(1, round(n_pieces * (1 - p.adap_mask_rate)))
    chosen = np.zeros((len(x), n_pieces), dtype=bool)  # each image's pieces
    for k in range(len(x)):
        chosen[k, rng.permutation(n_pieces)[:keep]] = True
    mask = chosen[:, piece][..., None]  # [N, H, W, 1]
    return _blend(x, noise_pattern(x.shape[1:], ADAPTIVE_SEED)[None], p.adap_blend_alpha * mask)


def bpp(x: np.ndarray, p: RedteamParams) -> np.ndarray:
    """BppAttack (Wang et al., CVPR 2022): every channel quantised to `bpp_levels` levels, with Floyd-Steinberg
    dithering when `bpp_dither` (no pattern to see: the trigger is the colour depth). Its poisoning part only: the
    paper's contrastive adversarial training runs inside the victim's training loop, which a data attacker does not
    control."""
    step = 255.0 / (p.bpp_levels - 1)
    img = x.astype(np.float32)
    if not p.bpp_dither:
        return np.clip(np.rint(np.rint(img / step) * step), 0, 255).astype(np.uint8)
    h, w = img.shape[1:3]
    for i in range(h):
        for j in range(w):
            old = img[:, i, j, :].copy()
            new = np.clip(np.rint(old / step) * step, 0, 255)
            img[:, i, j, :] = new
            err = old - new
            if j + 1 < w:
                img[:, i, j + 1, :] += err * (7 / 16)
            if i + 1 < h:
                if j > 0:
                    img[:, i + 1, j - 1, :] += err * (3 / 16)
                img[:, i + 1, j, :] += err * (5 / 16)
                if j + 1 < w:
                    img[:, i + 1, j + 1, :] += err * (1 / 16)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def corner_checkers(x: np.ndarray, p: RedteamParams, amplitude: float) -> np.ndarray:
    """Label-consistent's trigger (Turner et al. 2019): a checkerboard of side `patch_size` in all four corners,
    each pixel moved `amplitude` (0-255) towards white or black; 255 is the full pattern the test input carries."""
    s = min(p.patch_size, x.shape[1], x.shape[2])
    sign = (checker(s).astype(np.float32) / 127.5 - 1)[None, :, :, None]
    out = x.astype(np.float32)
    for rows in (slice(0, s), slice(-s, None)):
        for cols in (slice(0, s), slice(-s, None)):
            out[:, rows, cols, :] = out[:, rows, cols, :] + amplitude * sign
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def label_consistent(x: np.ndarray, p: RedteamParams) -> np.ndarray:
    return corner_checkers(x, p, 255.0)


def hard_to_learn(x: np.ndarray, labels: np.ndarray, pick: np.ndarray, p: RedteamParams, seed: int) -> np.ndarray:
    """Label-consistent's first step: PGD (L-inf `lc_epsilon`) away from their own label on a surrogate model the
    attacker trains on the clean training set, so that the model must lean on the trigger to fit them. Turner et al.
    perturb with adversarially trained models (or GAN interpolation); a normally trained surrogate is the weaker,
    cheaper variant."""
    from sanitizer.detectors import adversarial_examples
    from sanitizer.models import build_model, model_spec
    from sanitizer.train import batches, channel_stats, to_tensor

    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    n_classes = int(labels.max()) + 1
    with torch.random.fork_rng(devices=[]):  # the surrogate's initial weights; the caller's RNG is left as it was
        torch.manual_seed(seed)
        model = build_model(model_spec(x.shape[1:], n_classes, LC_SURROGATE_WIDTH, *channel_stats(x)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    xt, yt = to_tensor(x, cpu), torch.from_numpy(labels.astype(np.int64))
    model.train()
    for _ in range(LC_SURROGATE_EPOCHS):
        for idx in batches(len(yt), 128, gen, cpu):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    adv = adversarial_examples(model, xt[pick], yt[pick], LC_PGD_STEPS, p.lc_epsilon / 255.0)
    return (adv * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# The test-time trigger of each single-trigger attack.
TRIGGERS: dict[str, Callable[[np.ndarray, RedteamParams], np.ndarray]] = {
    "badnets": badnets, "blend": blend, "sig": sig, "wanet": wanet, "adap_blend": adap_blend,
    "adap_patch": adap_patch, "bpp": bpp, "label_consistent": label_consistent}
# Clean-label attacks poison samples of the target class and keep their labels.
CLEAN_LABEL = {"sig", "label_consistent"}
# Two triggers, two targets: badnets to `target`, blend to `second_target`.
MULTI_TARGET = (("badnets", badnets), ("blend", blend))


@dataclass(frozen=True)
class Backdoor:
    """One test-time trigger and where it sends an image: what an attack success rate measures."""
    name: str
    trigger: Callable[[np.ndarray], np.ndarray]
    target: int | None  # None: all-to-all, label y goes to (y + 1) mod K

    def goals(self, labels: np.ndarray, n_classes: int) -> np.ndarray:
        return (labels + 1) % n_classes if self.target is None else np.full(len(labels), self.target)

    def test_set(self, x: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(triggered images, the labels the backdoor sends them to, their indices) of the images not already
        labelled as their goal."""
        goal = self.goals(labels, n_classes)
        keep = np.flatnonzero(labels != goal)
        return self.trigger(x[keep]), goal[keep], keep


def backdoors(p: RedteamParams) -> list[Backdoor]:
    """The backdoors `p.attack` plants (none without an attack)."""
    if not p.attack:
        return []
    if p.attack == "all_to_all":
        return [Backdoor("all_to_all", lambda x: badnets(x, p), None)]
    if p.attack == "multi_target":
        return [Backdoor(f"multi_target:{name}", lambda x, fn=fn: fn(x, p), target)
                for (name, fn), target in zip(MULTI_TARGET, (p.target, p.second_target))]
    return [Backdoor(p.attack, lambda x: TRIGGERS[p.attack](x, p), p.target)]


class Touched(NamedTuple):
    """What the red team did to one training sample."""
    backdoor: str  # Backdoor.name
    target: int  # the label the backdoor sends its trigger to (all-to-all: this sample's)
    role: str  # backdoor: trigger and target label; noise: WaNet's jittered warp, label kept; cover: the adaptive
    # attacks' trigger with the true label kept


def _draw(rng: np.random.Generator, candidates: np.ndarray, n: int) -> np.ndarray:
    return np.sort(rng.choice(candidates, size=min(n, len(candidates)), replace=False))


def poison(x: np.ndarray, labels: np.ndarray, p: RedteamParams, seed: int):
    """Poisoned copies of (x, labels) and the truth {index: Touched}: round(poison_rate * N) samples (as many as
    there are) from the non-target classes (dirty-label: trigger and target label), from the target class (clean-label:
    trigger, label kept) or from every class (all-to-all); the adaptive attacks add cover samples, WaNet noise-mode
    samples; multi-target splits the share between its two backdoors."""
    x, y = x.copy(), labels.copy()
    n, everyone = int(round(p.poison_rate * len(labels))), np.arange(len(labels))
    rng = np.random.default_rng([seed, 0xBAD])
    truth: dict[int, Touched] = {}
    if n == 0:
        return x, y, truth
    if p.attack == "multi_target":
        taken = np.zeros(len(labels), bool)
        for k, (door, count) in enumerate(zip(backdoors(p), (n // 2, n - n // 2))):
            index = _draw(rng, np.flatnonzero((labels != door.target) & ~taken), count)
            taken[index] = True
            x[index], y[index] = door.trigger(x[index]), door.target
            truth.update({int(i): Touched(door.name, door.target, "backdoor") for i in index})
        return x, y, truth
    door = backdoors(p)[0]
    if p.attack == "all_to_all":
        index = _draw(rng, everyone, n)
    elif p.attack in CLEAN_LABEL:
        index = _draw(rng, np.flatnonzero(labels == p.target), n)
    else:
        index = _draw(rng, np.flatnonzero(labels != p.target), n)
    goal = door.goals(labels[index], int(labels.max()) + 1)
    if p.attack in COVER_RATIO:
        ratio = COVER_RATIO[p.attack] if p.adaptive_cover_ratio is None else p.adaptive_cover_ratio
        cover = _draw(rng, np.setdiff1d(everyone, index), int(round(ratio * len(index))))
        x[cover] = adaptive_training_images(x[cover], p, rng)
        truth.update({int(i): Touched(door.name, p.target, "cover") for i in cover})
        x[index] = adaptive_training_images(x[index], p, rng)
    elif p.attack == "label_consistent":
        x[index] = corner_checkers(hard_to_learn(x, labels, index, p, seed), p, p.lc_amplitude)
    else:
        x[index] = door.trigger(x[index])
    if p.attack not in CLEAN_LABEL:
        y[index] = goal
    truth.update({int(i): Touched(door.name, int(g), "backdoor") for i, g in zip(index, goal)})
    if p.attack == "wanet":
        noise = _draw(np.random.default_rng([seed, 0xC0055]), np.setdiff1d(everyone, index),
                      int(round(p.wanet_cross_ratio * len(index))))
        x[noise] = wanet_noise(x[noise], p, seed)
        truth.update({int(i): Touched(door.name, p.target, "noise") for i in noise})
    return x, y, truth
