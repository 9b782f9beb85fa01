"""Outputs replaced atomically, journalled, and completed after a kill (pipelines/atomic.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines import atomic
from pipelines.atomic import atomic_outputs, exchange_paths, recover_outputs, use_journal


@pytest.fixture
def journal(tmp_path):
    folder = tmp_path / ".lepton" / "commits"
    use_journal(folder)
    yield folder
    use_journal(None)


def write_outputs(root: Path, text: str) -> tuple[Path, Path]:
    out, report = root / "models" / "stage", root / "reports" / "stage.json"
    with atomic_outputs(dirs=[out], files=[report]) as staged:
        (staged.path(out) / "weights.bin").write_text(text)
        staged.path(report).write_text(json.dumps({"run": text}))
    return out, report


def test_exchange_swaps_two_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "f").write_text("a")
    (tmp_path / "b" / "f").write_text("b")
    assert exchange_paths(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "f").read_text() == "b" and (tmp_path / "b" / "f").read_text() == "a"


def test_commit_replaces_outputs_and_leaves_nothing_behind(tmp_path, journal):
    out, report = write_outputs(tmp_path, "one")
    write_outputs(tmp_path, "two")
    assert (out / "weights.bin").read_text() == "two"
    assert json.loads(report.read_text()) == {"run": "two"}
    hidden = [p.name for p in [*out.parent.iterdir(), *report.parent.iterdir()]]
    assert sorted(hidden) == ["stage", "stage.json"]
    assert not list(journal.glob("*"))


def test_a_failure_leaves_the_previous_outputs(tmp_path, journal):
    out, report = write_outputs(tmp_path, "one")
    with pytest.raises(RuntimeError), atomic_outputs(dirs=[out], files=[report]) as staged:
        (staged.path(out) / "weights.bin").write_text("half")
        raise RuntimeError("killed")
    assert (out / "weights.bin").read_text() == "one"
    assert sorted(p.name for p in out.parent.iterdir()) == ["stage"]


def test_a_kill_between_two_swaps_is_completed_by_recovery(tmp_path, journal, monkeypatch):
    out, report = write_outputs(tmp_path, "one")
    real = atomic._put_in_place
    calls = []

    def die_after_first(temp, target):
        if calls:
            raise SystemExit("SIGKILL")  # the process dies between the two swaps
        calls.append(target)
        real(temp, target)

    monkeypatch.setattr(atomic, "_put_in_place", die_after_first)
    with pytest.raises(SystemExit):
        write_outputs(tmp_path, "two")
    monkeypatch.setattr(atomic, "_put_in_place", real)
    # mixed for now: the folder is new, the report old; the journal says what to finish
    assert (out / "weights.bin").read_text() == "two"
    assert json.loads(report.read_text()) == {"run": "one"}
    assert len(list(journal.glob("*.json"))) == 1

    completed = recover_outputs(journal, [out, report])
    assert {p.name for p in completed} == {"stage", "stage.json"}
    assert (out / "weights.bin").read_text() == "two"
    assert json.loads(report.read_text()) == {"run": "two"}
    assert not list(journal.glob("*.json"))
    assert sorted(p.name for p in out.parent.iterdir()) == ["stage"]
    assert sorted(p.name for p in report.parent.iterdir()) == ["stage.json"]


def test_recovery_is_idempotent_and_ignores_other_stages(tmp_path, journal):
    out, report = write_outputs(tmp_path, "one")
    other = tmp_path / "models" / "other"
    other.mkdir()
    stale = out.with_name(f".{out.name}.tmp-deadbeef")  # a run killed before its commit
    stale.mkdir()
    foreign = other.with_name(f".{other.name}.tmp-cafe0000")  # another stage's, running now
    foreign.mkdir()
    assert recover_outputs(journal, [out, report]) == []
    assert recover_outputs(journal, [out, report]) == []
    assert not stale.exists() and foreign.exists()
    assert (out / "weights.bin").read_text() == "one"
