"""Example image sets made from scikit-learn's bundled digits (no network), written as a
user would bring them: the same 1797 digits as MNIST-style 28x28 IDX files, or in colour
as 32x32 RGB PNG class folders or an NPZ file.

They are what the benchmarks and tests run the pipeline on beyond 8x8 grayscale:

- :func:`digits_28x28`: each 8x8 image upscaled x3 (bilinear) and padded by 2 pixels, 0..255:
  the same information as the 8x8 set, at MNIST's size.
- :func:`coloured_digits`: each digit upscaled to ``side`` pixels and painted with a random
  foreground and background colour per image (at least ``MIN_COLOUR_DISTANCE`` apart in
  RGB), so colour carries no class.

``lepton example-data NAME DIR`` writes one of them and prints the ``--set ingest.*``
overrides that read it.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

MIN_COLOUR_DISTANCE = 128.0  # RGB distance between a digit's foreground and background


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)


def _upscale(images: np.ndarray, side: int) -> np.ndarray:
    from pipelines.data.resize import resize_images

    return resize_images(images[:, None], (side, side))[:, 0]


def digits_28x28() -> tuple[np.ndarray, np.ndarray]:
    """``(images (1797, 28, 28) uint8, labels (1797,) int64)``: x3 bilinear, 2-pixel pad."""
    images, labels = _digits()
    big = np.pad(_upscale(images, 24), ((0, 0), (2, 2), (2, 2)))
    return np.clip(np.rint(big * 255), 0, 255).astype(np.uint8), labels


def random_colour_pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` foreground and background RGB colours (0..255), each pair at least
    ``MIN_COLOUR_DISTANCE`` apart."""
    rng = np.random.default_rng(seed)
    fg, bg = rng.uniform(0, 255, (n, 3)), rng.uniform(0, 255, (n, 3))
    close = np.linalg.norm(fg - bg, axis=1) < MIN_COLOUR_DISTANCE
    while close.any():
        fg[close], bg[close] = rng.uniform(0, 255, (2, int(close.sum()), 3))
        close = np.linalg.norm(fg - bg, axis=1) < MIN_COLOUR_DISTANCE
    return fg, bg


def coloured_digits(side: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(images (1797, side, side, 3) uint8, labels)``: digits in random colours."""
    images, labels = _digits()
    ink = np.clip(_upscale(images, side), 0.0, 1.0)[..., None]
    fg, bg = random_colour_pairs(len(images), seed)
    rgb = bg[:, None, None, :] * (1 - ink) + fg[:, None, None, :] * ink
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), labels


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uint8 array as a gzipped MNIST IDX file."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + np.ascontiguousarray(array, np.uint8).tobytes()))


def write_class_folders(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """One PNG per image under ``folder/<label>/`` (grayscale ``(n, h, w)`` or RGB
    ``(n, h, w, 3)`` uint8)."""
    from PIL import Image

    for row, (image, label) in enumerate(zip(images, labels, strict=True)):
        target = folder / str(int(label))
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"{row:05d}.png")


def write_example(name: str, folder: Path) -> dict[str, str]:
    """Write example set ``name`` into ``folder``; return the ``ingest`` params that read it.

    Names: ``digits28`` (IDX files), ``rgb32`` (PNG class folders), ``rgb32-npz`` (one NPZ).
    """
    folder.mkdir(parents=True, exist_ok=True)
    if name == "digits28":
        images, labels = digits_28x28()
        write_idx(folder / "images-idx3-ubyte.gz", images)
        write_idx(folder / "labels-idx1-ubyte.gz", labels.astype(np.uint8))
        return {
            "source": "idx",
            "path": str(folder / "images-idx3-ubyte.gz"),
            "labels_path": str(folder / "labels-idx1-ubyte.gz"),
        }
    if name == "rgb32":
        images, labels = coloured_digits(32)
        write_class_folders(folder / "images", images, labels)
        return {"source": "images", "path": str(folder / "images")}
    if name == "rgb32-npz":
        images, labels = coloured_digits(32)
        np.savez_compressed(folder / "rgb32.npz", x=images, y=labels)
        return {"source": "npz", "path": str(folder / "rgb32.npz")}
    raise ValueError(f"unknown example '{name}' (digits28, rgb32, rgb32-npz)")


EXAMPLES = ("digits28", "rgb32", "rgb32-npz")
