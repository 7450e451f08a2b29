#!/bin/sh
# Runs once, on the first start of an empty data volume (the postgres image's
# /docker-entrypoint-initdb.d/ hook): one role and one database for Prefect,
# one for MLflow, each owner of its database only. Passwords come from the
# environment (docker/compose.yaml passes them from .env); psql variables
# quote them, so no password is spliced into SQL text.
set -eu

: "${PREFECT_DB_USER:?}" "${PREFECT_DB_PASSWORD:?}" "${PREFECT_DB_NAME:?}"
: "${MLFLOW_DB_USER:?}" "${MLFLOW_DB_PASSWORD:?}" "${MLFLOW_DB_NAME:?}"

create_database() {
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
        -v role="$1" -v password="$2" -v db="$3" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
CREATE DATABASE :"db" OWNER :"role";
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
SQL
}

create_database "$PREFECT_DB_USER" "$PREFECT_DB_PASSWORD" "$PREFECT_DB_NAME"
create_database "$MLFLOW_DB_USER" "$MLFLOW_DB_PASSWORD" "$MLFLOW_DB_NAME"
