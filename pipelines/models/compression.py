"""Smaller classifiers from a trained one: structured pruning and knowledge distillation.

- :func:`prune_classifier` removes whole channels with Torch-Pruning's dependency graph
  (DepGraph): every conv, its GroupNorm, the next conv's input channels and the embedding
  are cut together, so the result is a smaller dense model (no masks), described by an
  ordinary classifier config and saved as safetensors like any other.
- :func:`student_classifier` builds a narrower student of the same layout, with BatchNorm,
  which the ONNX export folds into the convs (what static int8 runs fastest).
- :func:`distill` trains a student (or fine-tunes a pruned model) on a teacher's soft
  predictions over unlabeled images (:class:`~pipelines.models.systems.DistillationSystem`).

Which images the optimize stage distils on, and why the server may hold them, is in its
module docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.models.encoder import (
    Classifier,
    Encoder,
    build_classifier,
    classifier_config,
    encoder_config_for,
)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable and frozen parameters of ``model``."""
    return int(sum(p.numel() for p in model.parameters()))


def conv_widths(model: Classifier) -> list[int]:
    """Output channels of every conv of the classifier's encoder, in order."""
    return [m.out_channels for m in model.encoder.features if isinstance(m, nn.Conv2d)]


def has_cnn_encoder(model: Classifier) -> bool:
    """Whether the classifier's encoder is the learnt CNN (prunable), not a fixed
    ScatterNet."""
    return isinstance(model.encoder, Encoder)


def config_of(model: Classifier) -> dict[str, Any]:
    """The classifier config that describes ``model`` as its modules now are (after
    pruning changed their widths)."""
    encoder = dict(model.encoder.config)
    widths = conv_widths(model)
    stem_blocks = len(encoder.get("stem", []))
    encoder["stem"] = widths[:stem_blocks]
    encoder["channels"] = widths[stem_blocks:]
    encoder["embedding_dim"] = int(model.encoder.fc.out_features)
    return classifier_config(encoder, model.num_classes)


def prune_classifier(model: Classifier, ratio: float, image_shape: tuple[int, int]) -> Classifier:
    """A copy of ``model`` with ``ratio`` of the channels of every conv (and of the
    embedding) removed, the least important by the L2 norm of their coupled weights
    (Torch-Pruning ``GroupMagnitudeImportance``, one ratio per layer). The class head keeps
    its outputs. Returns a fresh :class:`Classifier` built from :func:`config_of`, holding the
    pruned weights, in eval mode."""
    import copy

    import torch_pruning as tp

    if not 0.0 < ratio < 1.0:
        raise ValueError(f"pruning ratio must be in (0, 1), got {ratio}")
    pruned = copy.deepcopy(model).eval().requires_grad_(True)  # frozen layers are skipped
    channels = int(pruned.encoder.config.get("in_channels", 1))
    example = torch.zeros(1, channels, *image_shape)
    pruner = tp.pruner.BasePruner(
        pruned,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[pruned.head],
    )
    pruner.step()
    rebuilt = build_classifier(config_of(pruned))
    rebuilt.load_state_dict(pruned.state_dict())
    return rebuilt.eval()


def student_classifier(
    teacher: Classifier, width: float, seed: int, image_shape: tuple[int, int] | None = None
) -> Classifier:
    """A randomly initialised (``seed``) student with the teacher's layout, every conv width
    and the embedding scaled by ``width`` (at least 8 each), and BatchNorm in place of
    GroupNorm. A ScatterNet teacher has no conv layout to copy: the student then scales the
    default CNN for ``image_shape``."""
    if not 0.0 < width <= 1.0:
        raise ValueError(f"student width must be in (0, 1], got {width}")
    if has_cnn_encoder(teacher):
        config = config_of(teacher)
    else:
        if image_shape is None:
            raise ValueError("a student of a ScatterNet teacher needs the image shape")
        channels = int(teacher.encoder.config.get("in_channels", 1))
        config = classifier_config(
            encoder_config_for(image_shape, channels), int(teacher.num_classes)
        )
    encoder = dict(config["encoder"])

    def scaled(values):
        return [max(8, int(round(v * width))) for v in values]

    encoder["stem"] = scaled(encoder["stem"])
    encoder["channels"] = scaled(encoder["channels"])
    encoder["embedding_dim"] = scaled([encoder["embedding_dim"]])[0]
    encoder["norm"] = "batch"
    torch.manual_seed(seed)
    return build_classifier(classifier_config(encoder, config["num_classes"]))


@dataclass(frozen=True)
class DistillSettings:
    """How :func:`distill` trains: epochs over the images, batch size, AdamW rate, the
    softening temperature, the soft loss's weight, and whether batches are random views."""

    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 3e-3
    temperature: float = 4.0
    soft_weight: float = 0.9
    augment: bool = True


def distill(
    student: Classifier,
    teacher: Classifier | None,
    images: np.ndarray,
    settings: DistillSettings,
    seed: int,
    labels: np.ndarray | None = None,
    device: str = "auto",
    on_epoch_end=None,
) -> list[float]:
    """Train ``student`` in place on ``teacher``'s predictions over ``images`` (with
    ``labels``, the hard part of the loss uses them instead of the teacher's predictions;
    with no teacher, it is plain supervised training). Returns the loss of every epoch;
    the student is left in eval mode on the CPU."""
    from pipelines.models.augment import FINE_TUNE_AUGMENT
    from pipelines.models.encoder import to_tensor
    from pipelines.models.systems import DistillationSystem, batch_loader, make_trainer

    tensors = [to_tensor(images)]
    if labels is not None:
        tensors.append(torch.as_tensor(np.asarray(labels), dtype=torch.long))
    system = DistillationSystem(
        student.train(),
        teacher,
        temperature=settings.temperature,
        soft_weight=settings.soft_weight,
        learning_rate=settings.learning_rate,
        augment_config=FINE_TUNE_AUGMENT if settings.augment else None,
        seed=seed,
        on_epoch_end=on_epoch_end,
    )
    loader = batch_loader(*tensors, batch_size=settings.batch_size, seed=seed)
    make_trainer(settings.epochs, device).fit(system, loader)
    student.cpu().eval()
    if teacher is not None:
        teacher.cpu()
    return system.history
