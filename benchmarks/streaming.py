"""Data larger than memory: a synthetic table through ingest → compress → partition.

Writes a contract Parquet table of ``--rows`` 28x28 uint8 images (default 1,000,000, about
0.8 GB of raw pixels): the bundled digits at 28x28, each row shifted by up to 2 pixels and
given sensor noise, so rows differ as real images do. Then runs `lepton stage run ingest`,
`compress` and `partition` on it with the default params, each in its own process, and
records each stage's wall time, peak RSS (GNU time's maximum resident set size) and
throughput in raw MB/s (rows x 784 bytes).

    .venv/bin/python benchmarks/streaming.py [--rows 1000000] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from measured import run_measured  # noqa: E402 (sibling module)
from results_json import header, write_json  # noqa: E402 (sibling module)

from pipelines.data.examples import digits_28x28  # noqa: E402
from pipelines.io import ImageTableWriter  # noqa: E402
from tests.conftest import BIN, make_workspace  # noqa: E402

STAGES = ("ingest", "compress", "partition")


def write_synthetic(path: Path, rows: int, batch: int = 50_000, seed: int = 0) -> None:
    """``rows`` shifted, noisy 28x28 digits as a uint8 contract table, written in batches."""
    digits, labels = digits_28x28()
    rng = np.random.default_rng(seed)
    padded = np.pad(digits, ((0, 0), (2, 2), (2, 2)))
    with ImageTableWriter(path, 1, (28, 28), 10, pixel_dtype="uint8") as writer:
        for start in range(0, rows, batch):
            n = min(batch, rows - start)
            pick = rng.integers(0, len(digits), n)
            dy, dx = rng.integers(0, 5, (2, n))
            images = np.empty((n, 28, 28), np.uint8)
            for shift_y in range(5):
                for shift_x in range(5):
                    sel = (dy == shift_y) & (dx == shift_x)
                    images[sel] = padded[pick[sel], shift_y : shift_y + 28, shift_x : shift_x + 28]
            noise = rng.integers(0, 16, images.shape, dtype=np.uint8)
            images = np.where(images > 0, np.minimum(images.astype(np.int16) + noise, 255), 0)
            writer.write(images.astype(np.uint8)[:, None], labels[pick])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/streaming.json")
    args = parser.parse_args()
    raw_mb = args.rows * 28 * 28 / 1e6
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "synthetic.parquet"
        start = time.perf_counter()
        write_synthetic(source, args.rows)
        print(
            f"wrote {args.rows} rows ({raw_mb:.0f} MB raw uint8) in "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )
        root = make_workspace(
            Path(scratch) / "ws", {"ingest": {"source": "parquet", "path": str(source)}}
        )
        stages = {}
        for stage in STAGES:
            measured = run_measured([str(BIN / "lepton"), "stage", "run", stage], root)
            stages[stage] = {k: measured[k] for k in ("seconds", "peak_rss_mb")}
            stages[stage]["raw_mb_per_s"] = round(raw_mb / stages[stage]["seconds"], 1)
            print(f"{stage}: {stages[stage]}", flush=True)
        sizes = {
            "source_file_mb": round(source.stat().st_size / 1e6, 1),
            "raw_table_mb": round((root / "data/raw/table.parquet").stat().st_size / 1e6, 1),
            "compressed_table_mb": round(
                (root / "data/compressed/table.parquet").stat().st_size / 1e6, 1
            ),
        }
    payload = {
        **header("streaming"),
        "rows": args.rows,
        "image": [28, 28, 1],
        "raw_uint8_mb": round(raw_mb, 1),
        "stages": stages,
        "peak_rss_mb": max(s["peak_rss_mb"] for s in stages.values()),
        "files": sizes,
    }
    write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
