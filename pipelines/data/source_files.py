"""The files an ingest source reads, and their fingerprint: what makes ingest re-run.

``lepton dvc fingerprint-source`` (the DVC stage ``ingest_source``, run on every
``dvc repro``) writes ``data/source.json``: the source kind and, for each file ingest
reads, its path, size and sha256. ingest depends on that file, so a changed, added or
removed source file re-runs ingest and whatever its new output changes downstream, while
an untouched source leaves the file byte-identical and every stage is skipped. Paths
inside the workspace are written relative to it, absolute ones as they are.

Hashing is what costs on large sources, so each file's sha256 is kept in
``.lepton/source-hashes.json`` under its size, mtime and inode, as DVC does for its own
dependencies: an unchanged file is not read again.

Imports stay light (no torch, pyarrow or scikit-learn): this runs at the start of every
pipeline run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.config import IngestParams
from pipelines.errors import DataError
from pipelines.io import sha256_file, write_text_atomic

HASH_CACHE_FILE = ".lepton/source-hashes.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")


def resolve(path: str | Path, root: Path) -> Path:
    """``path`` as given when absolute, else relative to the workspace ``root``."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else root / path


def source_paths(p: IngestParams, root: Path) -> list[Path]:
    """The files or folder a source names (empty for ``digits``)."""
    if p.source == "digits":
        return []
    paths = [resolve(p.path, root)]
    if p.source == "idx":
        paths.append(resolve(p.labels_path, root))
    return paths


def class_folders(folder: Path) -> list[Path]:
    """Sub-folders of ``folder`` in sorted order: their names are the classes."""
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def image_files(folder: Path) -> list[tuple[Path, int]]:
    """(image file, class index) for every image an ``images`` source reads, in row order."""
    return [
        (path, label)
        for label, class_dir in enumerate(class_folders(folder))
        for path in sorted(class_dir.iterdir())
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    ]


def _shown(path: Path, root: Path) -> str:
    """A path as the fingerprint writes it: workspace-relative when inside it."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def read_files(p: IngestParams, root: Path) -> tuple[list[Path], list[str]]:
    """The files ingest reads and, for an images folder, its class names.

    A missing file or folder is a DataError naming it, the one ingest would raise.
    """
    files: list[Path] = []
    classes: list[str] = []
    for path in source_paths(p, root):
        if p.source == "images":
            if not path.is_dir():
                raise DataError(str(path), "folder not found (expected one sub-folder per class)")
            classes = [d.name for d in class_folders(path)]
            files += [file for file, _ in image_files(path)]
        elif path.is_dir():
            raise DataError(str(path), "is a folder, expected a file")
        elif not path.is_file():
            raise DataError(str(path), "file not found")
        else:
            files.append(path)
    return files, classes


class HashCache:
    """sha256 of files, reused while a file's size, mtime and inode stay the same."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries: dict[str, list] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.used: dict[str, list] = {}

    def sha256(self, file: Path) -> str:
        """The file's sha256, from the cache when its stat is unchanged."""
        stat = file.stat()
        key = str(file.resolve())
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        cached = self.entries.get(key)
        digest = cached[3] if cached and cached[:3] == stamp else sha256_file(file)
        self.used[key] = [*stamp, digest]
        return digest

    def save(self) -> None:
        """Keep the entries of the files hashed this time (atomically)."""
        if self.used == self.entries:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self.used, sort_keys=True))


def fingerprint_source(p: IngestParams, root: Path) -> dict[str, Any]:
    """What ingest will read: the source kind, its files (path, size, sha256), its classes."""
    files, classes = read_files(p, root)
    cache = HashCache(root / HASH_CACHE_FILE)
    entries = [
        {"path": _shown(file, root), "size": file.stat().st_size, "sha256": cache.sha256(file)}
        for file in files
    ]
    cache.save()
    fingerprint: dict[str, Any] = {"source": p.source, "files": entries}
    if p.source == "images":
        fingerprint["classes"] = classes
    return fingerprint


def write_fingerprint(p: IngestParams, root: Path, target: Path) -> dict[str, Any]:
    """Write the fingerprint to ``target``; rewrite it only when it changes (keeps its mtime)."""
    fingerprint = fingerprint_source(p, root)
    text = json.dumps(fingerprint, indent=2, sort_keys=True) + "\n"
    if not target.is_file() or target.read_text() != text:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, text)
    return fingerprint
