"""Resizing images to one size (``ingest.resize``): antialiased bilinear, per channel.

Pillow's resampling filters widen with the scale factor, so shrinking averages every source
pixel instead of skipping some. Values stay float32 at the source's own scale.
"""

from __future__ import annotations

import numpy as np


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """One image ``(c, h, w)`` resized to ``(c, *shape)`` float32."""
    from PIL import Image

    height, width = (int(v) for v in shape)
    if image.shape[1:] == (height, width):
        return np.asarray(image, dtype=np.float32)
    planes = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32)).resize(
                (width, height), Image.Resampling.BILINEAR
            ),
            dtype=np.float32,
        )
        for plane in image
    ]
    return np.stack(planes)


def resize_images(images: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Images ``(n, c, h, w)`` resized to ``(n, c, *shape)``; no copy when the size matches."""
    if images.shape[2:] == tuple(int(v) for v in shape):
        return images
    out = np.empty((len(images), images.shape[1], *shape), dtype=np.float32)
    for row, image in enumerate(images):
        out[row] = resize_image(image, shape)
    return out
