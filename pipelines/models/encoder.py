"""Models as plain ``nn.Module``s: the CNN encoder, the classifier, the SimCLR projection head.

Every model is rebuilt from a small JSON-able config dict, saved beside its weights by
:func:`pipelines.io.save_weights`, so loading needs no pickle:

- ``models/pretrain/encoder.{safetensors,json}``: an :class:`Encoder` (config from
  :func:`encoder_config`).
- ``models/federate/model.{safetensors,json}``: a :class:`Classifier` (config from
  :func:`classifier_config`, which nests the encoder's).

Inputs are ``(n, 1, h, w)`` float32 in ``[0, 1]`` for any small ``h, w``; :func:`to_tensor`
adds the channel axis to an ``(n, h, w)`` array. Normalisation is GroupNorm rather than
BatchNorm: federated clients hold non-IID shards, and batch statistics averaged across them
describe no client's data.
"""

from __future__ import annotations

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


def encoder_config(
    embedding_dim: int = 128,
    channels: tuple[int, ...] = DEFAULT_CHANNELS,
    groups: int = 8,
    pool_after: int = DEFAULT_POOL_AFTER,
) -> dict[str, Any]:
    """Config dict of an :class:`Encoder` (what ``encoder.json`` holds)."""
    return {
        "kind": "encoder",
        "embedding_dim": int(embedding_dim),
        "channels": [int(c) for c in channels],
        "groups": int(groups),
        "pool_after": int(pool_after),
    }


def classifier_config(encoder: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """Config dict of a :class:`Classifier` on top of an encoder config (``model.json``)."""
    return {"kind": "classifier", "encoder": dict(encoder), "num_classes": int(num_classes)}


def _conv_block(c_in: int, c_out: int, groups: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.GroupNorm(min(groups, c_out), c_out),
        nn.ReLU(inplace=True),
    ]


class Encoder(nn.Module):
    """Small CNN: 3x3 conv blocks (GroupNorm, ReLU), one 2x2 max-pool after block
    ``pool_after``, global average pooling, then a linear map to ``embedding_dim``.

    Works on any image size (the pooling is global); ``(n, 1, h, w)`` → ``(n, embedding_dim)``.
    """

    def __init__(
        self,
        embedding_dim: int = 128,
        channels: tuple[int, ...] = DEFAULT_CHANNELS,
        groups: int = 8,
        pool_after: int = DEFAULT_POOL_AFTER,
    ):
        super().__init__()
        self.config = encoder_config(embedding_dim, channels, groups, pool_after)
        layers: list[nn.Module] = []
        c_in = 1
        for index, c_out in enumerate(channels):
            layers += _conv_block(c_in, c_out, groups)
            if index == pool_after:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, embedding_dim)
        self.embedding_dim = embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(n, embedding_dim)`` of images ``(n, 1, h, w)``."""
        # mean over space = adaptive average pooling to 1x1, with a deterministic backward
        return self.fc(self.features(x).mean(dim=(2, 3)))


class Classifier(nn.Module):
    """An :class:`Encoder` followed by a linear head: images → logits ``(n, num_classes)``."""

    def __init__(self, encoder: Encoder, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embedding_dim, num_classes)
        self.num_classes = num_classes
        self.config = classifier_config(encoder.config, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of images ``(n, 1, h, w)``."""
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


def build_encoder(config: dict[str, Any]) -> Encoder:
    """A freshly initialised :class:`Encoder` from its config dict."""
    return Encoder(
        embedding_dim=int(config["embedding_dim"]),
        channels=tuple(int(c) for c in config.get("channels", DEFAULT_CHANNELS)),
        groups=int(config.get("groups", 8)),
        pool_after=int(config.get("pool_after", DEFAULT_POOL_AFTER)),
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


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """``(n, h, w)`` array → ``(n, 1, h, w)`` float32 tensor (shares memory when it can)."""
    array = np.ascontiguousarray(images, dtype=np.float32)
    if array.ndim != 3:
        raise ValueError(f"images must be (n, h, w), got shape {array.shape}")
    return torch.from_numpy(array).unsqueeze(1)
