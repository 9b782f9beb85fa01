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

In scale-out mode a retry may run on another worker, in another checkout: there the task
sets ``LEPTON_CHECKPOINT_STORE`` to the DAG run's key, the data inputs are keyed by their
content (another checkout's files have other modification times), and every save is also
copied into the DVC remote, ``lepton-runs/<run>/checkpoints/`` (a :class:`CheckpointMirror`,
:func:`pipelines.scale_out.remote_checkpoints`), where a retry elsewhere finds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

CHECKPOINT_DIR = Path(".lepton") / "checkpoints"
META_KEY = "lepton.checkpoint"
CHECKPOINT_STORE_ENV = "LEPTON_CHECKPOINT_STORE"  # scale-out: the DAG run that mirrors them


class CheckpointMirror(Protocol):
    """A second home for checkpoints, shared by machines (the scale-out DVC remote)."""

    def read(self, name: str) -> bytes | None:
        """The checkpoint file ``name``, or None."""

    def write(self, data: bytes, name: str) -> None:
        """Replace the checkpoint file ``name`` with ``data``, whole."""

    def delete(self, name: str) -> None:
        """Delete the checkpoint file ``name`` (if there is one)."""


def checkpoint_bytes(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], owner: str | None = None
) -> bytes:
    """``tensors`` and ``meta`` (JSON-able) as the bytes of a checkpoint file (a ServerApp on
    Flower sends its rounds' checkpoints to the workspace this way); ``owner``, the MLflow
    run saving it, goes into the meta."""
    from safetensors.torch import save

    if owner is not None:
        meta = {**meta, "owner": owner}
    state = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return save(state, metadata={META_KEY: json.dumps(meta)})


def checkpoint_from_bytes(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of the bytes :func:`checkpoint_bytes` wrote."""
    from safetensors.torch import load

    return load(data), checkpoint_meta(data)


def checkpoint_meta(data: bytes) -> dict[str, Any]:
    """The ``meta`` of checkpoint bytes, read from the header alone (no tensor)."""
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_size])
    return json.loads(header["__metadata__"][META_KEY])


@dataclass(frozen=True)
class Checkpoint:
    """One stage's resumable state at ``path`` (and in ``mirror``, when there is one: it is
    read when ``path`` is missing, and written after ``path``)."""

    path: Path
    mirror: CheckpointMirror | None = None
    owner: str | None = None  # the MLflow run saving it: written into every save's meta

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """``(tensors, meta)`` of the last save, or None when there is none."""
        data = self.read_bytes()
        return None if data is None else checkpoint_from_bytes(data)

    def read_bytes(self) -> bytes | None:
        """The file's bytes, or None when there is no checkpoint."""
        if self.path.is_file():
            return self.path.read_bytes()
        return self.mirror.read(self.path.name) if self.mirror is not None else None

    def saved_meta(self) -> dict[str, Any] | None:
        """The ``meta`` of the last save (``owner`` included), or None."""
        data = self.read_bytes()
        return None if data is None else checkpoint_meta(data)

    def save(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Replace the checkpoint with ``tensors`` and ``meta`` (JSON-able), atomically."""
        self.save_bytes(checkpoint_bytes(tensors, meta, self.owner))

    def save_bytes(self, data: bytes) -> None:
        """Replace the checkpoint with ``data`` (:func:`checkpoint_bytes`), atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with temp.open("wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
        finally:
            temp.unlink(missing_ok=True)
        if self.mirror is not None:
            self.mirror.write(data, self.path.name)

    def clear(self) -> None:
        """Delete the checkpoint (the stage's outputs are committed)."""
        self.path.unlink(missing_ok=True)
        if self.mirror is not None:
            self.mirror.delete(self.path.name)


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


_stage_keys: dict[str, tuple[str, CheckpointMirror | None]] = {}


def input_key(root: Path, stage, params, data_content: bool = False) -> str:
    """The digest of the module docstring for a registry ``stage`` (its params sections,
    code and data inputs) in the workspace ``root``; ``data_content``: the data inputs by
    their bytes rather than their size and modification time (the same key in any
    checkout of the same data)."""
    digest = hashlib.sha256()
    sections = {s: getattr(params, s).model_dump(mode="json") for s in stage.params_sections}
    digest.update(json.dumps(sections, sort_keys=True).encode())
    for code in stage.code_deps:
        _digest_files(digest, Path(__file__).resolve().parents[1], code, content=True)
    for data in stage.deps:
        _digest_files(digest, root, data, content=data_content)
    return digest.hexdigest()[:16]


def use_input_key(stage_name: str, key: str, mirror: CheckpointMirror | None = None) -> None:
    """Set the key the stage's checkpoint is filed under, and its ``mirror`` if any
    (``lepton stage run`` calls :func:`input_key` before it runs a stage; this module does
    not import the registry, so that editing the registry does not make every
    checkpointing stage stale in DVC)."""
    _stage_keys[stage_name] = (key, mirror)


def stage_checkpoint(root: Path, stage_name: str, params) -> Checkpoint:
    """The checkpoint of ``stage_name`` under the key ``lepton stage run`` set (see the
    module docstring); a stage run some other way (a benchmark, a test) keys it by its
    params alone."""
    key, mirror = _stage_keys.get(stage_name, (None, None))
    if key is None:
        dumped = json.dumps(params.model_dump(mode="json"), sort_keys=True)
        key = hashlib.sha256(dumped.encode()).hexdigest()[:16]
    return Checkpoint(root / CHECKPOINT_DIR / f"{stage_name}-{key}.safetensors", mirror)


def open_stage_checkpoint(
    root: Path, stage_name: str, params, owner: str | None = None
) -> Checkpoint:
    """:func:`stage_checkpoint`, saved by MLflow run ``owner``; the stage's checkpoints of
    other inputs are deleted (they can never resume)."""
    checkpoint = dataclasses.replace(stage_checkpoint(root, stage_name, params), owner=owner)
    for stale in stale_checkpoints(root, stage_name, checkpoint):
        stale.unlink(missing_ok=True)
    return checkpoint


def stale_checkpoints(root: Path, stage_name: str, keep: Checkpoint) -> list[Path]:
    """The stage's other checkpoints (older inputs or params): they can never resume."""
    folder = root / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return [p for p in folder.glob(f"{stage_name}-*.safetensors") if p != keep.path]


def clear_checkpoints(root: Path, stage_name: str) -> None:
    """Delete every checkpoint of the stage (and its mirrored copy): its outputs are
    committed and logged."""
    folder = root / CHECKPOINT_DIR
    for path in folder.glob(f"{stage_name}-*.safetensors") if folder.is_dir() else []:
        path.unlink(missing_ok=True)
    key, mirror = _stage_keys.get(stage_name, (None, None))
    if mirror is not None:
        mirror.delete(f"{stage_name}-{key}.safetensors")
