"""The whole pipeline on tiny params: through `dvc repro`, and through Airflow (`lepton run`).

Each test works in its own fresh copy of the workspace, so it also checks that a new clone
has everything a run needs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from pipelines.registry import SOURCE_PROBE, STAGES
from pipelines.stages.register import ONNX_MODEL_PACKAGES
from tests.conftest import (
    BIN,
    SESSION_RUNNER_ENV,
    TINY_OVERRIDES,
    make_workspace,
    wait_for_http,
    workspace_env,
)

pytestmark = pytest.mark.slow


def run(argv: list[str], root: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, cwd=root, env=workspace_env(root), capture_output=True, text=True, timeout=timeout
    )


def mlflow_runs(root: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("lepton")
    assert experiment is not None
    return client, client.search_runs([experiment.experiment_id], max_results=500)


def check_outputs(root: Path) -> dict:
    for stage in STAGES:
        for out in stage.outs:
            assert (root / out).is_dir() and any((root / out).iterdir()), out
        for metric in stage.metrics:
            assert json.loads((root / metric).read_text()), metric
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    compressed = ("onnx_fp32", "onnx_int8", "pruned_fp32", "pruned_int8")
    compressed += ("distilled_fp32", "distilled_int8")
    for variant in ("federated", *compressed, "quantum_hybrid", "quantum_classical"):
        assert variant in metrics["variants"], variant
        assert 0.0 <= metrics["variants"][variant]["test_accuracy"] <= 1.0
    # tiny budgets (2-epoch encoder, 2 rounds x 1 local epoch) still learn: at least three
    # times the 10% of chance on ten classes (0.49 with batch 16, seed 42)
    assert metrics["variants"]["federated"]["test_accuracy"] > 0.3
    assert (root / "reports" / "evaluate" / "confusion_federated.png").stat().st_size > 1000
    assert (root / "reports" / "evaluate" / "compression.png").stat().st_size > 1000
    optimize = json.loads((root / "reports" / "optimize.json").read_text())
    assert set(optimize["variants"]) == set(compressed)
    # the int8 files are smaller than their fp32 sources, the pruned and distilled models too
    sizes = {name: v["bytes"] for name, v in optimize["variants"].items()}
    assert sizes["onnx_int8"] < sizes["onnx_fp32"] and sizes["distilled_int8"] < sizes["onnx_int8"]
    assert sizes["pruned_fp32"] < sizes["onnx_fp32"]
    assert (root / "data" / "partitions" / "client_labels.png").stat().st_size > 1000
    return metrics


def check_mlflow(root: Path, parent_tag: str | None = None, key_prefix: str = "") -> None:
    """The one pipeline parent run (of the run keys starting with ``key_prefix``) has a
    finished child per stage, lineage tags, round metrics; the candidate has a model card."""
    client, runs = mlflow_runs(root)
    parents = [
        r
        for r in runs
        if r.data.tags.get("lepton.kind") == "pipeline"
        and r.data.tags["lepton.pipeline_run"].startswith(key_prefix)
    ]
    assert len(parents) == 1, [p.data.tags for p in parents]
    parent = parents[0]
    children = [
        r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        and r.info.status != "KILLED"  # an attempt killed mid-way, retried by Airflow
    ]
    assert sorted(c.data.tags["lepton.stage"] for c in children) == sorted(s.name for s in STAGES)
    assert all(c.info.status == "FINISHED" for c in children)
    assert parent.data.tags["lepton.dvc_lock_sha256"] != "none"
    assert len(parent.data.tags["lepton.git_commit"]) == 40
    if parent_tag:
        assert parent.data.tags.get("airflow.dag_run_id"), parent.data.tags
    federate = next(c for c in children if c.data.tags["lepton.stage"] == "federate")
    assert "val_accuracy" in federate.data.metrics
    assert len(client.get_metric_history(federate.info.run_id, "round_val_accuracy")) >= 2
    version = client.get_model_version_by_alias("lepton-digits", "candidate")
    assert (
        version.tags["lepton.data_sha256"]
        == json.loads((root / "data/raw/manifest.json").read_text())["content_sha256"]
    )
    assert version.tags["lepton.dvc_lock_sha256"] != "none"
    # the description is a model card: variant, data hash, metrics
    assert version.tags["variant"] in version.description
    assert version.tags["lepton.data_sha256"] in version.description
    assert "Test accuracy" in version.description
    if version.tags["variant"] != "quantum_hybrid":  # an ONNX file: its pinned requirements
        uri = client.get_model_version_download_uri("lepton-digits", version.version)
        wanted = [f"{name}=={metadata.version(name)}" for name in ONNX_MODEL_PACKAGES]
        requirements = Path(uri.removeprefix("file://")) / "requirements.txt"
        assert requirements.read_text().split() == wanted


def serve_and_ask(root: Path, images) -> dict:
    """Serve the registered candidate with `mlflow models serve` (local env manager) and
    POST ``images`` to it; the JSON answer."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = workspace_env(root)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # uvicorn, as in an activated venv
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    argv = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/lepton-digits@candidate"]
    argv += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(
        argv,
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_http(
            f"http://127.0.0.1:{port}/ping", server, lambda: server.stdout.read().decode()
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": images.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def check_served(root: Path) -> None:
    """The registered model answers HTTP with labels and class probabilities that agree
    with the evaluate stage's scoring of the same file."""
    import numpy as np

    from pipelines.io import read_image_table

    test = read_image_table(root / "data/partitions/test.parquet")
    answer = serve_and_ask(root, test.images[:5])["predictions"]
    labels, probabilities = np.array(answer["label"]), np.array(answer["probabilities"])
    assert labels.shape == (5,) and probabilities.shape == (5, test.num_classes)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(labels, probabilities.argmax(1))


DVC_LOCK_ERRORS = ("Unable to acquire lock", "is busy, it is being blocked by")


def start(argv: list[str], root: Path, log: Path, stage_runner: bool = True) -> subprocess.Popen:
    """``argv`` in ``root`` in the background, its output into ``log``; ``stage_runner`` as
    in :func:`tests.conftest.workspace_env`."""
    env = workspace_env(root, stage_runner)
    return subprocess.Popen(argv, cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for_text(log: Path, text: str, process: subprocess.Popen, seconds: float = 300) -> None:
    import time

    deadline = time.monotonic() + seconds
    while text not in log.read_text():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in {log}"
        time.sleep(0.2)


def test_dvc_repro_runs_then_skips_everything_and_pushes(tiny_workspace: Path, tmp_path: Path):
    """`dvc repro` by hand, with two `lepton run` beside it: one in the same workspace
    (it meets DVC's lock, waits, then finds every stage done) and one `--isolated` with
    other params, started once pretrain is done (its own workspace restores ingest to
    pretrain from the shared cache, runs the rest with 1 round, logs to the same MLflow
    store). All finish, none shows a DVC lock error, and each keeps its own params.
    `dvc repro` starts each stage in a process of its own, as for a user who runs it."""
    root = tiny_workspace
    logs = {name: tmp_path / f"{name}.log" for name in ("repro", "here", "isolated")}
    first = start([str(BIN / "dvc"), "repro"], root, logs["repro"], stage_runner=False)
    wait_for_text(logs["repro"], "Running stage 'ingest'", first)
    here = start([str(BIN / "lepton"), "run", "--via", "dvc"], root, logs["here"])
    # DVC has stored pretrain's outputs and lock entry once it starts the next stage
    wait_for_text(logs["repro"], "Running stage 'federate'", first)
    isolated_run = [str(BIN / "lepton"), "run", "--via", "dvc", "--isolated"]
    isolated = start([*isolated_run, "--set", "federate.rounds=1"], root, logs["isolated"])
    codes = {n: p.wait(timeout=900) for n, p in zip(logs, (first, here, isolated), strict=True)}
    texts = {name: log.read_text() for name, log in logs.items()}
    assert codes == dict.fromkeys(logs, 0), {k: t[-3000:] for k, t in texts.items()}
    for name in ("here", "isolated"):
        assert not any(error in texts[name] for error in DVC_LOCK_ERRORS), texts[name][-3000:]
    assert set(summary_status(texts["here"]).values()) == {"cached"}, texts["here"][-3000:]
    full_log = Path(re.search(r"full log: (\S+)", texts["here"]).group(1)).read_text()
    # it waited for `dvc repro`: while it ran a stage, or on DVC's lock between two
    assert "waiting: DVC (pid" in full_log or "another DVC process holds a lock" in full_log
    isolated_status = summary_status(texts["isolated"])
    assert {s: isolated_status[s] for s in ("ingest", "compress", "partition", "pretrain")} == (
        dict.fromkeys(("ingest", "compress", "partition", "pretrain"), "cached")
    ), texts["isolated"][-3000:]
    assert isolated_status["federate"] == "ran"
    work = next((root / ".lepton" / "workspaces").iterdir())
    assert yaml.safe_load((root / "params.yaml").read_text())["federate"]["rounds"] == 2
    assert json.loads((root / "reports/federate.json").read_text())["rounds"] == 2
    assert json.loads((work / "reports/federate.json").read_text())["rounds"] == 1
    assert not (work / "mlflow.db").exists() and not (work / "mlartifacts").exists()
    client, runs = mlflow_runs(root)  # both runs' federate stages in the one store
    federate_rounds = sorted(
        r.data.params["federate.rounds"]
        for r in runs
        if r.data.tags.get("lepton.stage") == "federate"
    )
    assert federate_rounds == ["1", "2"]

    check_outputs(root)
    check_mlflow(root, key_prefix="dvc-")
    check_served(root)

    second = run([str(BIN / "dvc"), "repro"], root)
    assert second.returncode == 0, second.stderr[-2000:]
    for stage in STAGES:
        assert f"Stage '{stage.name}' didn't change, skipping" in second.stdout, stage.name
    status = run([str(BIN / "dvc"), "status", "--json"], root)
    assert json.loads(status.stdout) == {SOURCE_PROBE: ["always changed"]}, status.stdout

    pushed = run([str(BIN / "dvc"), "push"], root)
    assert pushed.returncode == 0, pushed.stderr[-2000:]
    stored = [p for p in (root / ".dvc-remote").rglob("*") if p.is_file()]
    assert len(stored) >= 10

    shown = run([str(BIN / "dvc"), "metrics", "show", "--json"], root)
    assert shown.returncode == 0 and "test_accuracy" in shown.stdout


def write_digits_csv(path: Path, rows: int) -> None:
    """The first ``rows`` of scikit-learn's digits as a CSV export: label + 64 pixels."""
    import numpy as np
    from sklearn.datasets import load_digits

    data = load_digits()
    table = np.column_stack([data.target, data.data]).astype(int)[:rows]
    header = "label," + ",".join(f"p{i}" for i in range(table.shape[1] - 1))
    np.savetxt(path, table, fmt="%d", delimiter=",", header=header, comments="")


def pipeline_run_key(stdout: str) -> str:
    found = re.search(r"\(pipeline run (\S+)\)", stdout)
    assert found, stdout[-2000:]
    return found.group(1)


def parent_run(root: Path, key: str):
    client, runs = mlflow_runs(root)
    [parent] = [
        r
        for r in runs
        if r.data.tags.get("lepton.kind") == "pipeline"
        and r.data.tags.get("lepton.pipeline_run") == key
    ]
    return parent


def summary_status(stdout: str) -> dict[str, str]:
    """stage -> ran / cached / failed, from the table `lepton run` prints."""
    found = {}
    for line in stdout.splitlines():
        cells = line.split()
        if len(cells) >= 2 and cells[0] in {s.name for s in STAGES}:
            found[cells[0]] = cells[1]
    return found


def kill_pretrain_once_it_has_a_checkpoint(root: Path, process: subprocess.Popen) -> list[int]:
    """SIGKILL the `lepton stage run pretrain` process of the workspace ``root`` (as an OOM
    kill would; another test's pretrain on the same machine is left alone) once it has
    saved an epoch's checkpoint; returns the PIDs killed."""
    import signal
    import time

    import psutil

    while process.poll() is None:
        if list((root / ".lepton" / "checkpoints").glob("pretrain-*.safetensors")):
            killed = []
            for found in psutil.process_iter(["cmdline", "cwd"]):
                command = " ".join(found.info["cmdline"] or [])
                ours = found.info["cwd"] and Path(found.info["cwd"]).resolve() == root.resolve()
                if "lepton stage run pretrain" in command and ours:
                    os.kill(found.pid, signal.SIGKILL)
                    killed.append(found.pid)
            if killed:
                return killed
        time.sleep(0.05)
    return []


def test_nightly_airflow_runs_see_a_changed_csv_source(tiny_workspace: Path):
    """The scheduled path (`lepton run` = `airflow dags test`): new rows in the user's CSV
    re-run ingest and everything downstream; an untouched CSV is skipped throughout. In the
    first run pretrain is SIGKILLed mid-way: Airflow retries the task and it resumes from
    its last epoch."""
    root = tiny_workspace
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"].update({"source": "csv", "path": "site.csv"})
    params["pretrain"]["epochs"] = 40  # long enough to be killed between two epochs
    params["runtime"]["retry_delay_seconds"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_digits_csv(root / "site.csv", 1000)

    process = subprocess.Popen(
        [str(BIN / "lepton"), "run"],
        cwd=root,
        env=workspace_env(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    import threading

    killed: list[int] = []
    killer = threading.Thread(
        target=lambda: killed.extend(kill_pretrain_once_it_has_a_checkpoint(root, process))
    )
    killer.start()
    stdout, stderr = process.communicate(timeout=1200)
    killer.join()
    first = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert killed, "pretrain ended before it could be killed"
    resumed = re.search(r"pretrain: resuming after epoch (\d+) of 40", first.stdout)
    assert resumed and int(resumed.group(1)) >= 1, first.stdout[-4000:]
    client, runs = mlflow_runs(root)
    attempts = [r for r in runs if r.data.tags.get("lepton.stage") == "pretrain"]
    assert sorted(r.info.status for r in attempts) == ["FINISHED", "KILLED"]
    assert set(summary_status(first.stdout).values()) == {"ran"}
    assert "make mlflow-ui" in first.stdout
    assert "stage pretrain started" in first.stdout and "forked by the stage runner" in first.stdout
    # `lepton run` used the runner its environment named (the session's) instead of its own
    own_runner_logs = list((root / ".lepton" / "logs").glob("*.stage-runner.log"))
    assert bool(own_runner_logs) != bool(SESSION_RUNNER_ENV), own_runner_logs
    assert "ingest: first data: 1000 rows" in first.stdout
    check_outputs(root)
    check_mlflow(root, parent_tag="airflow")
    register = json.loads((root / "reports" / "register.json").read_text())
    assert register["version"] == 1 and register["promoted"] == 1  # floor 0.3 in tiny params
    manifest = json.loads((root / "data/raw/manifest.json").read_text())
    assert manifest["rows"] == 1000

    write_digits_csv(root / "site.csv", 1500)  # the next day's export
    params["pretrain"]["epochs"] = 2  # no kill this time: the tiny default again
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = run([str(BIN / "lepton"), "run"], root)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert set(summary_status(second.stdout).values()) == {"ran"}, second.stdout[-3000:]
    new_manifest = json.loads((root / "data/raw/manifest.json").read_text())
    assert new_manifest["rows"] == 1500
    assert new_manifest["content_sha256"] != manifest["content_sha256"]
    assert "ingest: new data: 1500 rows" in second.stdout
    assert "previous run: 1000 rows" in second.stdout
    tags = parent_run(root, pipeline_run_key(second.stdout)).data.tags
    assert tags["lepton.data_status"] == "new"
    assert tags["lepton.data_rows"] == "1500" and tags["lepton.previous_data_rows"] == "1000"
    assert tags["lepton.data_sha256"] == new_manifest["content_sha256"]
    assert tags["lepton.previous_data_sha256"] == manifest["content_sha256"]
    assert json.loads((root / "reports" / "register.json").read_text())["version"] == 2
    client, _ = mlflow_runs(root)
    version = client.get_model_version_by_alias("lepton-digits", "candidate")
    assert int(version.version) == 2
    assert version.tags["lepton.data_sha256"] == new_manifest["content_sha256"]

    third = run([str(BIN / "lepton"), "run"], root)
    assert third.returncode == 0, third.stdout[-4000:] + third.stderr[-4000:]
    assert set(summary_status(third.stdout).values()) == {"cached"}, third.stdout[-3000:]
    assert "ingest: source unchanged: 1500 rows" in third.stdout


def write_digit_pngs(folder: Path, start: int, stop: int) -> None:
    """Digits ``start..stop`` as 8-bit PNGs in one folder per class."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    for index in range(start, stop):
        target = folder / str(data.target[index])
        target.mkdir(parents=True, exist_ok=True)
        pixels = (data.images[index] * 15).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(target / f"{index:04d}.png")


def test_one_image_added_to_the_folder_reruns_ingest_and_downstream(tiny_workspace: Path):
    root = tiny_workspace
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"].update({"source": "images", "path": str(root.parent / "site-images")})
    params["partition"]["skew"] = "iid"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_digit_pngs(root.parent / "site-images", 0, 400)  # outside the workspace
    repro = [str(BIN / "dvc"), "repro", "partition"]

    first = run(repro, root)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rows = json.loads((root / "data/raw/manifest.json").read_text())["rows"]
    assert rows == 400

    write_digit_pngs(root.parent / "site-images", 400, 401)
    second = run(repro, root)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for stage in ("ingest", "compress", "partition"):
        assert f"Running stage '{stage}'" in second.stdout, (stage, second.stdout[-3000:])
    assert json.loads((root / "data/raw/manifest.json").read_text())["rows"] == 401

    third = run(repro, root)
    assert third.returncode == 0, third.stderr[-2000:]
    for stage in ("ingest", "compress", "partition"):
        assert f"Stage '{stage}' didn't change, skipping" in third.stdout, stage


# docs/federated.md, "Record-level DP": the ε = 3 setting of benchmarks/privacy.py
RECORD_DP_EPSILON_3 = {
    "pretrain": {"method": "scattering", "scattering_scales": 1},
    "federate": {
        "rounds": 100,
        "local_epochs": 1,
        "learning_rate": 1.0,
        "dp": {"enabled": True, "unit": "record", "target_epsilon": 3.0},
    },
}


def test_record_level_dp_at_epsilon_3_runs_through_and_registers(tmp_path: Path):
    """The documented ε = 3 override, whole pipeline through `dvc repro` (`lepton run --via
    dvc`: the stages forked from its stage runner): the model is registered and promoted
    past the DP floor, tagged with its unit, ε and δ."""
    overrides = {**TINY_OVERRIDES, **RECORD_DP_EPSILON_3}
    overrides["register"] = {}  # the default floors: 0.95, and 0.9 under record DP
    root = make_workspace(tmp_path / "ws", overrides)
    done = run([str(BIN / "lepton"), "run", "--via", "dvc"], root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    federate = json.loads((root / "reports/federate.json").read_text())
    assert federate["dp_unit"] == "record" and 2.9 < federate["epsilon"] <= 3.0
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert metrics["chosen_variant"] != "quantum_hybrid"
    # the pool is client rows: no model is distilled or fine-tuned on them without noise
    optimize = json.loads((root / "reports/optimize.json").read_text())
    assert set(optimize["variants"]) == {"onnx_fp32", "onnx_int8"}
    assert optimize["distillation_rows"] == 0
    register = json.loads((root / "reports/register.json").read_text())
    assert register["promoted"] == 1, register
    assert register["test_accuracy"] >= 0.9
    client, _ = mlflow_runs(root)
    version = client.get_model_version_by_alias("lepton-digits", "champion")
    assert version.tags["lepton.privacy.unit"] == "record"
    assert float(version.tags["lepton.privacy.epsilon"]) == pytest.approx(
        federate["epsilon"], rel=1e-5
    )
    assert version.tags["lepton.privacy.delta"] == "1e-05"
