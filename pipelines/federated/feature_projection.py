"""Centre and project the fixed features on server-held rows before record-level DP.

Under ``federate.dp.unit: record`` each client trains a linear head on fixed features with
DP-SGD: every clipped gradient gets the same Gaussian noise on every coordinate, so the
fewer and better-placed the coordinates, the more of the budget goes to the signal. The
server fits the map on features of rows it holds itself (val), never on a client's:

- **centre**: subtract the mean feature, so a clipped gradient carries what tells the
  classes apart rather than the features' common offset;
- **project** (``federate.dp.feature_components`` = k > 0): onto the top-k principal
  directions of the centred server features.

The map is public (it depends on no client row), costs the clients no privacy, and goes to
every client with the run. The head trained on projected features folds back into a plain
linear head on the encoder's features (:meth:`FeatureProjection.fold`), so the released
classifier and its ONNX export keep their shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipelines.errors import ConfigError

MEAN, BASIS = "feature-projection.mean", "feature-projection.basis"  # message array names


@dataclass(frozen=True)
class FeatureProjection:
    """``x ↦ (x − mean) @ basis`` (float64); ``basis`` None keeps every coordinate."""

    mean: torch.Tensor
    basis: torch.Tensor | None

    @property
    def dim(self) -> int:
        """Coordinates after the map."""
        return int(self.mean.shape[0] if self.basis is None else self.basis.shape[1])

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """Features ``(n, d)`` → ``(n, dim)``."""
        centred = features.to(torch.float64) - self.mean
        return centred if self.basis is None else centred @ self.basis

    def fold(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head ``(weight (c, dim), bias (c,))`` on mapped features as a head on the
        original features: ``W Bᵀ`` and ``b − W Bᵀ mean``."""
        full = weight if self.basis is None else weight @ self.basis.T
        return full, bias - full @ self.mean

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The map as named float64 arrays, for a Flower message."""
        arrays = {MEAN: self.mean.numpy()}
        if self.basis is not None:
            arrays[BASIS] = self.basis.numpy()
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> FeatureProjection:
        """The map :meth:`to_arrays` wrote (popped from ``arrays``)."""
        mean = torch.from_numpy(np.array(arrays.pop(MEAN), dtype=np.float64))
        basis = arrays.pop(BASIS, None)
        return cls(mean, None if basis is None else torch.from_numpy(np.array(basis, np.float64)))


def fit_feature_projection(server_features: torch.Tensor, components: int) -> FeatureProjection:
    """The centring (and with ``components`` > 0 the top principal directions) of features
    of server-held rows ``(n, d)``. Raises :class:`ConfigError` when the rows cannot give
    ``components`` directions."""
    features = server_features.to(torch.float64)
    rows, dim = features.shape
    if rows == 0:
        raise ConfigError("federate.dp: the server holds no row (val) to centre features on")
    mean = features.mean(0)
    if components == 0:
        return FeatureProjection(mean, None)
    if components > min(rows, dim):
        raise ConfigError(
            f"federate.dp.feature_components {components}: the server's {rows} val rows of "
            f"{dim} features give at most {min(rows, dim)} directions"
        )
    _, _, right = torch.linalg.svd(features - mean, full_matrices=False)
    basis = right[:components].T
    # each direction's sign fixed (its largest entry positive): the same map in any process
    signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    return FeatureProjection(mean, (basis * signs).contiguous())
