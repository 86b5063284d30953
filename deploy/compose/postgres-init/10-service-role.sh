#!/bin/sh
# Runs once, when the postgres container initialises an empty data volume (docker-entrypoint-initdb.d).
# POSTGRES_USER (`medinfer`) owns the database and its tables and runs `medinfer migrate`; the
# service logs in as `medinfer_app`, which owns nothing: `medinfer migrate` (with
# MEDINFER_DATABASE_SERVICE_ROLE=medinfer_app) grants it only what it needs, so it cannot disable
# or drop the audit trail's append-only triggers (docs/operations.md, "Audit anchoring").
# A volume initialised before this script existed lacks the role: create it by hand once, e.g.
#   docker compose exec postgres psql -U medinfer -c "CREATE ROLE medinfer_app LOGIN PASSWORD '...'"
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v password="$MEDINFER_APP_DB_PASSWORD" <<'SQL'
CREATE ROLE medinfer_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'password';
SQL
