"""Local services: the embedded stack (Prefect, MLflow, S3) and how it starts and stops."""
