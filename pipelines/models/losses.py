"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al., 2020)."""

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
