"""A fixed scattering transform (ScatterNet) as a torch encoder: features that cost no privacy.

The 2-D scattering transform (Bruna & Mallat, 2013) cascades Morlet wavelet convolutions and
complex moduli, then averages with a Gaussian low-pass filter:

- order 0: ``x ⋆ φ_J``;
- order 1: ``|x ⋆ ψ_{j1,θ1}| ⋆ φ_J`` for scales ``j1 < J`` and ``L`` orientations;
- order 2: ``||x ⋆ ψ_{j1,θ1}| ⋆ ψ_{j2,θ2}| ⋆ φ_J`` for ``j1 < j2 < J``;

each subsampled by ``2^J``: ``1 + J·L + L²·J(J-1)/2`` channels (81 for ``J = 2, L = 8``) on a
``h/2^J × w/2^J`` grid, per input channel. The filters are kymatio's (its ``morlet_2d`` and
``gabor_2d``, with the scales, frequencies and slant of its filter bank) sampled in space and
cropped to about three envelope widths; the convolutions are plain zero-padded ``conv2d``s at
full resolution, so the module runs on CPU and CUDA and exports to ONNX like the CNN.
Nothing in it is learnt from data: training a linear model on its output under differential
privacy spends privacy on the linear model only (Tramèr & Boneh, 2021).

The features are then normalised per sample with a GroupNorm without affine parameters
(groups of :data:`NORM_GROUP_CHANNELS` channels), which keeps the transform data-independent.
The filters are persistent buffers: a saved model carries them, and loading one needs no
kymatio.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

SCATTERING_KIND = "scattering"
NORM_GROUP_CHANNELS = 3  # channels per normalisation group (27 groups for J = 2, L = 8)


def scattering_channels(scales: int, orientations: int) -> int:
    """Output channels per input channel: ``1 + J·L + L²·J(J-1)/2``."""
    return 1 + scales * orientations + orientations**2 * scales * (scales - 1) // 2


def scattering_config(
    image_shape: tuple[int, int], in_channels: int = 1, scales: int = 2, orientations: int = 8
) -> dict[str, Any]:
    """Config dict of a :class:`ScatteringEncoder` for images of ``image_shape``."""
    h, w = (int(v) for v in image_shape)
    step = 2**scales
    if min(h, w) < step:
        raise ValueError(f"scattering with J={scales} needs images of at least {step}x{step}")
    grid = _pooled_side(h, scales) * _pooled_side(w, scales)
    channels = scattering_channels(scales, orientations) * in_channels
    return {
        "kind": SCATTERING_KIND,
        "scales": int(scales),
        "orientations": int(orientations),
        "in_channels": int(in_channels),
        "image_shape": [h, w],
        "embedding_dim": channels * grid,
    }


def _kernel_side(sigma: float) -> int:
    return 2 * math.ceil(3 * sigma) + 1


def _pooled_side(side: int, scales: int) -> int:
    k = _kernel_side(0.8 * 2 ** (scales - 1))
    return (side + 2 * (k // 2) - k) // 2**scales + 1


def morlet_filters(scale: int, orientations: int) -> np.ndarray:
    """Real and imaginary parts of kymatio's Morlet wavelets at ``scale``, in space:
    ``(2·L, k, k)`` float32, the ``L`` real parts then the ``L`` imaginary parts."""
    from kymatio.scattering2d.filter_bank import morlet_2d

    sigma = 0.8 * 2**scale
    side = _kernel_side(sigma)
    filters = [
        morlet_2d(
            side,
            side,
            sigma,
            (int(orientations - orientations / 2 - 1) - theta) * np.pi / orientations,
            3.0 / 4.0 * np.pi / 2**scale,
            4.0 / orientations,
            offset=-(side // 2),
        )
        for theta in range(orientations)
    ]
    stacked = np.stack(filters)
    return np.concatenate([stacked.real, stacked.imag]).astype(np.float32)


def lowpass_filter(scales: int) -> np.ndarray:
    """kymatio's Gaussian low-pass ``φ_J`` in space, ``(k, k)`` float32 summing to 1."""
    from kymatio.scattering2d.filter_bank import gabor_2d

    sigma = 0.8 * 2 ** (scales - 1)
    side = _kernel_side(sigma)
    phi = gabor_2d(side, side, sigma, 0, 0, offset=-(side // 2)).real
    return (phi / phi.sum()).astype(np.float32)


class ScatteringEncoder(nn.Module):
    """Fixed scattering transform + per-sample GroupNorm: ``(n, c, h, w)`` →
    ``(n, embedding_dim)``. Same interface as :class:`~pipelines.models.encoder.Encoder`
    (``config``, ``embedding_dim``, ``in_channels``); it has no trainable parameter."""

    def __init__(
        self,
        image_shape: tuple[int, int],
        in_channels: int = 1,
        scales: int = 2,
        orientations: int = 8,
        *,
        with_filters: bool = True,
    ):
        super().__init__()
        self.config = scattering_config(image_shape, in_channels, scales, orientations)
        self.embedding_dim = int(self.config["embedding_dim"])
        self.in_channels = in_channels
        self.scales, self.orientations = scales, orientations
        for j in range(scales):
            side = _kernel_side(0.8 * 2**j)
            bank = (
                torch.from_numpy(morlet_filters(j, orientations))
                if with_filters
                else (torch.zeros(2 * orientations, side, side))
            )
            self.register_buffer(f"psi{j}", bank[:, None])
        phi_side = _kernel_side(0.8 * 2 ** (scales - 1))
        phi = (
            torch.from_numpy(lowpass_filter(scales))
            if with_filters
            else (torch.zeros(phi_side, phi_side))
        )
        self.register_buffer("phi", phi[None, None])
        channels = scattering_channels(scales, orientations) * in_channels
        self.norm_groups = max(1, channels // NORM_GROUP_CHANNELS)
        while channels % self.norm_groups:
            self.norm_groups -= 1

    def _modulus(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """``|x ⋆ ψ_j|`` for each channel of ``x``: ``channels·L`` channels. Each channel is
        filtered on its own (folded into the batch), so the weights keep a fixed shape and
        the module exports to ONNX."""
        bank = getattr(self, f"psi{j}")
        n, channels, h, w = x.shape
        out = F.conv2d(x.reshape(n * channels, 1, h, w), bank, padding=bank.shape[-1] // 2)
        out = out.reshape(n, channels, 2, self.orientations, h, w)
        return (out[:, :, 0].square() + out[:, :, 1].square() + 1e-12).sqrt().flatten(1, 2)

    def _lowpass(self, x: torch.Tensor) -> torch.Tensor:
        """``x ⋆ φ_J`` subsampled by ``2^J``, channel by channel."""
        n, channels, h, w = x.shape
        out = F.conv2d(
            x.reshape(n * channels, 1, h, w),
            self.phi,
            stride=2**self.scales,
            padding=self.phi.shape[-1] // 2,
        )
        return out.reshape(n, channels, *out.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised scattering coefficients ``(n, embedding_dim)`` of images."""
        n = x.shape[0]
        single = x.reshape(n * self.in_channels, 1, *x.shape[2:])
        orders = [self._lowpass(single)]
        first = [self._modulus(single, j) for j in range(self.scales)]
        orders += [self._lowpass(u) for u in first]
        for j2 in range(1, self.scales):
            below = torch.cat(first[:j2], dim=1)  # all |x ⋆ ψ_j1| with j1 < j2
            orders.append(self._lowpass(self._modulus(below, j2)))
        coefficients = torch.cat(orders, dim=1)
        coefficients = coefficients.reshape(n, -1, *coefficients.shape[2:])
        return F.group_norm(coefficients, self.norm_groups).flatten(1)


def build_scattering(config: dict[str, Any], *, with_filters: bool = True) -> ScatteringEncoder:
    """A :class:`ScatteringEncoder` from its config. ``with_filters=False`` leaves the filter
    buffers zero, for a state dict (which carries them) to fill without kymatio."""
    return ScatteringEncoder(
        tuple(config["image_shape"]),
        int(config.get("in_channels", 1)),
        int(config["scales"]),
        int(config["orientations"]),
        with_filters=with_filters,
    )
