"""The training loop's augmentation."""

from __future__ import annotations

import torch

from stages.train import resample


def test_resample_translates_each_image_by_its_own_sub_pixel_offset():
    # A horizontal ramp of one unit per pixel: away from the border, a shift by dx pixels adds exactly dx.
    n, size = 64, 16
    ramp = torch.arange(size, dtype=torch.float32).expand(n, 1, size, size).clone()
    shifted = resample(ramp, 0.5, torch.Generator().manual_seed(0))
    interior = (shifted - ramp)[:, 0, 2:-2, 2:-2]
    dx = interior.mean(dim=(1, 2))
    assert torch.allclose(interior, dx[:, None, None].expand_as(interior), atol=1e-4)  # one offset per image
    assert dx.abs().max() <= 0.5 + 1e-4 and dx.abs().max() > 0.4  # up to max_shift, and near it somewhere
    assert dx.std() > 0.2  # drawn per image, not one for the batch
    again = resample(ramp, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(shifted, again)  # the generator decides: reproducible
