"""The ``lepton`` command: run the pipeline, one stage, or the tooling around them."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from importlib import import_module
from pathlib import Path

import typer

from pipelines.errors import LeptonError

app = typer.Typer(
    help="Lepton pipelines: ingest → compress → partition → pretrain → federate → quantum → "
    "optimize → evaluate → register, through Airflow, DVC and MLflow.",
    no_args_is_help=True,
    add_completion=False,
)
stage_app = typer.Typer(help="Run or list single stages.", no_args_is_help=True)
dvc_app = typer.Typer(help="DVC helpers.", no_args_is_help=True)
site_app = typer.Typer(help="Data-site commands: join a federation.", no_args_is_help=True)
app.add_typer(stage_app, name="stage")
app.add_typer(dvc_app, name="dvc")
app.add_typer(site_app, name="site")
federation_app = typer.Typer(
    help="Server-side federation tools: TLS certificates, SuperNode keys.", no_args_is_help=True
)
app.add_typer(federation_app, name="federation")
workspace_app = typer.Typer(
    help="Run workspaces (.lepton/workspaces/<run>): `lepton run --isolated` and "
    "`runtime.workspace: per_run` make them.",
    no_args_is_help=True,
)
app.add_typer(workspace_app, name="workspace")
scale_out_app = typer.Typer(
    help="Scale-out mode (runtime.workspace: per_task): runs kept in the DVC remote.",
    no_args_is_help=True,
)
app.add_typer(scale_out_app, name="scale-out")

log = logging.getLogger("lepton")
MARK = "[lepton]"


def _root() -> Path:
    return Path(os.environ.get("LEPTON_WORKSPACE") or Path.cwd()).resolve()


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("alembic", "lightning", "pytorch_lightning", "lightning.pytorch", "qiskit"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def run_stage(name: str, root: Path, overrides: list[str] | None = None) -> dict[str, float]:
    """Validate params, run stage ``name`` under its MLflow child run, return its metrics."""
    from pipelines import tracking
    from pipelines.atomic import recover_outputs, use_journal
    from pipelines.checkpoints import (
        CHECKPOINT_STORE_ENV,
        clear_checkpoints,
        input_key,
        use_input_key,
    )
    from pipelines.config import load_params
    from pipelines.io import Paths
    from pipelines.registry import get_stage

    stage = get_stage(name)
    params = load_params(root / "params.yaml", overrides)
    module = import_module(stage.entry_point.split(":")[0])
    journals = root / ".lepton" / "commits"
    recover_outputs(journals, [root / out for out in (*stage.outs, *stage.metrics)])
    use_journal(journals)
    mirror = None
    if run_key := os.environ.get(CHECKPOINT_STORE_ENV):  # scale-out: retries on any worker
        from pipelines.scale_out import remote_checkpoints

        mirror = remote_checkpoints(root, run_key)
    use_input_key(name, input_key(root, stage, params, data_content=mirror is not None), mirror)
    with tracking.stage_run(name, root, params.common.mlflow_experiment) as tracker:
        section = getattr(params, name).model_dump(mode="json")
        shared = {s: getattr(params, s).model_dump(mode="json") for s in stage.shared_params}
        tracker.log_params(
            {"common": params.common.model_dump(mode="json"), name: section, **shared}
        )
        metrics = module.run(params, Paths(root), tracker)
        tracker.log_metrics(metrics)
    clear_checkpoints(root, name)  # the outputs hold the result now
    return metrics


def _die_of_sigterm() -> None:
    """End this process as SIGTERM ends one without a handler. Lightning turns a SIGTERM
    during a fit into ``SystemExit(None)`` at its next step, which would end the stage with
    exit code 0 and let DVC take the previous outputs for the new ones."""
    import signal

    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


@stage_app.command("run")
def stage_run(
    name: str = typer.Argument(..., help="Stage name, as in `lepton stage list`."),
    set_: list[str] = typer.Option([], "--set", help="Override a param: section.key=value."),
) -> None:
    """Run one stage now (this is the command dvc.yaml runs for each stage)."""
    from pipelines import runlog, stage_runner, tracking
    from pipelines.registry import STAGE_NAMES

    _setup_logging()
    if name not in STAGE_NAMES:
        _fail(f"unknown stage '{name}'; known stages: {', '.join(STAGE_NAMES)}", 2)
    root = _root()
    key = tracking.pipeline_run_key()
    os.environ["LEPTON_PIPELINE_RUN"] = key
    forked = ", forked by the stage runner" if stage_runner.FORKED_BY_RUNNER else ""
    log.info("%s stage %s started (pipeline run %s%s)", MARK, name, key, forked)
    start = time.perf_counter()
    try:
        metrics = run_stage(name, root, set_)
    except LeptonError as exc:
        seconds = time.perf_counter() - start
        runlog.append_record(
            root, key, {"stage": name, "status": "failed", "seconds": seconds, "error": str(exc)}
        )
        log.error("%s stage %s failed after %.1f s", MARK, name, seconds)
        _fail(str(exc))
    except Exception as exc:
        seconds = time.perf_counter() - start
        runlog.append_record(
            root, key, {"stage": name, "status": "failed", "seconds": seconds, "error": repr(exc)}
        )
        raise
    except SystemExit as exc:
        if type(exc).__name__ != "SIGTERMException":
            raise
        seconds = time.perf_counter() - start
        runlog.append_record(
            root, key, {"stage": name, "status": "failed", "seconds": seconds, "error": "SIGTERM"}
        )
        log.error("%s stage %s stopped by SIGTERM after %.1f s", MARK, name, seconds)
        _die_of_sigterm()
    seconds = time.perf_counter() - start
    runlog.append_record(root, key, {"stage": name, "status": "ran", "seconds": seconds})
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, int | float))
    log.info("%s stage %s done in %.1f s: %s", MARK, name, seconds, shown)


@stage_app.command("runner")
def stage_runner_command(
    socket_path: Path = typer.Argument(..., help="Unix socket to listen on (a short path)."),
) -> None:
    """Keep a warm process that runs `lepton stage run` by forking (no start-up imports).

    `lepton run` starts one for its run. For your own `dvc repro`: start it, then
    `export LEPTON_STAGE_RUNNER=SOCKET_PATH` where DVC runs. Stops on SIGTERM or Ctrl-C.
    """
    from pipelines.stage_runner import serve

    serve(str(socket_path))


@stage_app.command("list")
def stage_list() -> None:
    """List the stages in pipeline order with their upstream stages."""
    from pipelines.registry import STAGES, upstream_of
    from pipelines.runlog import format_table

    rows = [
        (
            s.name,
            ", ".join(upstream_of(s.name)) or "-",
            "yes" if s.needs_gpu else "no",
            s.description,
        )
        for s in STAGES
    ]
    typer.echo(format_table(rows, ("stage", "upstream", "gpu", "what it does")))


@dvc_app.command("render")
def dvc_render(
    check: bool = typer.Option(False, "--check", help="Only check that dvc.yaml is up to date."),
) -> None:
    """Write dvc.yaml from pipelines/registry.py (or check it is current)."""
    from pipelines.dvc_render import render_dvc_yaml, write_dvc_yaml

    root = _root()
    if check:
        current = (root / "dvc.yaml").read_text() if (root / "dvc.yaml").is_file() else ""
        if current != render_dvc_yaml():
            _fail("dvc.yaml differs from the registry; run `lepton dvc render`")
        typer.echo("dvc.yaml is up to date")
        return
    typer.echo(f"wrote {write_dvc_yaml(root)}")


@dvc_app.command("fingerprint-source")
def fingerprint_source() -> None:
    """Validate params.yaml and fingerprint ingest's source files (the ingest_source stage).

    Writes data/source.json (paths, sizes, sha256 of what ingest reads); ingest depends on
    it, so `dvc repro` re-runs ingest exactly when the source changed.
    """
    from pipelines.config import load_params
    from pipelines.data.source_files import write_fingerprint
    from pipelines.registry import SOURCE_FINGERPRINT

    root = _root()
    path = root / SOURCE_FINGERPRINT
    try:
        params = load_params(root / "params.yaml")
        fingerprint = write_fingerprint(params.ingest, root, path)
    except LeptonError as exc:
        _fail(str(exc))
    files = fingerprint["files"]
    size = sum(f["size"] for f in files)
    typer.echo(
        f"source {fingerprint['source']}: {len(files)} file(s), {size / 1e6:.1f} MB -> "
        f"{path.relative_to(root)}"
    )


@app.command("example-data")
def example_data(
    name: str = typer.Argument(..., help="digits28 (IDX), rgb32 (PNG folders) or rgb32-npz."),
    folder: Path = typer.Argument(..., help="Folder to write into (created)."),
) -> None:
    """Write an example image set made from the bundled digits and print its ingest params."""
    from pipelines.data.examples import EXAMPLES, write_example

    if name not in EXAMPLES:
        _fail(f"unknown example '{name}'; known: {', '.join(EXAMPLES)}", 2)
    ingest = write_example(name, folder.resolve())
    typer.echo("\n".join(f"--set ingest.{key}={value}" for key, value in ingest.items()))


def _shape(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        _fail(f"{what}: expected numbers like 28,28 (got {text!r})", 2)


@site_app.command("join")
def site_join(
    superlink: str = typer.Option(..., help="The SuperLink's address, host:port."),
    name: str = typer.Option(..., help="This site's name (unique in the federation)."),
    source: str = typer.Option(..., help="Format, as ingest.source: parquet csv npz idx images."),
    path: str = typer.Option(..., help="The site's data file or folder."),
    labels_path: str = typer.Option(None, help="idx only: the labels file."),
    label_column: str = typer.Option("label", help="parquet / csv: the label column."),
    image_shape: str = typer.Option(None, help="Flat rows: H,W or H,W,3 (as ingest.image_shape)."),
    num_classes: int = typer.Option(None, help="The federation's class count (default: max+1)."),
    resize: str = typer.Option(None, help="Resize every image to H,W (as ingest.resize)."),
    holdout_fraction: float = typer.Option(0.2, help="Rows kept back to score the final model."),
    seed: int = typer.Option(0, help="Seed of the held-out split."),
    work_dir: Path = typer.Option(Path("lepton-site"), help="Where the site's prepared files go."),
    root_certificates: Path = typer.Option(None, help="CA certificate (PEM) of the SuperLink."),
    insecure: bool = typer.Option(False, help="No TLS (trusted test networks only)."),
    auth_key: Path = typer.Option(None, help="SuperNode private key (OpenSSH EC), if registered."),
    port: int = typer.Option(None, help="Port of the SuperNode's local API (default 9094)."),
    check: bool = typer.Option(False, help="Validate and prepare the data, then stop."),
    warm: bool = typer.Option(
        True, help="Keep torch and the rows loaded in a worker between Flower messages."
    ),
    poll_seconds: float = typer.Option(
        0.5, help="Longest wait of the SuperNode between looks for a message (Flower's: 3)."
    ),
    stock_supernode: bool = typer.Option(
        False,
        help="Run Flower's own flower-supernode (3 s polls, a new ClientApp process "
        "per message) instead of Lepton's runtime of it.",
    ),
) -> None:
    """Validate this site's data, prepare it and start a Flower SuperNode on it.

    The data is read and checked exactly as `lepton stage run ingest` would (a bad file
    stops here, naming file, field and row); only model updates, counts and metrics leave
    the site (docs/federated.md).
    """
    from pipelines.config import IngestParams
    from pipelines.federated.flower_deploy import flower_bin
    from pipelines.federated.site import (
        SiteFiles,
        prepare_site,
        run_site,
        site_node_config,
        supernode_argv,
        worker_socket,
    )

    _setup_logging()
    try:
        ingest = IngestParams(
            source=source,
            path=path,
            labels_path=labels_path,
            label_column=label_column,
            image_shape=_shape(image_shape, "--image-shape"),
            num_classes=num_classes,
            resize=_shape(resize, "--resize"),
        )
        files = SiteFiles(work_dir.resolve())
        node_config = site_node_config(name, files)
        socket_path = worker_socket(files) if warm else None
        argv = supernode_argv(
            flower_bin(),
            superlink,
            {**node_config, **({"worker": str(socket_path)} if socket_path else {})},
            root_certificates,
            insecure,
            auth_key,
            port,
            None if stock_supernode else poll_seconds,
        )
        manifest = prepare_site(ingest, name, files.folder, holdout_fraction, seed)
    except LeptonError as exc:
        _fail(str(exc))
    except ValueError as exc:  # pydantic: a bad option value, named
        _fail(str(exc).split("\n", 1)[-1].strip(), 2)
    typer.echo(
        f"site {name}: {manifest['rows']} rows to train on, {manifest['holdout_rows']} held "
        f"out, {manifest['image_shape'][0]}x{manifest['image_shape'][1]}x"
        f"{manifest['channels']}, classes {manifest['classes_present']} -> {files.folder}"
    )
    if check:
        return
    if not Path(argv[0]).exists():
        _fail(f"{argv[0]} not found (make flower-setup, or $LEPTON_FLOWER_BIN)")
    typer.echo(f"starting the SuperNode: connecting to {superlink}", err=True)
    raise typer.Exit(run_site(argv, node_config, socket_path, files.folder))


@federation_app.command("certificates")
def federation_certificates(
    out: Path = typer.Option(..., help="Folder to write ca.crt, superlink.crt and keys into."),
    host: list[str] = typer.Option(..., help="SuperLink host name or IP the sites dial."),
    days: int = typer.Option(365, help="Validity in days."),
) -> None:
    """Make a CA and a SuperLink TLS certificate it signed (ca.crt goes to every site)."""
    from pipelines.federated.certificates import make_certificates

    files = make_certificates(out, host, days)
    typer.echo(
        f"CA {files.ca_certificate}; SuperLink certificate {files.certificate}, key {files.key}"
    )


@federation_app.command("node-key")
def federation_node_key(
    path: Path = typer.Argument(..., help="Private key file to write (path.pub: public key)."),
) -> None:
    """Make a SuperNode's EC key pair (OpenSSH); register path.pub with flwr supernode register."""
    from pipelines.federated.certificates import make_supernode_key

    private, public = make_supernode_key(path)
    typer.echo(f"private key {private} (stays at the site); public key {public}")


