"""Storage: tensor IO (local, S3, Hub), checkpoint sources, MLflow registry adapter."""
