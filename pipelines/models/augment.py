"""Batched SimCLR augmentations for images of any size, grayscale or RGB, in pure torch.

Each image of a batch draws its own random parameters from a ``torch.Generator`` (on the
images' device), so a seeded generator gives the same views every time. Every geometric
strength is relative to the image (a shift of an eighth of the side is one pixel at 8x8 and
3.5 at 28x28), so the same config suits every size. The views keep a small object
recognisable: a mild random affine (rotation, scale, translation), brightness / contrast
jitter, erasing a square patch, and gaussian noise. RGB images also get SimCLR's colour
augmentations, sized for objects whose colour carries no class: per-channel inversion and
gain jitter, a random channel order and random grayscale. Inverting a channel maps a
light-on-dark object to a dark-on-light one, so the two views of an image can differ in
both colour and contrast polarity.
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
    translate_fraction: float = 0.125  # of the image side
    brightness: float = 0.2
    contrast: float = 0.2
    erase_prob: float = 0.5
    erase_fraction: float = 0.25
    noise_std: float = 0.05
    colour_prob: float = 0.5  # RGB only: chance that a view gets the colour changes below
    color_jitter: float = 0.4  # RGB only: each channel's gain in 1 ± this
    channel_invert_prob: float = 0.5  # RGB only: chance of inverting each channel (x -> 1 - x)
    channel_shuffle_prob: float = 0.5  # RGB only: chance of a random channel order
    grayscale_prob: float = 0.2  # RGB only: chance of a grayscale view


# views for supervised fine-tuning: the same geometry and intensity jitter, without the
# colour changes, erased patches and noise that only contrastive learning needs (with
# labels, colour is no shortcut to learn away; colour changes cost 5 points on coloured digits)
FINE_TUNE_AUGMENT = AugmentConfig(erase_prob=0.0, noise_std=0.0, colour_prob=0.0)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


def random_affine(
    images: torch.Tensor,
    generator: torch.Generator,
    degrees: float,
    scale: tuple[float, float],
    translate_fraction: float,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Rotate by ±``degrees``, zoom by a factor in ``scale``, shift by ±``translate_fraction``
    of the image side.

    Bilinear resampling; pixels that come from outside the image are 0 (the background of
    grayscale digits) or, with ``padding_mode="border"``, the nearest edge pixel.
    """
    n, _, h, w = images.shape
    angle = torch.deg2rad(_uniform(n, -degrees, degrees, generator))
    zoom = _uniform(n, scale[0], scale[1], generator)
    # the same draws as a shift in pixels of translate_fraction * side, scaled to [-1, 1]
    shift_x = _uniform(n, -translate_fraction * w, translate_fraction * w, generator) * 2 / w
    shift_y = _uniform(n, -translate_fraction * h, translate_fraction * h, generator) * 2 / h
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
    return F.grid_sample(
        images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False
    )


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


def jitter_colour(
    images: torch.Tensor,
    generator: torch.Generator,
    gain: float,
    shuffle_prob: float,
    grayscale_prob: float,
    invert_prob: float = 0.0,
) -> torch.Tensor:
    """RGB views: invert each channel with probability ``invert_prob``, scale it by
    ``1 ± gain``, permute the channels with probability ``shuffle_prob`` and average them to
    gray with probability ``grayscale_prob``."""
    n, c = images.shape[:2]
    device = images.device
    invert = torch.rand(n, c, 1, 1, generator=generator, device=device) < invert_prob
    x = torch.where(invert, 1.0 - images, images)
    gains = 1 - gain + 2 * gain * torch.rand(n, c, generator=generator, device=device)
    x = x * gains.view(n, c, 1, 1).to(images.dtype)
    order = torch.rand(n, c, generator=generator, device=device).argsort(dim=1)
    shuffle = torch.rand(n, generator=generator, device=device) < shuffle_prob
    order = torch.where(shuffle[:, None], order, torch.arange(c, device=device))
    x = x.gather(1, order.view(n, c, 1, 1).expand_as(x))
    gray = torch.rand(n, generator=generator, device=device) < grayscale_prob
    return torch.where(gray.view(n, 1, 1, 1), x.mean(dim=1, keepdim=True).expand_as(x), x)


def add_noise(images: torch.Tensor, generator: torch.Generator, std: float) -> torch.Tensor:
    """Add gaussian noise of standard deviation ``std``."""
    noise = torch.randn(images.shape, generator=generator, device=images.device)
    return images + std * noise.to(images.dtype)


def augment(
    images: torch.Tensor, generator: torch.Generator, config: AugmentConfig = AugmentConfig()
) -> torch.Tensor:
    """One random view of each image ``(n, c, h, w)`` in ``[0, 1]``; the result is in ``[0, 1]``.

    ``c`` is 1 or 3; the colour augmentations apply to RGB only. ``generator`` must live on
    the images' device.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (n, 1 or 3, h, w), got shape {tuple(images.shape)}")
    colour = images.shape[1] == 3
    x = images
    if config.rotation_degrees or config.translate_fraction or config.scale != (1.0, 1.0):
        x = random_affine(
            x,
            generator,
            config.rotation_degrees,
            config.scale,
            config.translate_fraction,
            padding_mode="border" if colour else "zeros",
        )
    if colour and config.colour_prob:
        changed = jitter_colour(
            x,
            generator,
            config.color_jitter,
            config.channel_shuffle_prob,
            config.grayscale_prob,
            config.channel_invert_prob,
        )
        # views left in their own colours let the first steps learn from colour and shape
        # together; the changed ones then force shape alone
        keep = torch.rand(len(x), generator=generator, device=x.device) >= config.colour_prob
        x = torch.where(keep.view(-1, 1, 1, 1), x, changed)
    if config.brightness or config.contrast:
        x = jitter_intensity(x, generator, config.brightness, config.contrast)
    if config.erase_prob and config.erase_fraction:
        x = random_erase(x, generator, config.erase_prob, config.erase_fraction)
    if config.noise_std:
        x = add_noise(x, generator, config.noise_std)
    return x.clamp(0.0, 1.0)
