"""The training loop's augmentation."""

from __future__ import annotations

import torch

from sanitizer.train import augment


def test_augment_crops_within_the_padding_and_flips_by_the_generator():
    n, size = 256, 8
    x = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(1))
    out = augment(x, 1, False, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (1,) * 4)
    # every output is the image shifted by at most one pixel (zero padding at the border)
    assert all(any(torch.equal(out[i], padded[i, :, dy:dy + size, dx:dx + size]) for dy in range(3) for dx in range(3))
               for i in range(n))
    assert torch.equal(out, augment(x, 1, False, torch.Generator().manual_seed(0)))  # the generator decides
    flipped = augment(x, 0, True, torch.Generator().manual_seed(0))
    mirrored = torch.tensor([torch.equal(f, i.flip(2)) for f, i in zip(flipped, x)])
    assert 0.3 < mirrored.float().mean() < 0.7 and all(torch.equal(f, i) for f, i, m in zip(flipped, x, mirrored)
                                                      if not m)
    assert torch.equal(augment(x, 0, False, torch.Generator()), x)
