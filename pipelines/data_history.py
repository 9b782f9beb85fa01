"""The data each pipeline run has, against the previous run's: new, unchanged or first.

Every pipeline run that looks at its data (a stage that finishes, the end-of-run summary)
records the rows and content sha256 of ``data/raw`` in ``.lepton/data-history.jsonl``, one
line per run. :func:`data_change` compares a run's data with the latest other run's; the
summary table and the MLflow parent run report it. Standard library only.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RAW_MANIFEST = "data/raw/manifest.json"  # written by the ingest stage
DATA_HISTORY = ".lepton/data-history.jsonl"


@dataclass(frozen=True)
class DataChange:
    """The data of one pipeline run against the previous run's.

    ``status`` is ``new`` (other content than the previous run), ``unchanged`` (same
    content) or ``first`` (no earlier run recorded).
    """

    status: str
    rows: int
    sha256: str
    previous_rows: int | None = None
    previous_sha256: str | None = None

    def describe(self, ingest_ran: bool) -> str:
        """One line for the summary: what ingest saw, against the previous run."""
        now = f"{self.rows} rows, sha256 {self.sha256[:12]}"
        if self.status == "new":
            return (
                f"new data: {now} (previous run: {self.previous_rows} rows, "
                f"sha256 {str(self.previous_sha256)[:12]})"
            )
        if self.status == "first":
            return f"first data: {now}"
        if ingest_ran:
            return f"same data as the previous run: {now}"
        return f"source unchanged: {now}"

    def tags(self) -> dict[str, str]:
        """Tags for the MLflow parent run of the pipeline run."""
        tags = {
            "lepton.data_status": self.status,
            "lepton.data_rows": str(self.rows),
            "lepton.data_sha256": self.sha256,
        }
        if self.previous_sha256 is not None:
            tags["lepton.previous_data_rows"] = str(self.previous_rows)
            tags["lepton.previous_data_sha256"] = self.previous_sha256
        return tags


def _history(text: str) -> list[dict[str, Any]]:
    entries = []
    for line in text.splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:  # a line cut short by a kill: skip it
            continue
    return entries


def data_change(root: Path, key: str) -> DataChange | None:
    """What data pipeline run ``key`` has (``data/raw``), against the run before it.

    The first call for a run records its data in the history; later calls for the same run
    give the same answer. None when there is no ingested data yet.
    """
    try:
        manifest = json.loads((root / RAW_MANIFEST).read_text())
        rows, sha256 = int(manifest["rows"]), str(manifest["content_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = root / DATA_HISTORY
    text = path.read_text() if path.is_file() else ""
    history = _history(text)
    earlier = [e for e in history if e.get("pipeline_run") != key]
    mine = [e for e in history if e.get("pipeline_run") == key]
    if not mine or mine[-1].get("sha256") != sha256:
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"pipeline_run": key, "time": time.time(), "rows": rows, "sha256": sha256}
        cut = bool(text) and not text.endswith("\n")
        with path.open("a") as handle:
            handle.write(("\n" if cut else "") + json.dumps(entry) + "\n")
    if not earlier:
        return DataChange("first", rows, sha256)
    previous = earlier[-1]
    status = "unchanged" if previous.get("sha256") == sha256 else "new"
    return DataChange(status, rows, sha256, previous.get("rows"), previous.get("sha256"))
