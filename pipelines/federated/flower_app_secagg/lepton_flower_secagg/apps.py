"""The ServerApp and ClientApp objects that ``[tool.flwr.app.components]`` names. The
ServerApp reads the run spec packaged next to this file (``run_spec.json``)."""

from pathlib import Path

from pipelines.federated.flower_secagg import make_secagg_client_app, make_secagg_server_app

server = make_secagg_server_app(Path(__file__).resolve().parent)
client = make_secagg_client_app()
