"""A site's warm worker: one long-running process that answers the site's Flower messages.

Flower 1.41 starts a new ClientApp process for every message, which here costs a torch and
Lightning import and a read of the site's rows each time. A SuperNode whose node config
names a ``worker`` socket has its ClientApp hand each message to this process instead: it
keeps torch imported and the site's rows loaded, runs the same
:func:`~pipelines.federated.site_steps.run_step`, and answers over a Unix socket that only
the site's user may open (mode 0600, in the site's own folder). The ClientApp then imports
only flwr and NumPy.

    python -m pipelines.federated.site_worker SOCKET NODE_CONFIG_JSON

Frames, both ways: 4-byte header length, 8-byte payload length (big-endian), a JSON header
(``kind`` and ``config`` in; ``info``, ``metrics`` or ``error`` out), and the weights as a
safetensors (NumPy) blob.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

FRAME = struct.Struct(">IQ")


def _send(connection: socket.socket, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save

    payload = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}) if arrays else b""
    body = json.dumps(header).encode()
    connection.sendall(FRAME.pack(len(body), len(payload)) + body + payload)


def _read_exactly(connection: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = connection.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the site worker closed the connection mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receive(connection: socket.socket) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from safetensors.numpy import load

    header_size, payload_size = FRAME.unpack(_read_exactly(connection, FRAME.size))
    header = json.loads(_read_exactly(connection, header_size))
    payload = _read_exactly(connection, payload_size)
    return header, (load(payload) if payload else {})


def call(
    socket_path: str | Path, kind: str, config: dict[str, Any], arrays: dict[str, np.ndarray]
) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """ClientApp side: hand one message to the worker; ``(info, metrics, arrays)``. The
    worker's error (a refused file, a failed fit) is raised here with its message."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.connect(str(socket_path))
        _send(connection, {"kind": kind, "config": config}, arrays)
        header, out = _receive(connection)
    if "error" in header:
        raise RuntimeError(header["error"])
    return header["info"], header["metrics"], out


def import_site_steps() -> None:
    """Import torch, Lightning and the site steps' modules (the client step imports some of
    them lazily), so that the first message does not wait for them."""
    import pipelines.federated.fedavg  # noqa: F401
    import pipelines.federated.ssl  # noqa: F401
    import pipelines.models.systems  # noqa: F401


def serve(socket_path: str | Path, node_config: dict[str, Any]) -> None:
    """Worker side: answer messages one at a time until killed, with the site named by
    ``node_config`` (as a SuperNode's) loaded once per pixel range."""
    from pipelines.federated.site_steps import run_step
    from pipelines.federated.sites import load_site

    path = Path(socket_path)
    path.unlink(missing_ok=True)
    # bound and listening under another name, then renamed: the path appears only once a
    # connection to it is accepted (a ClientApp that came between bind and listen was
    # refused)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    loaded: dict[str, Any] = {}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        old = os.umask(0o177)  # the socket file: this user only
        try:
            server.bind(str(staging))
        finally:
            os.umask(old)
        server.listen(4)
        os.replace(staging, path)
        import_site_steps()  # before the first message (which waits in the backlog)
        print(f"site worker for {node_config.get('site')} on {path}", flush=True)
        while True:
            connection, _ = server.accept()
            with connection:
                try:
                    header, arrays = _receive(connection)
                    config = header["config"]
                    scale = config.get("normalization")
                    if scale not in loaded:
                        loaded.clear()  # one run's pixel range at a time
                        loaded[scale] = load_site(node_config, json.loads(scale) if scale else None)
                    started = time.perf_counter()
                    info, metrics, out = run_step(header["kind"], loaded[scale], config, arrays)
                    _send(connection, {"info": info, "metrics": metrics}, out)
                    print(
                        f"{time.strftime('%H:%M:%S')} {header['kind']} "
                        f"{time.perf_counter() - started:.2f} s",
                        flush=True,
                    )
                except Exception as exc:  # noqa: BLE001 - the ClientApp reports it to the server
                    try:
                        _send(connection, {"error": f"{type(exc).__name__}: {exc}"}, {})
                    except OSError:
                        pass


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.federated.site_worker SOCKET NODE_CONFIG_JSON``."""
    from pipelines.processes import name_process

    args = sys.argv[1:] if argv is None else argv
    name_process("site-worker")
    serve(args[0], json.loads(args[1]))


if __name__ == "__main__":
    main()
