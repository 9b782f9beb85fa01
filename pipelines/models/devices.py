"""Which torch device ``common.device`` means here (no Lightning import)."""

from __future__ import annotations

import torch

from pipelines.errors import ConfigError


def resolve_accelerator(device: str) -> str:
    """'cuda' or 'cpu' for ``common.device`` ('auto' picks CUDA when one is present)."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("common.device is 'cuda' but no CUDA device is available")
        return "cuda"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    raise ConfigError(f"common.device must be auto, cpu or cuda, got '{device}'")
