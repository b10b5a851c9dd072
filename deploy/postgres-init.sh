#!/bin/sh
# The lake catalog's writer role (run by the postgres image once, on an empty data folder). It is no
# superuser: it may create the catalog database and the read-only query role, which
# `hashlake lake init` (the model-init service) then does, granting the query role SELECT on every
# catalog table, present and future.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v lake_user="$LAKE_USER" -v lake_password="$LAKE_PASSWORD" <<'SQL'
CREATE ROLE :"lake_user" LOGIN CREATEDB CREATEROLE PASSWORD :'lake_password';
SQL
