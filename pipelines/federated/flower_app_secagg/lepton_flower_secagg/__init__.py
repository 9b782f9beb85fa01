"""Flower app of the federate stage with SecAgg+ (see pipelines/federated/flower_secagg.py)."""
