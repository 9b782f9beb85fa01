"""The encoder and the augmentations at 8x8, 28x28 and 32x32x3: shapes, stem, receptive field."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipelines.models.augment import AugmentConfig, augment
from pipelines.models.encoder import (
    build_classifier,
    build_encoder,
    classifier_config,
    colour_contrast,
    encoder_config_for,
    receptive_field,
    stem_for,
)
from tests.code.test_augment import OFF

SIZES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("c, h, w", SIZES)
def test_encoder_and_classifier_shapes(c: int, h: int, w: int) -> None:
    config = encoder_config_for((h, w), c, embedding_dim=16)
    encoder = build_encoder(config)
    x = torch.rand(4, c, h, w)
    assert encoder(x).shape == (4, 16)
    model = build_classifier(classifier_config(config, 10))
    assert model(x).shape == (4, 10)
    with pytest.raises((RuntimeError, ValueError), match="channels"):
        encoder(torch.rand(4, 4 - c if c == 3 else 3, h, w))  # wrong channel count


@pytest.mark.parametrize(
    "side, halvings", [(8, 0), (11, 0), (12, 1), (16, 1), (28, 2), (32, 2), (64, 3), (224, 5)]
)
def test_stem_brings_every_size_to_about_eight_pixels(side: int, halvings: int) -> None:
    assert len(stem_for((side, side))) == halvings
    assert 4 <= side / 2**halvings <= 11


def last_feature_map_reach(c: int, h: int, w: int) -> torch.Tensor:
    """Which input pixels the centre position of the last feature map depends on."""
    torch.manual_seed(0)
    encoder = build_encoder(encoder_config_for((h, w), c)).eval()
    x = torch.rand(1, c, h, w, requires_grad=True)
    features = encoder.features(encoder.first_layer_input(x))
    features[0, :, features.shape[2] // 2, features.shape[3] // 2].sum().backward()
    return x.grad.abs().sum(dim=(0, 1)) > 0


@pytest.mark.parametrize("c, h, w", SIZES)
def test_receptive_field_covers_the_image(c: int, h: int, w: int) -> None:
    config = encoder_config_for((h, w), c)
    assert receptive_field(config) >= max(h, w)
    reach = last_feature_map_reach(c, h, w)
    # one position of the last map sees every corner of the image, not a patch
    assert reach[0, 0] and reach[0, -1] and reach[-1, 0] and reach[-1, -1]


def test_the_old_encoder_would_not_cover_28x28() -> None:
    # without the stem (the encoder of 8x8 digits), one position sees 12 of 28 pixels
    assert receptive_field(encoder_config_for((8, 8), 1)) < 28


def test_wide_layers_cost_the_same_at_28x28_as_at_8x8() -> None:
    def body_input_side(side: int) -> int:
        encoder = build_encoder(encoder_config_for((side, side), 1))
        stem_layers = 3 * len(encoder.config["stem"])
        return encoder.features[:stem_layers](torch.zeros(1, 1, side, side)).shape[-1]

    assert body_input_side(8) == 8
    assert body_input_side(28) == 7
    assert body_input_side(224) == 7


@pytest.mark.parametrize("c, h, w", SIZES)
def test_augment_shapes_and_range_at_every_size(c: int, h: int, w: int) -> None:
    x = torch.rand(6, c, h, w, generator=torch.Generator().manual_seed(0))
    out = augment(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and 0.0 <= out.min() and out.max() <= 1.0
    assert not torch.allclose(out, x)


def only_shift() -> AugmentConfig:
    return replace(OFF, translate_fraction=0.125)


def mean_column(images: torch.Tensor) -> torch.Tensor:
    """Centre of mass along the width of each image."""
    cols = torch.arange(images.shape[-1], dtype=torch.float32)
    mass = images.sum(dim=(1, 2))
    return (mass * cols).sum(1) / mass.sum(1)


def test_translation_is_relative_to_the_image_side() -> None:
    shifts = {}
    for side in (8, 32):
        x = torch.zeros(200, 1, side, side)
        x[:, :, side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 1.0
        out = augment(x, torch.Generator().manual_seed(5), only_shift())
        shifts[side] = (mean_column(out) - mean_column(x)).abs().max().item()
    # the same draws move a 4x larger image by 4x as many pixels
    assert shifts[32] == pytest.approx(4 * shifts[8], rel=0.05)
    assert 0.5 < shifts[8] <= 1.0 + 1e-4


def test_colour_augmentations_change_colour_only_for_rgb() -> None:
    colour = replace(OFF, colour_prob=AugmentConfig().colour_prob)
    rgb = torch.zeros(64, 3, 8, 8)
    rgb[:, 0] = 0.8  # red images
    out = augment(rgb, torch.Generator().manual_seed(2), colour)
    red_share = out[:, 0].mean(dim=(1, 2)) / out.mean(dim=(1, 2, 3)).clamp_min(1e-6) / 3
    assert (red_share < 0.5).any()  # some views moved the colour to another channel / gray
    gray = torch.full((8, 1, 8, 8), 0.5)
    assert torch.equal(augment(gray, torch.Generator().manual_seed(2), colour), gray)


def object_on_ground(fg: list[float], bg: list[float]) -> torch.Tensor:
    """One 3x16x16 image: a bar of colour ``fg`` on a ground of colour ``bg``."""
    image = torch.tensor(bg).view(3, 1, 1).expand(3, 16, 16).clone()
    image[:, 4:12, 6:10] = torch.tensor(fg).view(3, 1, 1)
    return image


def test_colour_contrast_ignores_hue_channel_order_and_polarity() -> None:
    base = object_on_ground([0.9, 0.2, 0.1], [0.1, 0.3, 0.8])
    views = torch.stack(
        [
            base,
            base[[2, 0, 1]],  # channels in another order
            1.0 - base,  # every channel inverted: dark on light
            torch.cat([base[:1], 1.0 - base[1:]]),  # some channels inverted
            object_on_ground([0.2, 0.7, 0.3], [0.6, 0.6, 0.2]),  # other colours altogether
        ]
    )
    maps = colour_contrast(views)
    assert maps.shape == (5, 1, 16, 16)
    for other in maps[1:4]:
        torch.testing.assert_close(other, maps[0], atol=1e-5, rtol=0)
    # other colours: the same map up to the small epsilon of the standardization
    torch.testing.assert_close(maps[4], maps[0], atol=0.1, rtol=0.05)
    # the shape is still there: the bar stands out from its ground
    assert maps[0, 0, 8, 8] > 1.0 and maps[0, 0, 0, 0] < 0.0


def test_colour_input_rgb_keeps_the_channels() -> None:
    contrast = build_encoder(encoder_config_for((16, 16), 3))
    rgb = build_encoder(encoder_config_for((16, 16), 3, colour_input="rgb"))
    assert contrast.config["colour_input"] == "contrast" and rgb.config["colour_input"] == "rgb"
    assert contrast.features[0].in_channels == 1 and rgb.features[0].in_channels == 3
    # grayscale has no colour to drop
    assert build_encoder(encoder_config_for((16, 16), 1)).config["colour_input"] == "rgb"
    # a config written before colour_input existed builds the rgb encoder it was trained as
    old = {k: v for k, v in rgb.config.items() if k != "colour_input"}
    assert build_encoder(old).features[0].in_channels == 3
