"""What a federation expects of each site's data, and the check every site runs before it
trains: the same channels, image size and class set as the run (the server's val table).

A site whose shard differs is refused by name (its file), before any training, in every
runtime: the simulation checks each shard when the stage starts, a Flower SuperNode checks
its own when the server first queries it. :func:`load_site` reads what a SuperNode's node
config names: a shard partition wrote, or the files ``lepton site join`` prepared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.errors import DataError
from pipelines.io import ImageTable, TableLayout, TableStream, read_image_table

SITES_FILE = "sites.json"  # in models/federate: each site's name, rows, held-out rows and score


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


@dataclass
class SiteData:
    """One site's rows as its SuperNode sees them: training rows and held-out rows."""

    name: str
    train: ImageTable
    holdout: ImageTable | None
    source: str  # the file the training rows came from, for error messages

    @property
    def holdout_rows(self) -> int:
        """Rows the site keeps back to score the final model on (0 = none)."""
        return 0 if self.holdout is None else len(self.holdout.labels)


def scaled(table: ImageTable, normalization: dict[str, float]) -> ImageTable:
    """``table`` with its pixels mapped to [0, 1] by the run's pixel range (partition's
    ``normalization``: ``low``, ``high``), as the run's own splits are."""
    from pipelines.data.codecs import normalize_pixels

    images, _ = normalize_pixels(table.images, normalization["low"], normalization["high"])
    return ImageTable(images, table.labels, table.num_classes)


def load_site(node_config: dict[str, Any], normalization: dict[str, float] | None) -> SiteData:
    """The site a SuperNode's node config names: ``site`` and ``shard`` (a shard partition
    wrote, already scaled), or ``site``, ``data``, ``holdout`` and ``scale="raw"`` (files
    ``lepton site join`` wrote at the source's own scale, scaled here by ``normalization``)."""
    name = str(node_config.get("site", f"client_{int(node_config.get('client-index', 0)):03d}"))
    if "shard" in node_config:
        path = str(node_config["shard"])
        return SiteData(name, read_image_table(path), None, path)
    path = str(node_config["data"])
    train = read_image_table(path)
    holdout = read_image_table(str(node_config["holdout"])) if node_config.get("holdout") else None
    if str(node_config.get("scale", "raw")) == "raw":
        if normalization is None:
            raise DataError(path, "the run sent no pixel range to scale this site's rows with")
        train = scaled(train, normalization)
        holdout = scaled(holdout, normalization) if holdout is not None else None
    return SiteData(name, train, holdout, path)
