"""A pipeline run's data against the previous run's: first, new or unchanged."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.data_history import RAW_MANIFEST, data_change


def ingested(root: Path, rows: int, sha256: str) -> None:
    path = root / RAW_MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": rows, "content_sha256": sha256}))


def test_first_then_new_then_unchanged(tmp_path: Path):
    assert data_change(tmp_path, "run-1") is None  # nothing ingested yet
    ingested(tmp_path, 1000, "a" * 64)
    first = data_change(tmp_path, "run-1")
    assert first.status == "first" and first.rows == 1000
    assert data_change(tmp_path, "run-1") == first  # asking again gives the same answer

    ingested(tmp_path, 1500, "b" * 64)
    new = data_change(tmp_path, "run-2")
    assert (new.status, new.previous_rows, new.previous_sha256) == ("new", 1000, "a" * 64)
    assert new.tags()["lepton.previous_data_rows"] == "1000"
    assert "new data: 1500 rows" in new.describe(ingest_ran=True)

    same = data_change(tmp_path, "run-3")
    assert (same.status, same.previous_rows) == ("unchanged", 1500)
    assert same.describe(ingest_ran=False).startswith("source unchanged: 1500 rows")
    assert same.describe(ingest_ran=True).startswith("same data as the previous run")


def test_a_run_that_re_ingests_is_compared_with_the_run_before_it(tmp_path: Path):
    ingested(tmp_path, 10, "a" * 64)
    data_change(tmp_path, "run-1")
    data_change(tmp_path, "run-2")  # run-2 starts on run-1's data (a stage before ingest)
    ingested(tmp_path, 12, "c" * 64)  # then run-2's ingest writes new data
    change = data_change(tmp_path, "run-2")
    assert (change.status, change.previous_rows) == ("new", 10)


def test_a_line_cut_by_a_kill_is_skipped(tmp_path: Path):
    ingested(tmp_path, 10, "a" * 64)
    data_change(tmp_path, "run-1")
    with (tmp_path / ".lepton" / "data-history.jsonl").open("a") as handle:
        handle.write('{"pipeline_run": "run-x", "ro')
    assert data_change(tmp_path, "run-2").status == "unchanged"
    runs = []
    for line in (tmp_path / ".lepton" / "data-history.jsonl").read_text().splitlines():
        try:
            runs.append(json.loads(line)["pipeline_run"])
        except ValueError:
            continue
    assert runs == ["run-1", "run-2"]  # run-2's line did not join the cut one
