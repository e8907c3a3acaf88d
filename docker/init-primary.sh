#!/bin/bash
# Runs once in the primary container: roles for the app and replication.
set -e
psql -v ON_ERROR_STOP=1 -U postgres <<SQL
CREATE ROLE app LOGIN PASSWORD 'app';
CREATE DATABASE app OWNER app;
CREATE ROLE replicator REPLICATION LOGIN PASSWORD 'replicator';
SQL
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
