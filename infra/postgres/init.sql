-- One Postgres instance, one database per service (compose.yaml mounts this into docker-entrypoint-initdb.d,
-- so it runs once, on an empty data volume, as $POSTGRES_USER, who owns all three). No passwords here: the
-- only role is the superuser whose password comes from infra/.env.
CREATE DATABASE mlflow;   -- MLflow tracking + model registry (mlflow server --backend-store-uri)
CREATE DATABASE optuna;   -- Optuna study storage shared by tune workers
CREATE DATABASE prefect;  -- Prefect server (PREFECT_API_DATABASE_CONNECTION_URL)
