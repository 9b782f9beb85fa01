"""Training batches read from a Parquet table in chunks, for splits larger than memory.

:class:`StreamingImages` is a torch ``IterableDataset`` over a :class:`~pipelines.io.
TableStream`: each epoch reads the table once, chunk by chunk (about 32 MB of float32
pixels each, in file order), shuffles the rows inside each chunk with a generator seeded by
``seed`` and the epoch, and yields batches of ``batch_size`` images ``(b, c, h, w)`` (with
``with_labels``, ``(images, labels)``: the federated clients' fits). Memory
holds one chunk at a time. The shuffle is local to a chunk, so a table written in label
order trains on label-ordered chunks: partition writes every split in row order of the
source, which is not sorted by label unless the source is.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from pipelines.io import TableStream


class StreamingImages(IterableDataset):
    """Batches of images of a table streamed from disk, reshuffled within chunks each epoch."""

    def __init__(
        self, stream: TableStream, batch_size: int, seed: int = 0, with_labels: bool = False
    ):
        super().__init__()
        self.stream = stream
        self.batch_size = batch_size
        self.seed = seed
        self.with_labels = with_labels
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        carry: list[np.ndarray] | None = None
        for _, images, labels in self.stream.batches_with_labels():
            order = rng.permutation(len(images))
            chunk = [images[order], np.asarray(labels, dtype=np.int64)[order]]
            if carry is not None and len(carry[0]):
                chunk = [np.concatenate([old, new]) for old, new in zip(carry, chunk, strict=True)]
            whole = len(chunk[0]) - len(chunk[0]) % self.batch_size
            for start in range(0, whole, self.batch_size):
                yield self._batch([part[start : start + self.batch_size] for part in chunk])
            carry = [part[whole:] for part in chunk]
        if carry is not None and len(carry[0]):
            yield self._batch([np.ascontiguousarray(part) for part in carry])

    def _batch(self, parts: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
        tensors = tuple(torch.from_numpy(part) for part in parts)
        return tensors if self.with_labels else tensors[:1]
