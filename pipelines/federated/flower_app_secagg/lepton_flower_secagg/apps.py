"""The ServerApp and ClientApp objects that ``[tool.flwr.app.components]`` names."""

from pipelines.federated.flower_secagg import make_secagg_client_app, make_secagg_server_app

server = make_secagg_server_app()
client = make_secagg_client_app()
