"""Scale-out mode against one workspace: equal outputs, and what pulling and pushing cost.

The stages ingest → compress → partition → pretrain (default params unless ``--tiny``):

- **single workspace**: ``dvc repro pretrain`` in one workspace (its wall time);
- **scale-out**: each stage as a DAG task in scale-out mode (``runtime.workspace:
  per_task``), in a fresh clone, on two "workers" (ingest and compress on one, partition
  and pretrain on the other) that share only the git repository, a local DVC remote and
  the MLflow store; then the final task's dvc.lock;
- **scale-out, nothing changed**: the same tasks again as a second DAG run: every stage
  restored from the remote.

Reports each task's seconds for checkout, pull, repro and push, whether the outputs' hashes
equal the single workspace's, and the totals.

    .venv/bin/python benchmarks/scale_out.py [--tiny] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results_json import header, write_json  # noqa: E402 (sibling module)

from tests.conftest import TINY_OVERRIDES, make_workspace  # noqa: E402
from tests.e2e.test_scale_out import (  # noqa: E402
    STAGES_A,
    STAGES_B,
    out_hashes,
    repro_single_workspace,
    run_task,
)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny params")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/scale_out.json")
    args = parser.parse_args()
    import yaml

    from pipelines import scale_out

    overrides = TINY_OVERRIDES if args.tiny else None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        project = make_workspace(tmp / "project", overrides)
        remote, mlflow = tmp / "remote", f"sqlite:///{tmp / 'mlflow.db'}"
        remote.mkdir()
        os.environ.update(
            LEPTON_DVC_REMOTE_URL=str(remote),
            LEPTON_TASK_DIR=str(tmp / "worker-a"),
            MLFLOW_TRACKING_URI=mlflow,
        )
        print("single workspace ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        single = make_workspace(tmp / "single", overrides)
        reference = repro_single_workspace(single)
        single_seconds = time.perf_counter() - started

        runs = {}
        for key in ("scale-out", "scale-out-unchanged"):
            print(f"{key} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            for worker, stages in ((tmp / "worker-a", STAGES_A), (tmp / "worker-b", STAGES_B)):
                for stage in stages:
                    run_task(stage, key, worker, project, remote, mlflow)
            assert scale_out.finalize(str(project), key, STAGES_A + STAGES_B) == 0
            seconds = time.perf_counter() - started
            store = scale_out.RunStore(tmp / "worker-b" / key / "pretrain")
            tasks = json.loads(store.read(key, "tasks.json"))
            lock = yaml.safe_load(store.read(key, "dvc.lock"))
            runs[key] = {
                "seconds": round(seconds, 1),
                "outputs_equal_single_workspace": out_hashes(lock) == reference,
                "tasks": tasks,
                "pull_seconds": round(sum(t["pull_seconds"] for t in tasks.values()), 2),
                "push_seconds": round(sum(t["push_seconds"] for t in tasks.values()), 2),
                "checkout_seconds": round(sum(t["checkout_seconds"] for t in tasks.values()), 2),
                "stages_reproduced": [s for s, t in tasks.items() if t["reproduced"]],
            }
    payload = {
        **header("scale_out"),
        "params": "tiny (tests)" if args.tiny else "defaults",
        "stages": list(STAGES_A + STAGES_B),
        "single_workspace_seconds": round(single_seconds, 1),
        "runs": runs,
    }
    write_json(args.out, payload)
    print(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
