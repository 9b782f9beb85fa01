"""The ServerApp and ClientApp objects that ``[tool.flwr.app.components]`` names."""

from pipelines.federated.flower import make_client_app, make_server_app

server = make_server_app()
client = make_client_app()
