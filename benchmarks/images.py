"""Quality and time of the whole pipeline beyond 8x8 digits (the real-images goals).

Each case runs `dvc repro` with default params (K=5, Dirichlet 0.5) in a fresh workspace and
reads the chosen model's test accuracy, the federated model's and the SSL kNN probe:

- ``digits8``: the bundled 8x8 digits;
- ``digits28``: the same digits as 28x28 IDX files (x3 bilinear, 2-pixel pad);
- ``rgb32``: the same digits as 32x32 RGB PNG class folders in random colours;
- ``digits8_labels10``: 8x8 with ``partition.labeled_fraction: 0.1``.

    .venv/bin/python benchmarks/images.py [--cases digits8,digits28] [--set federate.augment=true]
                                          [--out FILE.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from measured import case_arguments, params_overrides, run_cases, run_measured  # noqa: E402
from results_json import header, write_json  # noqa: E402 (sibling module)

from pipelines.data.examples import write_example  # noqa: E402
from tests.conftest import BIN, make_workspace  # noqa: E402

CASES = {
    "digits8": (None, {}),
    "digits28": ("digits28", {}),
    "rgb32": ("rgb32", {}),
    "digits8_labels10": (None, {"partition": {"labeled_fraction": 0.1}}),
}


def run_case(name: str, scratch: Path, extra: list[str]) -> dict:
    """One case through `dvc repro` (``extra``: ``section.key=value`` params for every case):
    seconds and the accuracies it reaches."""
    example, case_overrides = CASES[name]
    overrides = {k: dict(v) for k, v in case_overrides.items()}
    for section, values in params_overrides(extra).items():
        overrides.setdefault(section, {}).update(values)
    if example is not None:
        overrides["ingest"] = write_example(example, scratch / f"{name}-data")
    root = make_workspace(scratch / name, overrides)
    measured = run_measured([str(BIN / "dvc"), "repro"], root)
    metrics = json.loads((root / "reports/metrics.json").read_text())
    pretrain = json.loads((root / "reports/pretrain.json").read_text())
    ingest = json.loads((root / "reports/ingest.json").read_text())
    return {
        "seconds": measured["seconds"],
        "peak_rss_mb": measured["peak_rss_mb"],
        "image": [ingest["height"], ingest["width"], ingest.get("channels", 1)],
        "test_accuracy": metrics["test_accuracy"],
        "chosen_variant": metrics["chosen_variant"],
        "federated_test_accuracy": metrics["variants"]["federated"]["test_accuracy"],
        "pretrain_val_knn_accuracy": pretrain["val_knn_accuracy"],
        "pretrain_seconds": round(pretrain["seconds"], 1),
    }


def main() -> None:
    args = case_arguments(__doc__.splitlines()[0], CASES, REPO / "benchmarks/results/images.json")
    results = run_cases(args.cases, run_case, args.sets)
    payload = {
        **header("images"),
        "params": "default params.yaml" + (f" with {args.sets}" if args.sets else ""),
        "cases": results,
    }
    if "digits8" in results:
        base = results["digits8"]["seconds"]
        payload["seconds_vs_digits8"] = {
            name: round(case["seconds"] / base, 2) for name, case in results.items()
        }
    write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
