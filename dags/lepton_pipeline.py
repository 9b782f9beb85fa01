"""
### Lepton pipeline

ingest → compress → partition → pretrain → federate → quantum → optimize → evaluate → register

One task per stage of `pipelines/registry.py`. Each task runs `dvc repro --single-item <stage>`
in the workspace (through `python -m pipelines.stage_task`), so a scheduled run skips, in
seconds, every stage whose inputs, code and params did not change. One `dvc status` after
ingest lets the tasks that it found up to date skip without starting DVC.
Settings come from the `runtime:` section of `params.yaml`: schedule, retries, and
`executor: local | docker` (GPU stages in a DockerOperator).

The ingest task first runs DVC's `ingest_source` stage: it fingerprints the source files
(a changed, added or removed file re-runs ingest and what depends on it) and validates all of
params.yaml. A bad params.yaml does not hide the DAG: it falls back to default runtime
settings, says so below, and its first task fails naming the key.

Tasks run one at a time (`max_active_tasks=1`): DVC holds a lock on the workspace while it
reproduces a stage. With `runtime.workspace: per_task` (scale-out) each task works in a clean
checkout and exchanges data through the DVC remote, so up to `runtime.max_active_tasks` run
at once (quantum beside optimize) and a final `dvc_lock` task writes the run's dvc.lock.
GPU stages go to `runtime.gpu_pool` / `runtime.gpu_queue` when set.
The MLflow parent run of a DAG run is tagged with its run id.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from pipelines.orchestration import DAG_ID, dag_settings, make_final_lock_task, make_stage_task
from pipelines.registry import STAGES, upstream_of

settings = dag_settings()

with DAG(
    dag_id=DAG_ID,
    description=(
        "ingest → compress → partition → pretrain → federate → quantum → optimize → evaluate"
        " → register"
    ),
    schedule=settings.runtime.schedule,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    max_active_tasks=settings.max_active_tasks,
    tags=["lepton", "ml", "federated", "dvc", "mlflow"],
    doc_md=__doc__ + settings.doc_note(),
    default_args={
        "owner": "lepton",
        "retries": settings.runtime.retries,
        "retry_delay": settings.retry_delay,
        "retry_exponential_backoff": True,
    },
) as dag:
    tasks = {stage.name: make_stage_task(stage, settings) for stage in STAGES}
    for stage in STAGES:
        for upstream in upstream_of(stage.name):
            tasks[upstream] >> tasks[stage.name]
    if settings.scale_out:
        list(tasks.values()) >> make_final_lock_task(settings)
