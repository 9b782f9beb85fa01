"""What a federation expects of each site's data, and the check every site runs before it
trains: the same channels, image size and class set as the run (the server's val table).

A site whose shard differs is refused by name (its file), before any training, in every
runtime: the simulation checks each shard when the stage starts, a Flower SuperNode checks
its own when the server first queries it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.errors import DataError
from pipelines.io import ImageTable, TableLayout, TableStream


def expected_data(table: ImageTable | TableLayout) -> dict[str, Any]:
    """``{"channels", "image_shape", "num_classes"}`` of a table: what the run expects."""
    return {
        "channels": int(table.channels),
        "image_shape": [int(v) for v in table.image_shape],
        "num_classes": int(table.num_classes),
    }


def check_site_data(table: ImageTable | TableStream, expected: dict[str, Any], source: str) -> None:
    """Raise a :class:`~pipelines.errors.DataError` naming ``source`` (the site's file) when
    its images have other channels or another size than ``expected``, or a label lies
    outside the run's classes (naming the first such row). Fewer classes are fine."""
    layout = table.layout if isinstance(table, TableStream) else table
    channels, shape = int(layout.channels), [int(v) for v in layout.image_shape]
    if channels != expected["channels"]:
        raise DataError(
            source,
            f"images have {channels} channel(s); this federation expects {expected['channels']}",
            field="image",
        )
    if shape != list(expected["image_shape"]):
        raise DataError(
            source,
            f"images are {shape[0]}x{shape[1]}; this federation expects "
            f"{expected['image_shape'][0]}x{expected['image_shape'][1]}",
            field="image",
        )
    labels = np.asarray(layout.labels)
    outside = np.flatnonzero((labels < 0) | (labels >= expected["num_classes"]))
    if len(outside):
        row = int(outside[0])
        raise DataError(
            source,
            f"label {int(labels[row])} is not one of this federation's classes "
            f"0..{expected['num_classes'] - 1}",
            field="label",
            row=row,
        )
