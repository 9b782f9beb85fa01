-- The user store of MLflow's basic authentication (docker/mlflow/basic_auth.ini).
CREATE DATABASE mlflow_auth OWNER airflow;
