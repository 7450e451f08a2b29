# MLflow tracking server for the compose stack: PostgreSQL backend store
# (psycopg2) and proxied artifacts in MinIO/S3 (boto3). The upstream
# ghcr.io/mlflow/mlflow image ships neither driver, hence this small image.
# Versions are pinned: the server's MLflow matches the client the project is
# tested with.

FROM python:3.11.13-slim-bookworm

ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG2_VERSION=2.9.10
ARG BOTO3_VERSION=1.44.8

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install \
        "mlflow==${MLFLOW_VERSION}" \
        "psycopg2-binary==${PSYCOPG2_VERSION}" \
        "boto3==${BOTO3_VERSION}" \
    && groupadd --system --gid 10002 mlflow \
    && useradd --system --uid 10002 --gid mlflow --home-dir /home/mlflow --create-home mlflow

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000

# The backend store URI holds the database password: it comes from the
# environment (MLFLOW_BACKEND_STORE_URI), not the command line, so `ps` on the
# host does not show it. Compose adds --artifacts-destination.
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
