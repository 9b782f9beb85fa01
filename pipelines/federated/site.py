"""A data site joins a federation: ``lepton site join``.

The site runs one command on its own machine. It reads the site's data in any format ingest
reads (:func:`~pipelines.data.sources.load_source`, with the same validation and the same
errors: a bad file is refused here, naming file, field and row, before anything starts),
keeps ``holdout_fraction`` of the rows back to score the final model on, writes both parts
into the site's work folder (``train.parquet``, ``holdout.parquet``, ``site.json``; the
source's own pixel scale, replaced only once complete), then runs the site's warm worker
(:mod:`pipelines.federated.site_worker`: torch and the rows stay loaded between messages)
and Flower's ``flower-supernode`` with a node config that names the files and the worker
(:func:`run_site`). The ClientApps (:mod:`pipelines.federated.flower`) read only those.

What leaves the site is what the ClientApp sends back (docs/federated.md): model weights
after local training, row counts, the mean training loss, the class statistics of its
rows' features (the class-mean head; classifier runs without secure aggregation), and the
held-out accuracy and row count. No row or label leaves it; when the site refuses a run
(data unlike the run's), the refusal names the site's file, field and row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import IngestParams
from pipelines.errors import ConfigError
from pipelines.io import ImageTable, atomic_outputs, content_sha256, write_image_table, write_json

TRAIN_FILE = "train.parquet"
HOLDOUT_FILE = "holdout.parquet"
SITE_FILE = "site.json"


@dataclass(frozen=True)
class SiteFiles:
    """The files a site prepared in its work folder."""

    folder: Path

    @property
    def train(self) -> Path:
        return self.folder / TRAIN_FILE

    @property
    def holdout(self) -> Path:
        return self.folder / HOLDOUT_FILE

    @property
    def manifest(self) -> Path:
        return self.folder / SITE_FILE


def split_holdout_rows(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, holdout)`` sorted row indices: ``fraction`` of each class held out (at least
    one row of a class with two or more, none when ``fraction`` is 0)."""
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        count = int(round(fraction * len(rows)))
        if fraction > 0 and len(rows) >= 2:
            count = min(max(count, 1), len(rows) - 1)
        held.extend(rng.permutation(rows)[:count].tolist())
    holdout = np.sort(np.asarray(held, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels)), holdout)
    return train, holdout


def prepare_site(
    ingest: IngestParams,
    name: str,
    folder: Path,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    root: Path | None = None,
) -> dict[str, Any]:
    """Read and validate the site's data (``ingest``: source, path, shape, resize as in
    params.yaml), split off the held-out rows and write the site's files into ``folder``
    at once; return what ``site.json`` records (rows, shape, classes, digests)."""
    from pipelines.data.sources import load_source

    if not 0.0 <= holdout_fraction < 1.0:
        raise ConfigError(f"--holdout-fraction must be in [0, 1), got {holdout_fraction}")
    table: ImageTable = load_source(ingest, Path(root or Path.cwd()))
    train_rows, holdout_rows = split_holdout_rows(table.labels, holdout_fraction, seed)
    train, holdout = table.subset(train_rows), table.subset(holdout_rows)
    manifest = {
        "site": name,
        "source": ingest.source,
        "path": ingest.path,
        "rows": len(train_rows),
        "holdout_rows": len(holdout_rows),
        "channels": int(table.channels),
        "image_shape": [int(v) for v in table.image_shape],
        "classes_present": sorted(int(v) for v in np.unique(table.labels)),
        "train_sha256": content_sha256(train),
        "holdout_sha256": content_sha256(holdout),
        "holdout_fraction": holdout_fraction,
        "seed": seed,
    }
    files = SiteFiles(Path(folder))
    with atomic_outputs(dirs=[files.folder]) as staged:
        target = SiteFiles(staged.path(files.folder))
        write_image_table(train, target.train)
        write_image_table(holdout, target.holdout)
        write_json(target.manifest, manifest)
    return manifest


