"""A site whose data differs from the run's (channels, size, classes) is refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.errors import DataError
from pipelines.federated.sites import check_site_data, expected_data
from pipelines.io import ImageTable, TableStream, write_image_table


def table(channels: int = 1, side: int = 8, labels=(0, 1, 2, 1)) -> ImageTable:
    images = np.zeros((len(labels), channels, side, side), np.float32)
    return ImageTable(images, np.asarray(labels), 3)


def test_the_same_kind_of_data_passes_and_fewer_classes_are_fine():
    expected = expected_data(table())
    assert expected == {"channels": 1, "image_shape": [8, 8], "num_classes": 3}
    check_site_data(table(labels=(1, 1)), expected, "site.parquet")


@pytest.mark.parametrize(
    ("site", "field", "words"),
    [
        (table(channels=3), "image", "3 channel(s); this federation expects 1"),
        (table(side=28), "image", "28x28; this federation expects 8x8"),
        (table(labels=(0, 1, 7)), "label", "label 7 is not one of this federation's classes"),
    ],
)
def test_a_different_site_is_refused_naming_its_file(site, field, words, tmp_path):
    write_image_table(site, tmp_path / "site_b.parquet")
    stream = TableStream.from_file(tmp_path / "site_b.parquet")
    with pytest.raises(DataError) as caught:
        check_site_data(stream, expected_data(table()), str(tmp_path / "site_b.parquet"))
    assert "site_b.parquet" in str(caught.value) and words in str(caught.value)
    assert caught.value.field == field
    if field == "label":
        assert caught.value.row == 2


def test_federate_refuses_a_shard_unlike_val_before_training(tmp_path):
    """The stage checks every shard against val first: no training, no outputs."""
    from pipelines.config import CommonParams, FederateParams, Params
    from pipelines.stages import federate
    from tests.conftest import make_federation_workspace

    paths = make_federation_workspace(tmp_path / "ws")
    shards = sorted((paths.partitions / "clients").glob("client_*.parquet"))
    write_image_table(table(side=16, labels=(0, 1)), shards[1])
    params = Params(common=CommonParams(seed=0, device="cpu"), federate=FederateParams(rounds=1))
    with pytest.raises(DataError, match=f"{shards[1].name}.*16x16"):
        federate.run(params, paths, None)
    assert not paths.model_dir("federate").exists()
