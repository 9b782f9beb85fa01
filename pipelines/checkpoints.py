"""Resumable progress of the long stages (federate's rounds, pretrain's epochs).

A checkpoint is one safetensors file, ``.lepton/checkpoints/<stage>-<key>.safetensors``:
tensors (weights, optimizer and server-optimizer state, RNG states) plus a JSON document in
its metadata (round or epoch, history, generator states that are not tensors). It is written
to a temporary file and renamed, so a kill during the write leaves the previous checkpoint.

The key is a digest of what the stage's result depends on: its params sections, the code it
imports (content) and its data inputs (path, size and modification time of every file).
A rerun with the same inputs resumes; any change starts afresh. Checkpoints are not DVC
outputs (DVC would delete them before the stage runs): they live in ``.lepton/``, which git
and DVC ignore. ``lepton stage run`` deletes a stage's checkpoints once the stage has
committed its outputs and logged its metrics; a stage deletes checkpoints of other inputs
when it starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_DIR = Path(".lepton") / "checkpoints"
META_KEY = "lepton.checkpoint"


@dataclass(frozen=True)
class Checkpoint:
    """One stage's resumable state at ``path``."""

    path: Path

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """``(tensors, meta)`` of the last save, or None when there is none."""
        from safetensors import safe_open

        if not self.path.is_file():
            return None
        with safe_open(str(self.path), framework="pt") as handle:
            meta = json.loads(handle.metadata()[META_KEY])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        return tensors, meta

    def save(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Replace the checkpoint with ``tensors`` and ``meta`` (JSON-able), atomically."""
        from safetensors.torch import save_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            state = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
            save_file(state, str(temp), metadata={META_KEY: json.dumps(meta)})
            os.replace(temp, self.path)
        finally:
            temp.unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete the checkpoint (the stage's outputs are committed)."""
        self.path.unlink(missing_ok=True)


def _digest_files(digest, root: Path, relative: str, content: bool) -> None:
    path = root / relative
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if not file.exists():
            digest.update(f"{file.relative_to(root)}:missing\n".encode())
            continue
        stat = file.stat()
        if content:
            digest.update(f"{file.relative_to(root)}:".encode() + file.read_bytes())
        else:
            digest.update(f"{file.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())


_stage_keys: dict[str, str] = {}


def input_key(root: Path, stage, params) -> str:
    """The digest of the module docstring for a registry ``stage`` (its params sections,
    code and data inputs) in the workspace ``root``."""
    digest = hashlib.sha256()
    sections = {s: getattr(params, s).model_dump(mode="json") for s in stage.params_sections}
    digest.update(json.dumps(sections, sort_keys=True).encode())
    for code in stage.code_deps:
        _digest_files(digest, Path(__file__).resolve().parents[1], code, content=True)
    for data in stage.deps:
        _digest_files(digest, root, data, content=False)
    return digest.hexdigest()[:16]


def use_input_key(stage_name: str, key: str) -> None:
    """Set the key the stage's checkpoint is filed under (``lepton stage run`` calls
    :func:`input_key` before it runs a stage; this module does not import the registry, so
    that editing the registry does not make every checkpointing stage stale in DVC)."""
    _stage_keys[stage_name] = key


def stage_checkpoint(root: Path, stage_name: str, params) -> Checkpoint:
    """The checkpoint of ``stage_name`` under the key ``lepton stage run`` set (see the
    module docstring); a stage run some other way (a benchmark, a test) keys it by its
    params alone."""
    key = _stage_keys.get(stage_name)
    if key is None:
        dumped = json.dumps(params.model_dump(mode="json"), sort_keys=True)
        key = hashlib.sha256(dumped.encode()).hexdigest()[:16]
    return Checkpoint(root / CHECKPOINT_DIR / f"{stage_name}-{key}.safetensors")


def stale_checkpoints(root: Path, stage_name: str, keep: Checkpoint) -> list[Path]:
    """The stage's other checkpoints (older inputs or params): they can never resume."""
    folder = root / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return [p for p in folder.glob(f"{stage_name}-*.safetensors") if p != keep.path]


def clear_checkpoints(root: Path, stage_name: str) -> None:
    """Delete every checkpoint of the stage: its outputs are committed and logged."""
    folder = root / CHECKPOINT_DIR
    for path in folder.glob(f"{stage_name}-*.safetensors") if folder.is_dir() else []:
        path.unlink(missing_ok=True)
