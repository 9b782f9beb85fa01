"""Files: image tables in Parquet, safetensors weights, JSON, and atomic output writes.

Data contract for image tables: column ``image`` is a fixed-size list (float32 or uint8)
holding one flattened image per row, channel-first (``c * h * w`` values), column ``label``
is int64 in ``[0, num_classes)``, and the schema metadata carries ``lepton.image_shape``
(JSON ``[h, w]``), ``lepton.channels`` (1 grayscale, 3 RGB; a table without it is
grayscale) and ``lepton.num_classes``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import DataError

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
SHAPE_KEY = b"lepton.image_shape"
CLASSES_KEY = b"lepton.num_classes"
CHANNELS_KEY = b"lepton.channels"


@dataclass(frozen=True)
class ImageTable:
    """Images ``(n, c, h, w)`` and labels ``(n,)`` int64 with the number of classes.

    ``c`` is 1 (grayscale) or 3 (RGB). Images given as ``(n, h, w)`` are grayscale: a
    channel axis is added (a view, no copy).
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        if self.images.ndim == 3:
            object.__setattr__(self, "images", self.images[:, None])
        if self.images.ndim != 4:
            raise ValueError(f"images must be (n, c, h, w), got shape {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        """Channels of every image: 1 grayscale, 3 RGB."""
        return int(self.images.shape[1])

    @property
    def image_shape(self) -> tuple[int, int]:
        """(height, width) of every image."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def pixels_per_image(self) -> int:
        """Values per image: ``c * h * w``."""
        c, h, w = self.images.shape[1:]
        return int(c * h * w)

    def subset(self, index: np.ndarray) -> ImageTable:
        """Rows ``index`` as a new table."""
        return ImageTable(self.images[index], self.labels[index], self.num_classes)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_sha256(table: ImageTable) -> str:
    """Hash of the table's content (shape, pixels, labels), independent of the file encoding."""
    digest = hashlib.sha256()
    n, c, h, w = table.images.shape
    # grayscale hashes as before channels were stored: data versions keep their digests
    shape = [n, h, w] if c == 1 else [n, c, h, w]
    digest.update(json.dumps([shape, table.num_classes]).encode())
    digest.update(np.ascontiguousarray(table.images, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(table.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def image_table_to_arrow(
    table: ImageTable, pixel_dtype: str = "float32", extra_metadata: dict | None = None
):
    """Build the Arrow table of the data contract (images flattened into a fixed-size list)."""
    import pyarrow as pa

    n, d = len(table), table.pixels_per_image
    flat = np.ascontiguousarray(table.images.reshape(n, d)).astype(pixel_dtype, copy=False)
    values = pa.array(flat.reshape(-1))
    image_col = pa.FixedSizeListArray.from_arrays(values, d)
    metadata = table_metadata(table)
    for key, value in (extra_metadata or {}).items():
        metadata[key.encode()] = json.dumps(value).encode()
    schema = pa.schema(
        [pa.field(IMAGE_COLUMN, image_col.type), pa.field(LABEL_COLUMN, pa.int64())],
        metadata=metadata,
    )
    return pa.Table.from_arrays([image_col, pa.array(table.labels.astype(np.int64))], schema=schema)


def table_metadata(table: ImageTable) -> dict[bytes, bytes]:
    """The contract's schema metadata of ``table``: shape, channels, classes."""
    return {
        SHAPE_KEY: json.dumps(list(table.image_shape)).encode(),
        CHANNELS_KEY: str(table.channels).encode(),
        CLASSES_KEY: str(table.num_classes).encode(),
    }


def metadata_shape(metadata: dict[bytes, bytes]) -> tuple[int, int, int]:
    """``(c, h, w)`` from a table's schema metadata (no channels key = grayscale)."""
    h, w = json.loads(metadata[SHAPE_KEY])
    return int(metadata.get(CHANNELS_KEY, b"1")), int(h), int(w)


def write_image_table(table: ImageTable, path: str | Path, **parquet_options: Any) -> None:
    """Write ``table`` as Parquet (zstd by default); pass pyarrow ``write_table`` options."""
    import pyarrow.parquet as pq

    pixel_dtype = parquet_options.pop("pixel_dtype", "float32")
    extra_metadata = parquet_options.pop("extra_metadata", None)
    parquet_options.setdefault("compression", "zstd")
    pq.write_table(
        image_table_to_arrow(table, pixel_dtype, extra_metadata), str(path), **parquet_options
    )


def read_image_table(path: str | Path) -> ImageTable:
    """Read a Parquet file written by :func:`write_image_table`; errors name file and field."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "file not found")
    try:
        arrow = pq.read_table(str(path))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(str(path), f"not a readable Parquet file ({exc})") from None
    metadata = arrow.schema.metadata or {}
    for key in (SHAPE_KEY, CLASSES_KEY):
        if key not in metadata:
            raise DataError(str(path), f"schema metadata lacks '{key.decode()}'")
    for column in (IMAGE_COLUMN, LABEL_COLUMN):
        if column not in arrow.column_names:
            raise DataError(str(path), "column missing", field=column)
    c, h, w = metadata_shape(metadata)
    flat = np.asarray(
        arrow.column(IMAGE_COLUMN).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    )
    images = flat.astype(np.float32).reshape(arrow.num_rows, c, h, w)
    labels = arrow.column(LABEL_COLUMN).to_numpy().astype(np.int64)
    return ImageTable(images, labels, int(metadata[CLASSES_KEY]))


def read_client_shards(partitions: str | Path) -> list[tuple[Path, ImageTable]]:
    """Every client shard ``clients/client_*.parquet`` of a partitions folder, in name
    order, with its path; no shard is a DataError naming the folder."""
    folder = Path(partitions) / "clients"
    shards = sorted(folder.glob("client_*.parquet"))
    if not shards:
        raise DataError(str(folder), "no client shards (has partition run?)")
    return [(path, read_image_table(path)) for path in shards]


def concat_tables(tables: list[ImageTable], num_classes: int | None = None) -> ImageTable:
    """Rows of all ``tables`` in order, as one table (classes: the largest, or as given)."""
    return ImageTable(
        np.concatenate([t.images for t in tables]),
        np.concatenate([t.labels for t in tables]),
        num_classes if num_classes is not None else max(t.num_classes for t in tables),
    )


def read_json(path: str | Path) -> Any:
    """Load a JSON file; a missing or broken file raises DataError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(str(path), "file not found (has the upstream stage run?)") from None
    except json.JSONDecodeError as exc:
        raise DataError(str(path), f"not valid JSON ({exc})") from None


def write_json(path: str | Path, payload: Any) -> None:
    """Write JSON with sorted keys and a trailing newline (diff-friendly)."""
    Path(path).write_text(
        json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n"
    )


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename: never half-written."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        temp.write_text(text)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_weights(
    module, directory: str | Path, config: dict[str, Any], name: str = "model"
) -> None:
    """Save a torch module as ``<name>.safetensors`` plus ``<name>.json`` (its config)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(directory / f"{name}.safetensors"))
    write_json(directory / f"{name}.json", config)


def load_weights(directory: str | Path, name: str = "model") -> tuple[dict, dict[str, Any]]:
    """Load ``(state_dict, config)`` saved by :func:`save_weights` (safetensors, no pickle)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    weights = directory / f"{name}.safetensors"
    if not weights.is_file():
        raise DataError(str(weights), "weights file not found (has the upstream stage run?)")
    return load_file(str(weights)), read_json(directory / f"{name}.json")


class Staging:
    """Temporary twins of a stage's outputs; see :func:`atomic_outputs`."""

    def __init__(self, dirs: list[Path], files: list[Path]):
        token = uuid.uuid4().hex[:8]
        self._temp: dict[Path, Path] = {}
        for target in [*dirs, *files]:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._temp[target] = target.with_name(f".{target.name}.tmp-{token}")
        for target in dirs:
            self._temp[target].mkdir()

    def path(self, target: str | Path) -> Path:
        """Where to write what will become ``target``."""
        return self._temp[Path(target)]

    def commit(self) -> None:
        """Move every staged output into place, replacing the previous ones."""
        backups = []
        for target, temp in self._temp.items():
            if not temp.exists():
                raise FileNotFoundError(f"stage did not write {target}")
        for target, temp in self._temp.items():
            if target.exists() or target.is_symlink():
                backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(target, backup)
                backups.append(backup)
            os.replace(temp, target)
        for backup in backups:
            _remove(backup)

    def discard(self) -> None:
        """Delete whatever was staged."""
        for temp in self._temp.values():
            _remove(temp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_outputs(dirs: list[str | Path] = (), files: list[str | Path] = ()) -> Iterator[Staging]:
    """Stage outputs in temporary twins; move them into place only if the block succeeds.

    A failure anywhere in the block leaves every previous output exactly as it was.
    """
    staging = Staging([Path(d) for d in dirs], [Path(f) for f in files])
    try:
        yield staging
    except BaseException:
        staging.discard()
        raise
    staging.commit()


@dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes, relative to the workspace root."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def compressed(self) -> Path:
        return self.root / "data" / "compressed"

    @property
    def partitions(self) -> Path:
        return self.root / "data" / "partitions"

    def model_dir(self, stage: str) -> Path:
        """Output folder of a model stage: ``models/<stage>``."""
        return self.root / "models" / stage

    @property
    def evaluate(self) -> Path:
        return self.root / "reports" / "evaluate"

    def report(self, stage: str) -> Path:
        """The stage's metrics file (``reports/metrics.json`` for evaluate)."""
        name = "metrics" if stage == "evaluate" else stage
        return self.root / "reports" / f"{name}.json"
