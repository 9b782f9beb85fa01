"""The compression goals: the champion against the fp32 ONNX export, on 8x8 and 28x28 digits.

Each case runs the whole pipeline (`dvc repro`, default params) in a fresh workspace and reads
what the optimize stage measured (size, latency at batch 1 and 256 interleaved in one process
on one thread, val accuracy) and what evaluate scored on the test rows. It writes every
variant's row and the champion's ratios against ``onnx_fp32``:

- ``digits8``: the bundled 8x8 digits;
- ``digits28``: the same digits as 28x28 IDX files (x3 bilinear, 2-pixel pad).

Goals: >= 10x smaller, faster at batch 1, >= 2x faster at batch 256, <= 0.5 points less
test accuracy.

    .venv/bin/python benchmarks/compression.py [--cases digits8] [--set optimize.student_width=0.25]
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

CASES = {"digits8": None, "digits28": "digits28"}
GOALS = {"size_ratio": 10.0, "speedup_b1": 1.0, "speedup_b256": 2.0, "accuracy_drop": 0.005}


def run_case(name: str, scratch: Path, sets: list[str]) -> dict:
    """One case through `dvc repro`: every variant's measurements and the champion's."""
    overrides = params_overrides(sets)
    if CASES[name] is not None:
        overrides["ingest"] = write_example(CASES[name], scratch / f"{name}-data")
    root = make_workspace(scratch / name, overrides)
    measured = run_measured([str(BIN / "dvc"), "repro"], root)
    optimize = json.loads((root / "reports/optimize.json").read_text())
    metrics = json.loads((root / "reports/metrics.json").read_text())
    variants = {}
    for variant, m in optimize["variants"].items():
        scored = metrics["variants"][variant]
        variants[variant] = {
            **{k: round(v, 4) for k, v in m.items()},
            "test_accuracy": round(scored["test_accuracy"], 4),
            "test_agreement": round(scored["test_agreement"], 4),
        }
    champion = metrics["chosen_variant"]
    row = variants.get(champion, {})
    reference = variants["onnx_fp32"]
    result = {
        "pipeline_seconds": measured["seconds"],
        "optimize_seconds": round(stage_seconds(root, "optimize"), 1),
        "champion": champion,
        "champion_vs_fp32": {
            "size_ratio": row.get("size_ratio"),
            "speedup_b1": row.get("speedup_b1"),
            "speedup_b256": row.get("speedup_b256"),
            "accuracy_drop": round(reference["test_accuracy"] - metrics["test_accuracy"], 4),
        },
        "variants": variants,
        "cpu": optimize["cpu"],
        "latency_threads": optimize["latency_threads"],
    }
    result["goals_met"] = goals_met(result["champion_vs_fp32"])
    return result


def stage_seconds(root: Path, stage: str) -> float:
    """Seconds the stage took, from the run log the CLI keeps in the workspace."""
    from pipelines import runlog

    key = runlog.latest_key(root)
    record = runlog.read_records(root, key).get(stage, {}) if key else {}
    return float(record.get("seconds", float("nan")))


def goals_met(champion: dict) -> dict[str, bool]:
    """Each goal of the issue against the champion's ratios."""
    return {
        "size": (champion["size_ratio"] or 0) >= GOALS["size_ratio"],
        "batch_1": (champion["speedup_b1"] or 0) > GOALS["speedup_b1"],
        "batch_256": (champion["speedup_b256"] or 0) >= GOALS["speedup_b256"],
        "accuracy": champion["accuracy_drop"] <= GOALS["accuracy_drop"] + 1e-9,
    }


def main() -> None:
    args = case_arguments(
        __doc__.splitlines()[0], CASES, REPO / "benchmarks/results/compression.json"
    )
    results = run_cases(
        args.cases, run_case, args.sets, summary=lambda result: result["champion_vs_fp32"]
    )
    write_json(
        args.out,
        {
            **header("compression"),
            "params": "default params.yaml" + (f" with {args.sets}" if args.sets else ""),
            "goals": GOALS,
            "cases": results,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
