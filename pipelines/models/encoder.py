"""Models as plain ``nn.Module``s: the CNN encoder, the classifier, the SimCLR projection head.

Every model is rebuilt from a small JSON-able config dict, saved beside its weights by
:func:`pipelines.io.save_weights`, so loading needs no pickle:

- ``models/pretrain/encoder.{safetensors,json}``: an :class:`Encoder` (config from
  :func:`encoder_config`, sized to the data by :func:`encoder_config_for`).
- ``models/federate/model.{safetensors,json}``: a :class:`Classifier` (config from
  :func:`classifier_config`, which nests the encoder's).

Inputs are ``(n, c, h, w)`` float32 in ``[0, 1]``, ``c`` being the config's
``in_channels`` (1 grayscale, 3 RGB); :func:`to_tensor` turns a numpy batch into one.
The encoder first halves the image with stride-2 conv blocks (the *stem*) until it is
about :data:`WORKING_SIDE` pixels across, then runs the same body at every image size: the
receptive field covers the image and the wide layers cost the same on 8x8 digits and on
224x224 photos. Normalisation is GroupNorm rather than BatchNorm: federated clients hold
non-IID shards, and batch statistics averaged across them describe no client's data.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.errors import DataError

DEFAULT_CHANNELS = (32, 64, 128)
# max-pool right after the first block: the wide blocks then run at a quarter of the pixels
# (half the pretraining time on 8x8 digits, no loss in accuracy)
DEFAULT_POOL_AFTER = 0
WORKING_SIDE = 8  # the stem halves an image until its shorter side is at most about this
STEM_WIDTHS = (16, 32)  # channels of the stem's blocks; later blocks keep the last width
# what a colour encoder's first layer sees: "contrast" (one channel, see colour_contrast) or
# "rgb" (the standardized channels, see standardize)
COLOUR_INPUTS = ("contrast", "rgb")
# normalisation after each conv: "group" (GroupNorm: federated clients hold non-IID shards)
# or "batch" (BatchNorm: models trained in one place, e.g. a distilled student; the ONNX
# export folds it into the conv, which static int8 then runs as one fused integer op)
NORMS = ("group", "batch")


def stem_for(image_shape: tuple[int, int], widths: tuple[int, ...] = STEM_WIDTHS) -> list[int]:
    """Channels of the stride-2 stem blocks an image of ``image_shape`` needs.

    One block per halving until the shorter side is at most ``WORKING_SIDE`` (rounding up
    the halvings from 1.5x on): none for 8x8, two for 28x28 (to 7x7) and 32x32 (to 8x8),
    five for 224x224 (to 7x7).
    """
    side = min(int(v) for v in image_shape)
    halvings = max(0, math.ceil(math.log2(side / WORKING_SIDE) - 0.5)) if side > 0 else 0
    return [widths[min(i, len(widths) - 1)] for i in range(halvings)]


def encoder_config(
    embedding_dim: int = 128,
    channels: tuple[int, ...] = DEFAULT_CHANNELS,
    groups: int = 8,
    pool_after: int = DEFAULT_POOL_AFTER,
    in_channels: int = 1,
    stem: tuple[int, ...] = (),
    standardize_input: bool = False,
    colour_input: str = "rgb",
    norm: str = "group",
) -> dict[str, Any]:
    """Config dict of an :class:`Encoder` (what ``encoder.json`` holds)."""
    if colour_input not in COLOUR_INPUTS:
        raise ValueError(f"colour_input must be one of {COLOUR_INPUTS}, got {colour_input!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return {
        "standardize_input": bool(standardize_input),
        "colour_input": colour_input,
        "kind": "encoder",
        "embedding_dim": int(embedding_dim),
        "channels": [int(c) for c in channels],
        "groups": int(groups),
        "pool_after": int(pool_after),
        "in_channels": int(in_channels),
        "stem": [int(c) for c in stem],
        "norm": norm,
    }


def encoder_config_for(
    image_shape: tuple[int, int],
    in_channels: int,
    embedding_dim: int = 128,
    colour_input: str = "contrast",
) -> dict[str, Any]:
    """The default encoder config for images of ``image_shape`` with ``in_channels``.

    Colour images are standardized per image and channel; with ``colour_input="contrast"``
    the first layer then sees only their colour contrast (:func:`colour_contrast`)."""
    return encoder_config(
        embedding_dim,
        in_channels=in_channels,
        stem=tuple(stem_for(image_shape)),
        standardize_input=in_channels > 1,
        colour_input=colour_input if in_channels > 1 else "rgb",
    )


def classifier_config(encoder: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """Config dict of a :class:`Classifier` on top of an encoder config (``model.json``)."""
    return {"kind": "classifier", "encoder": dict(encoder), "num_classes": int(num_classes)}


def _conv_block(
    c_in: int, c_out: int, groups: int, stride: int = 1, norm: str = "group"
) -> list[nn.Module]:
    if norm == "group":
        normalise: nn.Module = nn.GroupNorm(min(groups, c_out), c_out)
    else:
        normalise = nn.BatchNorm2d(c_out)
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        normalise,
        nn.ReLU(inplace=True),
    ]


def receptive_field(config: dict[str, Any]) -> int:
    """Side in input pixels of what one position of the encoder's last feature map sees."""
    field, jump = 1, 1
    for _ in config.get("stem", []):
        field, jump = field + 2 * jump, jump * 2  # 3x3 conv, stride 2
    for index in range(len(config["channels"])):
        field += 2 * jump  # 3x3 conv, stride 1
        if index == config["pool_after"]:
            field, jump = field + jump, jump * 2  # 2x2 max-pool
    return field


