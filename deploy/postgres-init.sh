#!/bin/sh
# The lake catalog's roles and database (run by the postgres image once, on an empty data folder):
#   LAKE_USER  owns the database LAKE_DATABASE: the writers (workers, Ray jobs, compaction) create
#              and change the catalog tables;
#   QUERY_USER reads them, and every table the owner creates later (default privileges): query
#              connections cannot write the catalog whatever SQL they are given.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v lake_db="$LAKE_DATABASE" -v lake_user="$LAKE_USER" -v lake_password="$LAKE_PASSWORD" \
  -v query_user="$QUERY_USER" -v query_password="$QUERY_PASSWORD" <<'SQL'
CREATE ROLE :"lake_user" LOGIN PASSWORD :'lake_password';
CREATE ROLE :"query_user" LOGIN PASSWORD :'query_password';
CREATE DATABASE :"lake_db" OWNER :"lake_user";
REVOKE ALL ON DATABASE :"lake_db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"lake_db" TO :"query_user";
\connect :"lake_db"
ALTER SCHEMA public OWNER TO :"lake_user";
GRANT USAGE ON SCHEMA public TO :"query_user";
ALTER DEFAULT PRIVILEGES FOR ROLE :"lake_user" IN SCHEMA public GRANT SELECT ON TABLES TO :"query_user";
SQL
