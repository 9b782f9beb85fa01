"""Losses: NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al.,
2020), and the knowledge-distillation loss of the optimize stage's students."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NTXentLoss(nn.Module):
    """NT-Xent over a batch of ``n`` positive pairs ``(z1[i], z2[i])``.

    With ``z = normalize([z1; z2])`` (``2n`` rows) and ``s_ij = z_i · z_j / temperature``, the
    loss of row ``i`` whose positive is ``p(i)`` is
    ``-log(exp(s_ip) / sum_{k != i} exp(s_ik))``; the result is the mean over all ``2n`` rows.
    The other ``2n - 2`` rows of the batch are the negatives.
    """

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Mean NT-Xent of projections ``z1, z2`` ``(n, d)`` (row ``i`` of each is a pair)."""
        if z1.shape != z2.shape:
            raise ValueError(f"views differ in shape: {tuple(z1.shape)} vs {tuple(z2.shape)}")
        n = z1.shape[0]
        z = torch.cat([z1, z2])
        if z.dtype != torch.float64:  # half precision is too coarse for exp(s / temperature)
            z = z.float()
        z = F.normalize(z, dim=1)
        logits = z @ z.T / self.temperature
        self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(logits, positives)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    temperature: float,
    soft_weight: float,
) -> torch.Tensor:
    """Knowledge distillation (Hinton et al., 2015): ``soft_weight`` times the KL divergence
    of the student's from the teacher's temperature-softened class probabilities (scaled by
    ``temperature**2``, so its gradients keep their size as the temperature changes), plus
    ``1 - soft_weight`` times the cross-entropy on hard labels.

    The hard labels are ``labels`` where given, else the teacher's predictions. Without a
    teacher the loss is the plain cross-entropy on ``labels``.
    """
    if teacher_logits is None:
        if labels is None:
            raise ValueError("distillation without a teacher needs labels")
        return F.cross_entropy(student_logits, labels)
    hard = labels if labels is not None else teacher_logits.argmax(1)
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)
    return soft_weight * soft + (1.0 - soft_weight) * F.cross_entropy(student_logits, hard)
