"""Time and peak memory of every stage against rows and image size, with growth exponents.

For each image kind (8x8 gray, 28x28 gray, 32x32 RGB) and row count (default 1k, 10k,
100k) it writes a synthetic contract table (the bundled digits at that size, each row
shifted by up to two pixels and given noise, colours per row for RGB), runs the whole
pipeline with `lepton stage run <stage>` one stage at a time under GNU time, and records
each stage's wall time and peak RSS. Training budgets are cut to one epoch / one round
(``BUDGET``) so the largest cells finish: the figures are the cost of one pass over the
data, which is what grows with rows. For each stage and kind it fits ``time ~ rows^k`` and
``rss ~ rows^k`` (least squares on the logs) and plots time against rows.

    .venv/bin/python benchmarks/scale.py [--rows 1000,10000,100000] [--kinds gray8,gray28,rgb32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from measured import run_measured  # noqa: E402 (sibling module)
from results_json import header, write_json  # noqa: E402 (sibling module)

from pipelines.data.examples import coloured_digits, digits_28x28  # noqa: E402
from pipelines.io import ImageTableWriter  # noqa: E402
from pipelines.registry import STAGE_NAMES  # noqa: E402
from tests.conftest import BIN, make_workspace  # noqa: E402

BUDGET = {
    "pretrain": {"epochs": 1},
    "federate": {"rounds": 1, "local_epochs": 1, "batch_size": 64},
    "quantum": {"epochs": 1, "train_samples": 2000, "score_on_aer": False},
    "optimize": {"latency_repeats": 3},
    "register": {"accuracy_floor": 0.0},
}


def base_images(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 images (n, c, h, w), labels)`` of the digits as ``kind``."""
    if kind == "gray28":
        images, labels = digits_28x28()
        return images[:, None], labels
    if kind == "rgb32":
        images, labels = coloured_digits(32)
        return images.transpose(0, 3, 1, 2), labels
    from sklearn.datasets import load_digits

    data = load_digits()
    return np.rint(data.images * 255 / 16).astype(np.uint8)[:, None], data.target


def write_table(path: Path, kind: str, rows: int, seed: int = 0) -> None:
    """``rows`` shifted, noisy copies of the digits as ``kind``, as a uint8 contract table."""
    images, labels = base_images(kind)
    c, h, w = images.shape[1:]
    rng = np.random.default_rng(seed)
    padded = np.pad(images, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="edge")
    with ImageTableWriter(path, c, (h, w), 10, pixel_dtype="uint8") as writer:
        for start in range(0, rows, 20_000):
            n = min(20_000, rows - start)
            pick = rng.integers(0, len(images), n)
            dy, dx = rng.integers(0, 5, (2, n))
            batch = np.empty((n, c, h, w), np.uint8)
            for row in range(n):
                y, x = dy[row], dx[row]
                batch[row] = padded[pick[row], :, y : y + h, x : x + w]
            noise = rng.integers(-8, 9, batch.shape)
            writer.write(
                np.clip(batch.astype(np.int16) + noise, 0, 255).astype(np.uint8), labels[pick]
            )


def run_pipeline(root: Path) -> dict[str, dict]:
    """Every stage once, in order, each under GNU time: seconds and peak RSS."""
    stages = {}
    for stage in STAGE_NAMES:
        measured = run_measured([str(BIN / "lepton"), "stage", "run", stage], root)
        stages[stage] = {k: measured[k] for k in ("seconds", "peak_rss_mb")}
    return stages


def growth_exponent(rows: list[int], values: list[float]) -> float:
    """``k`` of the least-squares fit ``log value = k log rows + b``."""
    return float(np.polyfit(np.log(rows), np.log(np.maximum(values, 1e-9)), 1)[0])


def plot(results: dict, rows: list[int], path: Path) -> None:
    """Seconds against rows, one panel per image kind, one line per stage (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results)
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for stage in STAGE_NAMES:
            seconds = [results[kind][str(n)][stage]["seconds"] for n in rows]
            ax.plot(rows, seconds, marker="o", label=stage)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(kind)
        ax.set_xlabel("rows")
        ax.set_ylabel("seconds")
    axes[0][-1].legend(fontsize="small", bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000,10000,100000")
    parser.add_argument("--kinds", default="gray8,gray28,rgb32")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/scale.json")
    args = parser.parse_args()
    rows = [int(n) for n in args.rows.split(",")]
    kinds = args.kinds.split(",")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for kind in kinds:
            results[kind] = {}
            for n in rows:
                source = Path(scratch) / f"{kind}-{n}.parquet"
                write_table(source, kind, n)
                overrides = {"ingest": {"source": "parquet", "path": str(source)}, **BUDGET}
                root = make_workspace(Path(scratch) / f"ws-{kind}-{n}", overrides)
                results[kind][str(n)] = run_pipeline(root)
                total = sum(s["seconds"] for s in results[kind][str(n)].values())
                print(f"{kind} {n} rows: {total:.0f} s", flush=True)
    exponents = {
        kind: {
            stage: {
                "seconds": round(
                    growth_exponent(rows, [results[kind][str(n)][stage]["seconds"] for n in rows]),
                    2,
                ),
                "peak_rss_mb": round(
                    growth_exponent(
                        rows, [results[kind][str(n)][stage]["peak_rss_mb"] for n in rows]
                    ),
                    2,
                ),
            }
            for stage in STAGE_NAMES
        }
        for kind in kinds
    }
    plot_path = args.out.with_suffix(".png")
    plot(results, rows, plot_path)
    payload = {
        **header("scale"),
        "rows": rows,
        "budget": BUDGET,
        "results": results,
        "growth_exponents": exponents,
        "plot": plot_path.name,
    }
    write_json(args.out, payload)
    print(f"wrote {args.out} and {plot_path}")


if __name__ == "__main__":
    main()