def standardize(x: torch.Tensor, eps: float = 5e-2) -> torch.Tensor:
    """Each image's channels shifted to mean 0 over space, then the image scaled to unit
    standard deviation (one scale for all its channels, so a channel with little contrast
    stays faint instead of having its noise blown up).

    The mean colour of an image (its background, for an object on a plain ground) then no
    longer reaches the first layers: colour, which the random-colour augmentations teach the
    encoder to ignore, stops being the easiest feature to learn."""
    centred = x - x.mean(dim=(2, 3), keepdim=True)
    std = centred.pow(2).mean(dim=(2, 3), keepdim=True).sqrt()
    return centred / (std + eps)


def colour_contrast(x: torch.Tensor, eps: float = 5e-2) -> torch.Tensor:
    """``(n, c, h, w)`` colour images → ``(n, 1, h, w)``: how far each pixel's colour is
    from the image's mean colour, averaged over the channels (each shifted and scaled by
    :func:`standardize`), then standardized per image.

    The map is the same whatever the order of the channels and whether the object is
    lighter or darker than its ground in each channel, and for an object of one colour on a
    ground of another nearly the same whatever the two colours: exactly what SimCLR's colour
    augmentations ask the encoder to ignore. Given the colour
    channels themselves, the encoder learns to tell images apart by colour and SimCLR stalls
    (``benchmarks/colour_ssl.py``)."""
    distance = standardize(x, eps).abs().mean(dim=1, keepdim=True)
    centred = distance - distance.mean(dim=(2, 3), keepdim=True)
    return centred / (centred.pow(2).mean(dim=(2, 3), keepdim=True).sqrt() + eps)


class Encoder(nn.Module):
    """Small CNN: a stem of stride-2 3x3 conv blocks (as many as the image size needs,
    see :func:`stem_for`), 3x3 conv blocks (GroupNorm or BatchNorm, ReLU) with one 2x2
    max-pool after block ``pool_after``, global average pooling, then a linear map to
    ``embedding_dim``.

    ``(n, in_channels, h, w)`` → ``(n, embedding_dim)`` for any ``h, w``. Colour input goes
    through :func:`colour_contrast` (``colour_input="contrast"``, one channel into the first
    layer) or :func:`standardize` (``standardize_input`` with ``colour_input="rgb"``).
    """

    def __init__(
        self,
        embedding_dim: int = 128,
        channels: tuple[int, ...] = DEFAULT_CHANNELS,
        groups: int = 8,
        pool_after: int = DEFAULT_POOL_AFTER,
        in_channels: int = 1,
        stem: tuple[int, ...] = (),
        standardize_input: bool = False,
        colour_input: str = "rgb",
        norm: str = "group",
    ):
        super().__init__()
        self.config = encoder_config(
            embedding_dim,
            channels,
            groups,
            pool_after,
            in_channels,
            stem,
            standardize_input,
            colour_input,
            norm,
        )
        self.standardize_input = standardize_input
        self.contrast_input = colour_input == "contrast" and in_channels > 1
        layers: list[nn.Module] = []
        c_in = 1 if self.contrast_input else in_channels
        for c_out in stem:
            layers += _conv_block(c_in, c_out, groups, stride=2, norm=norm)
            c_in = c_out
        for index, c_out in enumerate(channels):
            layers += _conv_block(c_in, c_out, groups, norm=norm)
            if index == pool_after:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, embedding_dim)
        self.embedding_dim = embedding_dim
        self.in_channels = in_channels

    def first_layer_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the first conv block sees of images ``(n, in_channels, h, w)``: the
        colour contrast map, the standardized channels, or the images as they are."""
        if x.shape[1] != self.in_channels:
            raise ValueError(f"the encoder takes {self.in_channels} channels, got {x.shape[1]}")
        if self.contrast_input:
            return colour_contrast(x)
        if self.standardize_input:
            return standardize(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(n, embedding_dim)`` of images ``(n, in_channels, h, w)``."""
        features = self.features(self.first_layer_input(x))
        # mean over space = adaptive average pooling to 1x1, with a deterministic backward
        return self.fc(features.mean(dim=(2, 3)))


