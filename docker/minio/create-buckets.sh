#!/bin/sh
# One-shot MinIO set-up (the compose service minio-init): the dataset bucket,
# the MLflow artifact bucket, and an application user with read-write access
# that the worker and the MLflow server use instead of the root credentials.
# Idempotent: safe on every `docker compose up`.
set -eu

: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}"
: "${PNEUMO_DATA_BUCKET:?}" "${MLFLOW_ARTIFACT_BUCKET:?}"
: "${PNEUMO_S3_ACCESS_KEY_ID:?}" "${PNEUMO_S3_SECRET_ACCESS_KEY:?}"

mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "local/$PNEUMO_DATA_BUCKET"
mc mb --ignore-existing "local/$MLFLOW_ARTIFACT_BUCKET"
mc admin user add local "$PNEUMO_S3_ACCESS_KEY_ID" "$PNEUMO_S3_SECRET_ACCESS_KEY" >/dev/null
if ! mc admin user info local "$PNEUMO_S3_ACCESS_KEY_ID" | grep -q readwrite; then
    mc admin policy attach local readwrite --user "$PNEUMO_S3_ACCESS_KEY_ID"
fi
echo "minio-init: buckets $PNEUMO_DATA_BUCKET, $MLFLOW_ARTIFACT_BUCKET and user $PNEUMO_S3_ACCESS_KEY_ID ready"
