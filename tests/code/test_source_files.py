"""The source fingerprint: it changes exactly when what ingest reads changes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipelines.config import IngestParams
from pipelines.data import source_files
from pipelines.data.source_files import fingerprint_source, write_fingerprint
from pipelines.errors import DataError


def image_folder(root: Path) -> Path:
    folder = root / "images"
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        for k in range(2):
            (folder / label / f"{k}.png").write_bytes(f"{label}{k}".encode())
    (folder / "cat" / "notes.txt").write_text("not an image")
    return folder


def test_file_source_changes_with_content_not_with_touch(tmp_path: Path):
    (tmp_path / "site.csv").write_text("label,a\n1,2\n")
    p = IngestParams(source="csv", path="site.csv")
    first = fingerprint_source(p, tmp_path)
    assert first["files"][0]["path"] == "site.csv"  # workspace-relative
    os.utime(tmp_path / "site.csv", ns=(1, 1))
    assert fingerprint_source(p, tmp_path) == first
    (tmp_path / "site.csv").write_text("label,a\n1,2\n3,4\n")
    assert fingerprint_source(p, tmp_path) != first


def test_absolute_path_outside_the_workspace(tmp_path: Path):
    outside = tmp_path / "elsewhere" / "x.npz"
    outside.parent.mkdir()
    outside.write_bytes(b"npz bytes")
    workspace = tmp_path / "ws"
    workspace.mkdir()
    found = fingerprint_source(IngestParams(source="npz", path=str(outside)), workspace)
    assert found["files"][0]["path"] == str(outside.resolve())


def test_idx_lists_images_and_labels(tmp_path: Path):
    (tmp_path / "i.idx").write_bytes(b"images")
    (tmp_path / "l.idx").write_bytes(b"labels")
    p = IngestParams(source="idx", path="i.idx", labels_path="l.idx")
    assert [f["path"] for f in fingerprint_source(p, tmp_path)["files"]] == ["i.idx", "l.idx"]


def test_image_folder_sees_added_removed_and_new_class(tmp_path: Path):
    folder = image_folder(tmp_path)
    p = IngestParams(source="images", path="images")
    first = fingerprint_source(p, tmp_path)
    assert len(first["files"]) == 4 and first["classes"] == ["cat", "dog"]  # not notes.txt
    (folder / "dog" / "2.png").write_bytes(b"new")
    added = fingerprint_source(p, tmp_path)
    assert len(added["files"]) == 5
    (folder / "dog" / "2.png").unlink()
    assert fingerprint_source(p, tmp_path) == first
    (folder / "bird").mkdir()
    assert fingerprint_source(p, tmp_path)["classes"] == ["bird", "cat", "dog"]


def test_digits_has_no_files(tmp_path: Path):
    assert fingerprint_source(IngestParams(), tmp_path) == {"source": "digits", "files": []}


@pytest.mark.parametrize("source", ["csv", "images"])
def test_missing_source_is_a_data_error_naming_it(tmp_path: Path, source):
    with pytest.raises(DataError, match="missing.thing"):
        fingerprint_source(IngestParams(source=source, path="missing.thing"), tmp_path)


def test_unchanged_files_are_not_read_again(tmp_path: Path, monkeypatch):
    folder = image_folder(tmp_path)
    p = IngestParams(source="images", path="images")
    first = fingerprint_source(p, tmp_path)
    reads: list[Path] = []
    real = source_files.sha256_file
    monkeypatch.setattr(source_files, "sha256_file", lambda path: reads.append(path) or real(path))
    assert fingerprint_source(p, tmp_path) == first
    assert reads == []
    (folder / "cat" / "0.png").write_bytes(b"changed!")  # same size as before: content counts
    fingerprint_source(p, tmp_path)
    assert reads == [folder / "cat" / "0.png"]


def test_write_fingerprint_rewrites_only_on_change(tmp_path: Path):
    (tmp_path / "site.csv").write_text("label,a\n1,2\n")
    p = IngestParams(source="csv", path="site.csv")
    target = tmp_path / "data" / "source.json"
    write_fingerprint(p, tmp_path, target)
    os.utime(target, ns=(5, 5))
    write_fingerprint(p, tmp_path, target)
    assert target.stat().st_mtime_ns == 5
    (tmp_path / "site.csv").write_text("label,a\n9,9\n")
    written = write_fingerprint(p, tmp_path, target)
    assert json.loads(target.read_text()) == written
    assert target.stat().st_mtime_ns != 5
