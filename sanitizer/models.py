"""Architectures. Every model takes float32 [N, C, H, W] pixels in [0, 1] and normalizes inside the
graph, so the exported ONNX file needs no preprocessing beyond `uint8 / 255`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from sanitizer.errors import SanitizeError


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Three conv stages (width, 2w, 4w) with pooling, global average pool, linear head.

    Sized for 8x8 digits and 32x32 CIFAR alike: pooling only happens while the map is >= 4 pixels.
    """

    def __init__(self, in_channels: int, n_classes: int, width: int, image_size: int,
                 mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        layers, c, size = [], in_channels, image_size
        for mult in (1, 2, 4):
            layers += [conv_block(c, width * mult), conv_block(width * mult, width * mult)]
            c = width * mult
            if size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features((x - self.mean) / self.std)

    def activations(self, x: torch.Tensor, block_statistics: int = 0):
        """In one pass: the spatially averaged output of each conv stage (before its pooling), [N, w],
        [N, 2w], [N, 4w], and last the penultimate feature (`embed`). The detectors read these. With
        `block_statistics` = k > 0, also the per-channel spatial mean and standard deviation of the last k
        conv blocks (six blocks of w, w, 2w, 2w, 4w, 4w channels), concatenated, as a second value (the
        guard's `probe` reads them)."""
        blocks = [i for i, layer in enumerate(self.features) if isinstance(layer, nn.Sequential)]
        with_stats = set(blocks[len(blocks) - block_statistics:]) if block_statistics else set()
        out, stats, x = [], [], (x - self.mean) / self.std
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in with_stats:
                stats += [x.mean(dim=(2, 3)), x.std(dim=(2, 3), correction=0)]
            if i in blocks[1::2]:  # a stage is two conv blocks
                out.append(x.mean(dim=(2, 3)))
        return ([*out, x], torch.cat(stats, dim=1)) if block_statistics else [*out, x]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def build_model(spec: dict) -> SmallCNN:
    return SmallCNN(spec["in_channels"], spec["n_classes"], spec["width"], spec["image_size"], spec["mean"], spec["std"])


def reinitialise(model: nn.Module) -> None:
    """Fresh weights (and BatchNorm statistics) in place, from torch's RNG; the normalisation buffers stay."""
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()


def model_spec(image_shape: tuple[int, int, int], n_classes: int, width: int, mean, std) -> dict:
    h, w, c = image_shape
    return {"in_channels": c, "n_classes": n_classes, "width": width, "image_size": min(h, w),
            "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def save_checkpoint(path: Path, model: SmallCNN, spec: dict, extra: dict) -> None:
    from sanitizer.fileio import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"spec": spec, "state_dict": model.state_dict(), **extra}, tmp)


def save_empty_checkpoint(path: Path, reason: str, run: str) -> None:
    """A declared model output of a step that did not run: it holds no weights, only why (and its run, sanitizer/runs.py)."""
    from sanitizer.fileio import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"spec": None, "state_dict": None, "empty": reason, "run": run}, tmp)


def load_checkpoint(path: Path, device: torch.device) -> tuple[SmallCNN, dict]:
    """weights_only=True: a checkpoint is data, and loading one must never run code."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        if ckpt.get("empty"):
            raise SanitizeError(f"{path}: holds no model ({ckpt['empty']}); re-run `dvc repro`")
        model = build_model(ckpt["spec"]).to(device)
        model.load_state_dict(ckpt["state_dict"])
    except SanitizeError:
        raise
    except FileNotFoundError:
        raise SanitizeError(f"{path}: not found; run the stage that writes it first (dvc repro)") from None
    except Exception as err:  # a corrupt or foreign file: many exception types, one meaning
        raise SanitizeError(f"{path}: not a valid checkpoint of this project ({type(err).__name__}: {err}); "
                            "re-run `dvc repro`") from None
    return model, ckpt
