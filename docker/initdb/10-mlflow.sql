-- A second database on the same Postgres for the MLflow tracking store.
CREATE DATABASE mlflow OWNER airflow;
