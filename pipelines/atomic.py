"""Stage outputs that survive kills: staged twins, an atomic swap, a journal, recovery.

A stage writes each output into a hidden twin beside it (``.<name>.tmp-<token>``) and, once
every one is complete, commits them:

1. a *journal* is written (atomically) naming each output, its twin and the twin's inode;
2. each twin takes its output's place in one step: ``renameat2(RENAME_EXCHANGE)`` swaps a
   folder with its twin (a plain ``rename`` replaces a file), so the path always holds
   either the whole old output or the whole new one, never nothing and never a mix;
3. the old contents (now in the twin's path) are deleted, then the journal.

A SIGKILL before step 1 leaves every previous output untouched (the twins are stale and
deleted at the next start). A SIGKILL during steps 2-3 leaves a journal: the next start of
the stage rolls it forward (:func:`recover_outputs`), so a stage's outputs change together.
The inode tells, after a kill, whether an output already holds its new contents.

DVC must not delete the outputs before it runs a stage, or none of this helps: every out in
``dvc.yaml`` has ``persist: true`` (:mod:`pipelines.dvc_render`).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_journal_dir: Path | None = None


def use_journal(directory: Path | None) -> None:
    """Where commits keep their journals (``<workspace>/.lepton/commits``); ``None``:
    commit without one (outputs still never half-written, but a kill between two outputs'
    swaps can leave them from different runs)."""
    global _journal_dir
    _journal_dir = Path(directory) if directory is not None else None


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``); False where the system or file system does not offer it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(
        _AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE
    )
    return result == 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _put_in_place(temp: Path, target: Path) -> None:
    """Move ``temp`` onto ``target``; afterwards ``temp`` holds the old contents, if any."""
    if target.is_dir() and not target.is_symlink():
        if exchange_paths(temp, target):
            return
        # no atomic exchange here: two renames, with a moment where target is missing
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        os.replace(temp, target)
        os.replace(old, temp)
        return
    os.replace(temp, target)


def _write_journal(path: Path, moves: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps({"moves": moves}, indent=2))
    os.replace(temp, path)


def _finish(moves: list[dict]) -> None:
    """Put every journalled twin in place (those not there yet) and delete the old contents."""
    for move in moves:
        target, temp = Path(move["target"]), Path(move["temp"])
        done = target.exists() and target.lstat().st_ino == move["inode"]
        if not done and temp.exists() and temp.lstat().st_ino == move["inode"]:
            _put_in_place(temp, target)
        _remove(temp)  # the old contents, or nothing


class Staging:
    """Temporary twins of a stage's outputs; see :func:`atomic_outputs`."""

    def __init__(self, dirs: list[Path], files: list[Path]):
        self.token = uuid.uuid4().hex[:8]
        self._temp: dict[Path, Path] = {}
        for target in [*dirs, *files]:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._temp[target] = target.with_name(f".{target.name}.tmp-{self.token}")
        for target in dirs:
            self._temp[target].mkdir()

    def path(self, target: str | Path) -> Path:
        """Where to write what will become ``target``."""
        return self._temp[Path(target)]

    def commit(self) -> None:
        """Move every staged output into place, replacing the previous ones (journalled,
        see the module docstring)."""
        for target, temp in self._temp.items():
            if not temp.exists():
                raise FileNotFoundError(f"stage did not write {target}")
        moves = [
            {
                "target": str(target.resolve()),
                "temp": str(temp.resolve()),
                "inode": temp.lstat().st_ino,
            }
            for target, temp in self._temp.items()
        ]
        journal = _journal_dir / f"{self.token}.json" if _journal_dir is not None else None
        if journal is not None:
            _write_journal(journal, moves)
        _finish(moves)
        if journal is not None:
            journal.unlink(missing_ok=True)

    def discard(self) -> None:
        """Delete whatever was staged."""
        for temp in self._temp.values():
            _remove(temp)


@contextmanager
def atomic_outputs(
    dirs: Iterable[str | Path] = (), files: Iterable[str | Path] = ()
) -> Iterator[Staging]:
    """Stage outputs in temporary twins; move them into place only if the block succeeds.

    A failure anywhere in the block leaves every previous output exactly as it was, and so
    does a kill (see the module docstring).
    """
    staging = Staging([Path(d) for d in dirs], [Path(f) for f in files])
    try:
        yield staging
    except BaseException:
        staging.discard()
        raise
    staging.commit()


def recover_outputs(journal_dir: Path, targets: Iterable[str | Path]) -> list[Path]:
    """Before a stage runs: roll forward every journal that names one of ``targets`` (a
    commit a kill interrupted), then delete the stale twins a killed run left beside them.
    Returns the outputs a journal completed."""
    wanted = {Path(t).resolve() for t in targets}
    completed: list[Path] = []
    journal_dir = Path(journal_dir)
    for journal in sorted(journal_dir.glob("*.json")) if journal_dir.is_dir() else []:
        moves = json.loads(journal.read_text())["moves"]
        if not any(Path(m["target"]) in wanted for m in moves):
            continue
        _finish(moves)
        journal.unlink()
        completed += [Path(m["target"]) for m in moves]
        log.warning(
            "completed the outputs of a commit a kill interrupted: %s",
            ", ".join(m["target"] for m in moves),
        )
    for target in wanted:
        for stale in [
            *target.parent.glob(f".{target.name}.tmp-*"),
            *target.parent.glob(f".{target.name}.old-*"),
        ]:
            _remove(stale)
    return completed