class Classifier(nn.Module):
    """An :class:`Encoder` followed by a linear head: images → logits ``(n, num_classes)``."""

    def __init__(self, encoder: Encoder, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embedding_dim, num_classes)
        self.num_classes = num_classes
        self.config = classifier_config(encoder.config, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of images ``(n, in_channels, h, w)``."""
        return self.head(self.encoder(x))


class ProjectionHead(nn.Module):
    """SimCLR projection MLP (Linear, ReLU, Linear) from embeddings to the contrastive space."""

    def __init__(self, embedding_dim: int, projection_dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden = hidden_dim or embedding_dim
        self.net = nn.Sequential(
            nn.Linear(embedding_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, projection_dim),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Projections ``(n, projection_dim)``."""
        return self.net(h)


class ContrastiveModel(nn.Module):
    """Encoder plus SimCLR projection head in one module: what federated SimCLR averages.

    ``config`` is ``{"encoder": <encoder config>, "projection_dim": p}``."""

    def __init__(self, encoder: Encoder, projection_dim: int):
        super().__init__()
        self.encoder = encoder
        self.head = ProjectionHead(encoder.embedding_dim, projection_dim)
        self.config = {"encoder": encoder.config, "projection_dim": int(projection_dim)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Projections ``(n, projection_dim)`` of images."""
        return self.head(self.encoder(x))


def build_contrastive(config: dict[str, Any]) -> ContrastiveModel:
    """A :class:`ContrastiveModel` from its config (random weights)."""
    return ContrastiveModel(build_encoder(config["encoder"]), int(config["projection_dim"]))


def build_encoder(config: dict[str, Any]) -> Encoder:
    """A freshly initialised :class:`Encoder` from its config dict.

    A ``kind: scattering`` config gives a
    :class:`~pipelines.models.scattering.ScatteringEncoder` whose filter buffers are zero
    until a state dict (which carries them) is loaded: every caller loads one."""
    if config.get("kind") == "scattering":
        from pipelines.models.scattering import build_scattering

        return build_scattering(config, with_filters=False)
    return Encoder(
        embedding_dim=int(config["embedding_dim"]),
        channels=tuple(int(c) for c in config.get("channels", DEFAULT_CHANNELS)),
        groups=int(config.get("groups", 8)),
        pool_after=int(config.get("pool_after", DEFAULT_POOL_AFTER)),
        in_channels=int(config.get("in_channels", 1)),
        stem=tuple(int(c) for c in config.get("stem", ())),
        standardize_input=bool(config.get("standardize_input", False)),
        colour_input=str(config.get("colour_input", "rgb")),
        norm=str(config.get("norm", "group")),
    )


def build_classifier(config: dict[str, Any]) -> Classifier:
    """A freshly initialised :class:`Classifier` from its config dict."""
    return Classifier(build_encoder(config["encoder"]), int(config["num_classes"]))


def load_classifier(directory: str | Path, name: str = "model") -> Classifier:
    """The :class:`Classifier` saved in ``directory`` (``<name>.safetensors`` + json), eval mode."""
    from pipelines.io import load_weights

    state, config = load_weights(directory, name)
    if config.get("kind") != "classifier":
        raise DataError(str(Path(directory) / f"{name}.json"), "not a classifier config")
    model = build_classifier(config)
    model.load_state_dict(state)
    return model.eval()


def load_encoder(directory: str | Path) -> Encoder:
    """The encoder saved in ``directory``, eval mode.

    Reads ``encoder.safetensors`` (pretrain's output) when present, else the encoder part of
    the classifier in ``model.safetensors`` (federate's output).
    """
    from pipelines.io import load_weights

    directory = Path(directory)
    if (directory / "encoder.safetensors").is_file():
        state, config = load_weights(directory, "encoder")
        encoder = build_encoder(config)
        encoder.load_state_dict(state)
        return encoder.eval()
    return load_classifier(directory).encoder.eval()


def as_image_batch(images: np.ndarray) -> np.ndarray:
    """``(n, c, h, w)`` (or grayscale ``(n, h, w)``) images as a contiguous float32
    ``(n, c, h, w)`` array, the models' and the ONNX export's input layout."""
    array = np.ascontiguousarray(images, dtype=np.float32)
    if array.ndim == 3:
        return array[:, None]
    if array.ndim != 4:
        raise ValueError(f"images must be (n, c, h, w), got shape {array.shape}")
    return array


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """:func:`as_image_batch` as a torch tensor (shares memory when it can)."""
    return torch.from_numpy(as_image_batch(images))
