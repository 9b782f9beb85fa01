"""docker/compose.yaml: every password is the operator's, MLflow asks for one, Airflow has one.

There is no Docker engine here, so the stack is checked as configuration: the file parses,
each secret is a required variable without a default, the MLflow server runs its basic-auth
app with the mounted config whose user database the Postgres init scripts create, and
airflow-init's own command, run with ``sh``, writes the admin password file that the API
server reads. (tests/code/test_tracking_concurrency.py runs the same ``mlflow server
--app-name basic-auth`` for real on loopback.)
"""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
AIRFLOW_SERVICES = (
    "airflow-init",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-api-server",
)
REQUIRED = re.compile(r"^\$\{(\w+):\?[^}]+\}$")


def required_variable(value: str) -> str:
    """The variable name of a ``${NAME:?message}`` value; fails on anything else."""
    found = REQUIRED.match(str(value))
    assert found, f"{value!r} is not a required variable without a default"
    return found.group(1)


def test_mlflow_server_requires_a_login():
    mlflow = SERVICES["mlflow"]
    assert "--app-name basic-auth" in mlflow["command"]
    env = mlflow["environment"]
    assert required_variable(env["MLFLOW_AUTH_ADMIN_PASSWORD"]) == "MLFLOW_ADMIN_PASSWORD"
    assert required_variable(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == "MLFLOW_SECRET_KEY"
    mounts = dict(v.rsplit(":", 2)[:2] for v in mlflow["volumes"])
    config_path = env["MLFLOW_AUTH_CONFIG_PATH"]
    host_file = next(host for host, target in mounts.items() if target == config_path)
    config = configparser.ConfigParser()
    config.read(DOCKER / host_file)
    section = config["mlflow"]
    assert section["authorization_function"].endswith("authenticate_request_basic_auth")
    assert "admin_password" not in section  # the password comes from the environment only
    database = section["database_uri"].rsplit("/", 1)[-1]
    init_sql = "".join(p.read_text() for p in sorted((DOCKER / "initdb").glob("*.sql")))
    assert f"CREATE DATABASE {database} " in init_sql


def test_airflow_tasks_log_to_mlflow_with_the_admin_login():
    for name in AIRFLOW_SERVICES:
        env = SERVICES[name]["environment"]
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["MLFLOW_TRACKING_USERNAME"] == "admin"
        assert required_variable(env["MLFLOW_TRACKING_PASSWORD"]) == "MLFLOW_ADMIN_PASSWORD"
        assert required_variable(env["AIRFLOW__API_AUTH__JWT_SECRET"]) == "AIRFLOW_JWT_SECRET"


def test_airflow_admin_password_is_the_operators(tmp_path):
    env = SERVICES["airflow-api-server"]["environment"]
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == "admin:admin"
    assert env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False") == "False"
    assert required_variable(env["AIRFLOW_ADMIN_PASSWORD"]) == "AIRFLOW_ADMIN_PASSWORD"
    password_file = env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    # airflow-init's command writes that file; run it here with the path moved to tmp and
    # the migration left out
    command = SERVICES["airflow-init"]["command"].replace(password_file, str(tmp_path / "pw.json"))
    command = command.replace("&& airflow db migrate", "")
    argv = ["sh", "-c", command.removeprefix("sh -c ").strip().strip("'")]
    secret = 'a "quoted" pa$$word'
    done = subprocess.run(
        argv, env={**os.environ, "AIRFLOW_ADMIN_PASSWORD": secret}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "pw.json").read_text()) == {"admin": secret}
    # the scheduler's task runners and the API server share the file's volume
    for name in ("airflow-init", "airflow-api-server"):
        volumes = SERVICES[name].get("volumes", [])
        assert any(v.endswith(":" + str(Path(password_file).parent)) for v in volumes), name


def merged_celery_stack() -> dict:
    """docker/compose.yaml with docker/compose.celery.yaml on top, merged as compose does
    for these keys: a service's mappings merge, its command replaces, volumes merge by
    target."""
    services = {name: dict(spec) for name, spec in SERVICES.items()}
    override = yaml.safe_load((DOCKER / "compose.celery.yaml").read_text())["services"]
    for name, spec in override.items():
        base = services.setdefault(name, {})
        for key, value in spec.items():
            if key == "environment":
                base[key] = {**base.get(key, {}), **value}
            elif key == "volumes":
                by_target = {v.split(":")[1]: v for v in base.get(key, [])}
                by_target.update({v.split(":")[1]: v for v in value})
                base[key] = list(by_target.values())
            else:
                base[key] = value
    return services


def test_celery_variant_has_cpu_and_gpu_workers_and_no_shared_writable_workspace():
    services = merged_celery_stack()
    assert "redis" in services
    workers = {n: s for n, s in services.items() if "celery worker" in str(s.get("command"))}
    queues = {
        n: s["command"].split("--queues ")[1].split()[0].strip("'") for n, s in workers.items()
    }
    assert sorted(queues.values()) == ["default", "gpu"]
    for name, worker in workers.items():  # a warm stage runner beside each worker
        socket_path = worker["environment"]["LEPTON_STAGE_RUNNER"]
        assert socket_path.startswith("/tmp/"), name
        assert 'lepton stage runner "$$LEPTON_STAGE_RUNNER" &' in worker["command"], name
        assert "exec airflow celery worker" in worker["command"], name
    gpu = next(s for n, s in workers.items() if queues[n] == "gpu")
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    for name in (*workers, "airflow-scheduler", "airflow-dag-processor", "airflow-api-server"):
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:"), name
    for name in (*workers, "airflow-scheduler", "airflow-dag-processor"):
        env = services[name]["environment"]
        assert required_variable(env["LEPTON_GIT_URL"]) == "LEPTON_GIT_URL"
        workspace = [v for v in services[name]["volumes"] if v.startswith("${LEPTON_WORKSPACE}")]
        assert workspace and all(v.endswith(":ro") for v in workspace), (name, workspace)
    assert "airflow pools set gpu" in services["airflow-init"]["command"]
    assert "airflow db migrate" in services["airflow-init"]["command"]
