"""The server's public feature map under record-level DP: centring, principal directions, and
a head on mapped features folded back onto the encoder's features."""

from __future__ import annotations

import pytest
import torch

from pipelines.errors import ConfigError
from pipelines.federated.feature_projection import FeatureProjection, fit_feature_projection


def features(rows: int = 50, dim: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    scales = torch.linspace(3.0, 0.1, dim, dtype=torch.float64)
    return 5.0 + torch.randn(rows, dim, generator=generator, dtype=torch.float64) * scales


@pytest.mark.parametrize("components", [0, 4])
def test_a_head_on_mapped_features_folds_into_the_same_head_on_the_raw_ones(components):
    raw = features()
    projection = fit_feature_projection(raw, components)
    mapped = projection.apply(raw)
    assert mapped.shape == (50, components or 12)
    assert mapped.mean(0).abs().max() < 1e-9  # centred on the server's rows
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(3, projection.dim, generator=generator, dtype=torch.float64)
    bias = torch.randn(3, generator=generator, dtype=torch.float64)
    full_weight, full_bias = projection.fold(weight, bias)
    assert full_weight.shape == (3, 12)
    torch.testing.assert_close(raw @ full_weight.T + full_bias, mapped @ weight.T + bias)


def test_the_directions_are_orthonormal_ordered_by_variance_and_signed_the_same_way():
    raw = features()
    projection = fit_feature_projection(raw, 4)
    basis = projection.basis
    torch.testing.assert_close(basis.T @ basis, torch.eye(4, dtype=torch.float64))
    variances = projection.apply(raw).var(0)
    assert torch.all(variances[:-1] >= variances[1:])
    flipped = fit_feature_projection(raw[torch.randperm(50)], 4)  # same rows, other order
    torch.testing.assert_close(flipped.basis, basis)
    assert torch.all(basis.gather(0, basis.abs().argmax(0, keepdim=True)) > 0)


def test_the_map_travels_as_arrays():
    projection = fit_feature_projection(features(), 3)
    arrays = {**projection.to_arrays(), "other": torch.zeros(1).numpy()}
    back = FeatureProjection.from_arrays(arrays)
    assert set(arrays) == {"other"}  # the map's arrays are taken out, the model's stay
    torch.testing.assert_close(back.basis, projection.basis)
    centred = FeatureProjection.from_arrays(fit_feature_projection(features(), 0).to_arrays())
    assert centred.basis is None and centred.dim == 12


def test_more_directions_than_the_server_rows_give_is_refused():
    with pytest.raises(ConfigError, match="feature_components 13: .* 50 val rows of 12"):
        fit_feature_projection(features(), 13)
    with pytest.raises(ConfigError, match="holds no row"):
        fit_feature_projection(features(0), 0)