@app.command("params")
def params_check(
    set_: list[str] = typer.Option([], "--set", help="Override a param: section.key=value."),
) -> None:
    """Validate params.yaml (with overrides) and print the resolved values."""
    from pipelines.config import load_params

    try:
        params = load_params(_root() / "params.yaml", set_)
    except LeptonError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(params.model_dump(mode="json"), indent=2))


def airflow_command(args: list[str], root: Path) -> list[str]:
    """Argv for the workspace's airflow executable."""
    return [str(Path(sys.executable).parent / "airflow"), *args]


def _airflow_env(root: Path) -> dict[str, str]:
    from pipelines.orchestration import airflow_env

    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, **airflow_env(root), "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}


def ensure_airflow_db(root: Path, seed_from: Path | None = None) -> None:
    """Create or upgrade Airflow's SQLite metadata database in ``.airflow/``.

    ``airflow db migrate`` costs seconds even when there is nothing to do, so a stamp next
    to the database records the Airflow version it was last migrated by; the migration runs
    again only for a new database or another Airflow version. A new database is copied
    (SQLite's online backup) from workspace ``seed_from``'s when that one is up to date.
    """
    import sqlite3
    from importlib.metadata import version

    env = _airflow_env(root)
    home = Path(env["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    stamp, current = home / ".migrated-by", f"apache-airflow-core {version('apache-airflow-core')}"
    if (home / "airflow.db").is_file() and stamp.is_file() and stamp.read_text() == current:
        return
    seed = seed_from / ".airflow" if seed_from else None
    if seed and (seed / "airflow.db").is_file() and (seed / ".migrated-by").is_file():
        if (seed / ".migrated-by").read_text() == current:
            with sqlite3.connect(seed / "airflow.db") as source:
                with sqlite3.connect(home / "airflow.db") as copy:
                    source.backup(copy)
            stamp.write_text(current)
            return
    done = subprocess.run(
        airflow_command(["db", "migrate"], root), env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        _fail("airflow db migrate failed (output above)")
    stamp.write_text(current)


AIRFLOW_SUFFIX = re.compile(r"\s+\[airflow\.[^\]]*\]\s+loc=\S+\s*$")
STAGE_LOG = re.compile(r"\b(?:INFO|WARNING|ERROR) pipelines\.stages\.(\w+): (.*)$")


def progress_line(line: str) -> str | None:
    """What the terminal shows of one line of a pipeline run's log, or None to hide it.

    Shown: stage start / end marks, a stage's own progress (epochs, rounds), DVC's stage
    lines and errors; Airflow's prefix and ``[logger] loc=file:line`` suffix are dropped.
    """
    text = AIRFLOW_SUFFIX.sub("", line.rstrip())
    if MARK in text:
        return text[text.find(MARK) :]
    if found := STAGE_LOG.search(text):
        return f"  {found.group(1)}: {found.group(2)}"
    if "error:" in text or "Stage '" in text:
        return text
    return None


def stream(argv: list[str], env: dict[str, str], cwd: Path, log_file: Path) -> int:
    """Run ``argv``; keep its full output in ``log_file``, echo pipeline progress lines.
    A ``dvc`` command that fails on DVC's lock (a ``dvc`` started by hand) waits and is tried
    again (:func:`pipelines.workspaces.run_dvc`)."""
    from pipelines.workspaces import run_dvc

    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a") as sink:

        def show(line: str) -> None:
            sink.write(line + "\n")
            sink.flush()
            shown = progress_line(line)
            if shown is not None:
                typer.echo(shown)

        if Path(argv[0]).name == "dvc":
            return run_dvc(argv, cwd, env, show)
        process = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None
        for line in process.stdout:
            show(line.rstrip("\n"))
        return process.wait()


@app.command("run")
def run_pipeline(
    set_: list[str] = typer.Option(
        [],
        "--set",
        help="Write section.key=value into params.yaml, then run (like `dvc exp run -S`).",
    ),
    via: str = typer.Option(
        "airflow", help="airflow: `airflow dags test` of the DAG; dvc: `dvc repro`."
    ),
    isolated: bool = typer.Option(
        False,
        "--isolated",
        help="Run in a workspace of its own (.lepton/workspaces/<run>), with --set written "
        "there: this workspace and its params.yaml are not touched, so the run goes side by "
        "side with others. The DVC cache, DVC remote and MLflow store are shared.",
    ),
) -> None:
    """Run the whole pipeline once and print a table of what each stage did.

    In this workspace, the run holds the workspace's lock from start to end: another
    ``lepton run`` or DAG task here waits for it (and says so) instead of failing on DVC's
    lock. With ``--isolated`` it needs no lock.
    """
    from pipelines import workspaces
    from pipelines.config import load_params

    root = _root()
    if via not in ("airflow", "dvc"):
        _fail("--via must be 'airflow' or 'dvc'", 2)
    try:
        load_params(root / "params.yaml", set_)
    except LeptonError as exc:
        _fail(str(exc))
    key = f"run-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    if isolated:
        typer.echo(f"Preparing the run's own workspace (pipeline run {key}) ...")
        try:
            work = workspaces.create_run_workspace(root, key, set_)
        except LeptonError as exc:
            _fail(str(exc))
        typer.echo(f"run workspace: {work}" + (f" ({', '.join(set_)})" if set_ else ""))
        extra = workspaces.run_environment(root)
        _run_and_report(work, key, via, extra, seed_airflow=root)
        return
    with workspaces.workspace_lock(root, f"lepton run {key}", typer.echo):
        if set_:
            from pipelines.config import write_overrides

            try:
                write_overrides(root / "params.yaml", set_)
            except LeptonError as exc:
                _fail(str(exc))
            typer.echo(f"params.yaml updated: {', '.join(set_)}")
        _run_and_report(root, key, via, workspaces.locked_environment(root))


def _stage_runner(work: Path, env: dict[str, str], log_file: Path):
    """The warm stage runner of a run in ``work`` (``runtime.stage_runner``), as a context
    that yields the variables pointing its stages to it: the runner that ``env``'s
    ``LEPTON_STAGE_RUNNER`` names when one answers there (one started for a shell, an
    Airflow scheduler or a test session), else one started for the block; ``{}`` when the
    setting is off."""
    import contextlib

    from pipelines.config import load_params
    from pipelines.stage_runner import RUNNER_ENV, answers, running

    if not load_params(work / "params.yaml").runtime.stage_runner:
        return contextlib.nullcontext({})
    if (existing := env.get(RUNNER_ENV)) and answers(existing):
        return contextlib.nullcontext({RUNNER_ENV: existing})
    return running(work, env, log_file)


def _run_and_report(
    work: Path, key: str, via: str, extra_env: dict[str, str], seed_airflow: Path | None = None
) -> None:
    """Run the pipeline in workspace ``work`` as run ``key`` and print its summary table;
    exits non-zero when a stage failed."""
    from pipelines import runlog

    env = {**_airflow_env(work), **extra_env, "LEPTON_PIPELINE_RUN": key}
    log_file = work / ".lepton" / "logs" / f"{key}.log"
    start = time.perf_counter()
    if via == "airflow":
        typer.echo("Preparing Airflow metadata (SQLite in .airflow/) ...")
        ensure_airflow_db(work, seed_from=seed_airflow)
        typer.echo(f"Running DAG lepton_pipeline once (pipeline run {key}); full log: {log_file}")
        conf = json.dumps({"pipeline_run": key, "workspace": "shared"})
        argv = airflow_command(["dags", "test", "lepton_pipeline", "-c", conf], work)
    else:
        typer.echo(f"Running `dvc repro` (pipeline run {key}); full log: {log_file}")
        argv = [str(Path(sys.executable).parent / "dvc"), "repro"]
    with _stage_runner(work, env, log_file.with_name(f"{key}.stage-runner.log")) as runner_env:
        code = stream(argv, {**env, **runner_env}, work, log_file)
    rows = runlog.summary_rows(work, key)
    typer.echo("")
    typer.echo(runlog.format_table(rows, ("stage", "status", "duration", "headline metric")))
    typer.echo(runlog.data_line(work, key))
    typer.echo(f"\nwall time {time.perf_counter() - start:.0f} s")
    failed = [r[0] for r in rows if r[1] == "failed"]
    if failed and code == 0:
        code = 1  # airflow dags test may exit 0 although a task failed
    if code != 0:
        _fail(
            f"pipeline run {key} failed (stages: {', '.join(failed) or 'see log'}); log: {log_file}"
        )
    typer.echo(
        "\nLook further:\n"
        "  make mlflow-ui        MLflow UI: parent run with a child per stage, registered model\n"
        "  dvc metrics show      every stage's metrics;  dvc plots show  for the plots\n"
        "  make airflow          Airflow scheduler + UI (airflow standalone) with this DAG\n"
    )


@workspace_app.command("list")
def workspace_list() -> None:
    """List the run workspaces: run key, the overrides it was made with, its size."""
    from pipelines.workspaces import list_run_workspaces

    rows = list_run_workspaces(_root())
    if not rows:
        typer.echo("no run workspaces in .lepton/workspaces/")
        return
    from pipelines.runlog import format_table

    typer.echo(format_table(rows, ("run", "overrides", "MB", "path")))


@workspace_app.command("remove")
def workspace_remove(
    keys: list[str] = typer.Argument(..., help="Run keys (see `lepton workspace list`)."),
) -> None:
    """Delete run workspaces (their outputs stay in the shared DVC cache, their runs in MLflow)."""
    from pipelines.workspaces import remove_run_workspace

    for key in keys:
        try:
            typer.echo(f"removed {remove_run_workspace(_root(), key)}")
        except LeptonError as exc:
            _fail(str(exc))


@scale_out_app.command("lock")
def scale_out_lock(
    key: str = typer.Argument("latest", help="DAG run id; `latest`: the last finished run."),
) -> None:
    """Write a scale-out run's dvc.lock and metrics from the DVC remote into this workspace.

    Then `dvc pull` brings the run's outputs."""
    from pipelines.scale_out import write_run_lock

    try:
        path = write_run_lock(_root(), key)
    except LeptonError as exc:
        _fail(str(exc))
    typer.echo(f"wrote {path}; `dvc pull` brings the run's outputs")


@app.command("summary")
def summary(key: str = typer.Option("", help="Pipeline run key; default: the latest.")) -> None:
    """Print the stage table of a pipeline run."""
    from pipelines import runlog

    root = _root()
    key = key or runlog.latest_key(root) or ""
    if not key:
        _fail("no pipeline run recorded yet in .lepton/runs/")
    typer.echo(f"pipeline run {key}")
    typer.echo(
        runlog.format_table(
            runlog.summary_rows(root, key), ("stage", "status", "duration", "headline metric")
        )
    )
    typer.echo(runlog.data_line(root, key))


@app.command(
    "airflow",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def airflow_passthrough(ctx: typer.Context) -> None:
    """Run an airflow command against the workspace (`lepton airflow standalone`). The
    commands that run DAG tasks (`standalone`, `scheduler`) get a warm stage runner for
    their lifetime, as `lepton run` does (``runtime.stage_runner``); its log is
    `.lepton/logs/airflow.stage-runner.log`."""
    import contextlib

    root = _root()
    env = _airflow_env(root)
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    runner = contextlib.nullcontext({})
    if ctx.args[:1] in (["standalone"], ["scheduler"]):
        log_file = root / ".lepton" / "logs" / "airflow.stage-runner.log"
        try:
            runner = _stage_runner(root, env, log_file)
        except LeptonError as exc:  # Airflow still starts; each task reports the params
            typer.echo(f"no stage runner: {exc}", err=True)
    with runner as runner_env:
        code = subprocess.call(
            airflow_command(list(ctx.args), root), env={**env, **runner_env}, cwd=root
        )
    raise typer.Exit(code)


def main() -> None:
    """Entry point of the ``lepton`` console script. ``lepton stage run`` goes to the warm
    stage runner that ``LEPTON_STAGE_RUNNER`` names, when one answers there
    (:mod:`pipelines.stage_runner`)."""
    runner = os.environ.get("LEPTON_STAGE_RUNNER")
    if runner and sys.argv[1:3] == ["stage", "run"]:
        from pipelines.stage_runner import run_in_runner

        code = run_in_runner(runner, sys.argv)
        if code is not None:
            raise SystemExit(code)
    app()
