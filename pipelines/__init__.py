"""Lepton pipelines: one Airflow DAG, reproducible with DVC, tracked in MLflow."""

__version__ = "0.1.0"
