"""Run records: what each stage of a pipeline run did, and the end-of-run summary table.

``lepton stage run`` appends one JSON line per stage to ``.lepton/runs/<key>.jsonl``; a stage
that DVC skipped (nothing changed) writes nothing and is shown as ``cached``.
The summary also says what data the run has against the previous run's
(:mod:`pipelines.data_history`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipelines.data_history import data_change
from pipelines.registry import STAGES, get_stage


def records_path(root: Path, key: str) -> Path:
    """The record file of pipeline run ``key``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return root / ".lepton" / "runs" / f"{safe}.jsonl"


def append_record(root: Path, key: str, record: dict[str, Any]) -> None:
    """Append one stage record (stage, status, seconds, error)."""
    path = records_path(root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps({"time": time.time(), **record}) + "\n")


def read_records(root: Path, key: str) -> dict[str, dict[str, Any]]:
    """The last record of each stage in run ``key``."""
    path = records_path(root, key)
    records: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["stage"]] = record
    return records


def latest_key(root: Path) -> str | None:
    """Key of the most recently written run record, if any."""
    runs = sorted((root / ".lepton" / "runs").glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    return runs[-1].stem if runs else None


def headline_value(root: Path, stage_name: str) -> tuple[str, Any]:
    """The stage's headline metric from its metrics file: (name, value or None)."""
    stage = get_stage(stage_name)
    if not stage.headline or not stage.metrics:
        return "", None
    path = root / stage.metrics[0]
    try:
        value: Any = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return stage.headline, None
    for part in stage.headline.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return stage.headline, value


def data_line(root: Path, key: str) -> str:
    """The summary's line on the data: new, the same, or the source unchanged."""
    change = data_change(root, key)
    if change is None:
        return "ingest: no data ingested yet"
    ingest = read_records(root, key).get("ingest")
    return "ingest: " + change.describe(ingest_ran=ingest is not None and ingest["status"] == "ran")


def summary_rows(root: Path, key: str) -> list[tuple[str, str, str, str]]:
    """Rows (stage, status, duration, headline) for every stage of the registry."""
    records = read_records(root, key)
    rows = []
    for stage in STAGES:
        record = records.get(stage.name)
        if record is None:
            status, duration = "cached", "-"
        else:
            status = record["status"]
            duration = f"{record['seconds']:.1f} s"
        name, value = headline_value(root, stage.name)
        if isinstance(value, float):
            shown = f"{name} = {value:.4f}"
        elif value is not None:
            shown = f"{name} = {value}"
        else:
            shown = "-"
        rows.append((stage.name, status, duration, shown))
    return rows


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)), line]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)
