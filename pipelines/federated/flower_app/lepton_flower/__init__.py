"""Flower app of the federate stage (see pipelines/federated/flower.py)."""
