"""Batched SimCLR augmentations for small grayscale images (digits), in pure torch.

Each image of a batch draws its own random parameters from a ``torch.Generator`` (on the
images' device), so a seeded generator gives the same views every time. Colour and crop
augmentations of natural-image SimCLR make no sense for 8x8 digits; these keep the digit
recognisable: a mild random affine (rotation, scale, sub-pixel to one-pixel translation),
brightness / contrast jitter, erasing a small square patch, and gaussian noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Strength of each augmentation; zeros (and ``scale=(1, 1)``) switch one off."""

    rotation_degrees: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate_px: float = 1.0
    brightness: float = 0.2
    contrast: float = 0.2
    erase_prob: float = 0.5
    erase_fraction: float = 0.25
    noise_std: float = 0.05


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


def random_affine(
    images: torch.Tensor,
    generator: torch.Generator,
    degrees: float,
    scale: tuple[float, float],
    translate_px: float,
) -> torch.Tensor:
    """Rotate by ±``degrees``, zoom by a factor in ``scale``, shift by ±``translate_px`` pixels.

    Bilinear resampling; pixels that come from outside the image are 0 (the background).
    """
    n, _, h, w = images.shape
    angle = torch.deg2rad(_uniform(n, -degrees, degrees, generator))
    zoom = _uniform(n, scale[0], scale[1], generator)
    shift_x = _uniform(n, -translate_px, translate_px, generator) * 2 / w
    shift_y = _uniform(n, -translate_px, translate_px, generator) * 2 / h
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # output → input sampling positions in normalised coordinates, corrected for aspect ratio
    theta = torch.stack(
        [
            torch.stack([cos, -sin * h / w, shift_x], dim=1),
            torch.stack([sin * w / h, cos, shift_y], dim=1),
        ],
        dim=1,
    ).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def jitter_intensity(
    images: torch.Tensor, generator: torch.Generator, brightness: float, contrast: float
) -> torch.Tensor:
    """Scale each image's contrast around its mean by ``1 ± contrast``, then its brightness by
    ``1 ± brightness``."""
    n = images.shape[0]
    c = _uniform(n, 1 - contrast, 1 + contrast, generator).view(n, 1, 1, 1).to(images.dtype)
    b = _uniform(n, 1 - brightness, 1 + brightness, generator).view(n, 1, 1, 1).to(images.dtype)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return ((images - mean) * c + mean) * b


def random_erase(
    images: torch.Tensor, generator: torch.Generator, prob: float, fraction: float
) -> torch.Tensor:
    """With probability ``prob`` per image, set a square patch (side ``fraction`` of the
    image side, at least one pixel) at a random place to 0."""
    n, _, h, w = images.shape
    size_h, size_w = max(1, round(fraction * h)), max(1, round(fraction * w))
    device = images.device
    apply = torch.rand(n, generator=generator, device=device) < prob
    top = (torch.rand(n, generator=generator, device=device) * (h - size_h + 1)).long()
    left = (torch.rand(n, generator=generator, device=device) * (w - size_w + 1)).long()
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size_h)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size_w)
    mask = in_rows[:, None, :, None] & in_cols[:, None, None, :] & apply[:, None, None, None]
    return images.masked_fill(mask, 0.0)


def add_noise(images: torch.Tensor, generator: torch.Generator, std: float) -> torch.Tensor:
    """Add gaussian noise of standard deviation ``std``."""
    noise = torch.randn(images.shape, generator=generator, device=images.device)
    return images + std * noise.to(images.dtype)


def augment(
    images: torch.Tensor, generator: torch.Generator, config: AugmentConfig = AugmentConfig()
) -> torch.Tensor:
    """One random view of each image ``(n, 1, h, w)`` in ``[0, 1]``; the result is in ``[0, 1]``.

    ``generator`` must live on the images' device.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (n, 1, h, w), got shape {tuple(images.shape)}")
    x = images
    if config.rotation_degrees or config.translate_px or config.scale != (1.0, 1.0):
        x = random_affine(x, generator, config.rotation_degrees, config.scale, config.translate_px)
    if config.brightness or config.contrast:
        x = jitter_intensity(x, generator, config.brightness, config.contrast)
    if config.erase_prob and config.erase_fraction:
        x = random_erase(x, generator, config.erase_prob, config.erase_fraction)
    if config.noise_std:
        x = add_noise(x, generator, config.noise_std)
    return x.clamp(0.0, 1.0)