def site_node_config(name: str, files: SiteFiles) -> dict[str, Any]:
    """The node config that names a site's prepared files (read at the source's scale)."""
    return {
        "site": name,
        "data": str(files.train.resolve()),
        "holdout": str(files.holdout.resolve()),
        "scale": "raw",
        "state": str((files.folder / "state").resolve()),  # its record-level DP accountants
    }


def worker_socket(files: SiteFiles) -> Path:
    """Where the site's warm worker listens: in its folder, or (a Unix socket path must stay
    under about 100 characters) in a private folder under the system's temp dir."""
    import tempfile

    path = files.folder.resolve() / "worker.sock"
    if len(str(path)) < 100:
        return path
    return Path(tempfile.mkdtemp(prefix="lepton-site-")) / "worker.sock"


SITE_POLL_SECONDS = 0.5  # a remote site's longest wait between looks for a message


def supernode_argv(
    bin_dir: Path,
    superlink: str,
    node_config: dict[str, Any],
    root_certificates: Path | None = None,
    insecure: bool = False,
    auth_private_key: Path | None = None,
    port: int | None = None,
    poll_seconds: float | None = SITE_POLL_SECONDS,
) -> list[str]:
    """The SuperNode command line of a site: TLS with ``root_certificates`` (or
    ``insecure``), SuperNode authentication with ``auth_private_key`` (an OpenSSH EC key
    whose public half the SuperLink's operator registered), and ``node_config``. It runs
    Flower's SuperNode with its waits capped at ``poll_seconds`` and forked ClientApps
    (:mod:`pipelines.federated.flower_site_runtime`), or, with ``poll_seconds=None``, stock
    ``flower-supernode``."""
    from pipelines.federated.flower_deploy import node_config_text, site_runtime_argv

    if (root_certificates is None) == (not insecure):
        raise ConfigError("give --root-certificates (TLS) or --insecure, not both or neither")
    if auth_private_key is not None and insecure:
        raise ConfigError("--auth-key needs TLS (--root-certificates)")
    for what, path in (
        ("--root-certificates", root_certificates),
        ("--auth-key", auth_private_key),
    ):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{what}: no such file: {path}")
    start = (
        [str(Path(bin_dir) / "flower-supernode")]
        if poll_seconds is None
        else site_runtime_argv(bin_dir, poll_seconds)
    )
    argv = [*start, "--superlink", superlink]
    argv += (
        ["--insecure"]
        if insecure
        else ["--root-certificates", str(Path(root_certificates).resolve())]
    )
    if auth_private_key is not None:
        argv += ["--auth-supernode-private-key", str(Path(auth_private_key).resolve())]
    if port is not None:
        argv += ["--port", str(port)]
    return [*argv, "--node-config", node_config_text(node_config)]


def run_site(
    supernode: list[str], node_config: dict[str, Any], socket_path: Path | None, log_dir: Path
) -> int:
    """Run the site until its SuperNode ends (or this process is told to stop): the warm
    worker on ``socket_path`` first (none: the ClientApps load torch and the rows for every
    message), then the SuperNode; both stop together. Returns the SuperNode's exit code."""
    import signal
    import subprocess

    from pipelines.federated.flower_deploy import flower_env, start_site_worker, stop_processes
    from pipelines.processes import die_with_parent

    processes: list[subprocess.Popen] = []

    def stop(signum, _frame) -> None:
        stop_processes(processes)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        if socket_path is not None:
            python = Path(supernode[0]).parent / "python"
            processes.append(
                start_site_worker(python, socket_path, node_config, log_dir / "worker.log")
            )
        env = flower_env(log_dir / "flower-home", Path(supernode[0]).parent)
        node = subprocess.Popen(
            supernode, env=env, start_new_session=True, preexec_fn=die_with_parent()
        )
        processes.append(node)
        return node.wait()
    finally:
        stop_processes(processes)
