"""SimCLR augmentations: shapes, range, seeded determinism, and that they change images."""

from __future__ import annotations

import pytest
import torch

from pipelines.models.augment import (
    AugmentConfig,
    augment,
    jitter_intensity,
    random_affine,
    random_erase,
)

OFF = AugmentConfig(
    rotation_degrees=0.0,
    scale=(1.0, 1.0),
    translate_fraction=0.0,
    brightness=0.0,
    contrast=0.0,
    erase_prob=0.0,
    noise_std=0.0,
    colour_prob=0.0,
)


def images(n: int = 16, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(8, 8), (12, 9), (28, 28)])
def test_shape_dtype_and_range(shape: tuple[int, int]) -> None:
    x = images(5, *shape)
    out = augment(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_same_seed_same_views_other_seed_other_views() -> None:
    x = images()
    a = augment(x, torch.Generator().manual_seed(7))
    b = augment(x, torch.Generator().manual_seed(7))
    c = augment(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_changes_every_image_and_two_views_differ() -> None:
    x = images()
    generator = torch.Generator().manual_seed(3)
    first, second = augment(x, generator), augment(x, generator)
    per_image_change = (first - x).abs().flatten(1).max(1).values
    assert (per_image_change > 1e-3).all()
    assert not torch.allclose(first, second)


def test_everything_off_is_identity() -> None:
    x = images()
    assert torch.equal(augment(x, torch.Generator().manual_seed(0), OFF), x)


def test_affine_with_identity_parameters_keeps_the_image() -> None:
    x = images(4, 8, 6)
    out = random_affine(x, torch.Generator().manual_seed(0), 0.0, (1.0, 1.0), 0.0)
    torch.testing.assert_close(out, x)


def test_affine_keeps_a_centred_blob_centred() -> None:
    x = torch.zeros(32, 1, 9, 9)
    x[:, :, 3:6, 3:6] = 1.0
    out = random_affine(x, torch.Generator().manual_seed(0), 15.0, (0.9, 1.1), 0.0)
    # no translation: the mass stays around the centre pixel
    rows = torch.arange(9.0).view(1, 1, 9, 1)
    centre = (out * rows).sum((1, 2, 3)) / out.sum((1, 2, 3))
    torch.testing.assert_close(centre, torch.full((32,), 4.0), atol=0.05, rtol=0)


def test_erase_zeroes_one_square_patch() -> None:
    x = torch.ones(10, 1, 8, 8)
    out = random_erase(x, torch.Generator().manual_seed(0), prob=1.0, fraction=0.25)
    assert ((out == 0).sum((1, 2, 3)) == 4).all()  # a 2x2 patch in every image
    untouched = random_erase(x, torch.Generator().manual_seed(0), prob=0.0, fraction=0.25)
    assert torch.equal(untouched, x)


def test_intensity_jitter_off_is_identity_and_on_changes_contrast() -> None:
    x = images()
    generator = torch.Generator().manual_seed(0)
    torch.testing.assert_close(jitter_intensity(x, generator, 0.0, 0.0), x)
    jittered = jitter_intensity(x, generator, 0.0, 0.5)
    torch.testing.assert_close(jittered.mean((1, 2, 3)), x.mean((1, 2, 3)))
    assert not torch.allclose(jittered.std((1, 2, 3)), x.std((1, 2, 3)))


def test_rejects_images_without_channel_axis() -> None:
    with pytest.raises(ValueError):
        augment(torch.rand(4, 8, 8), torch.Generator())
