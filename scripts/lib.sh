# Shared shell helpers: start/stop throwaway PostgreSQL servers in a temp dir
# as the postgres OS user when run as root. Source it; needs $dir set.
bindir=$(pg_config --bindir)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# start_primary PORT [extra postgresql.conf lines]: primary in $dir/primary
# with roles app/app (database app) and scram auth over TCP.
start_primary() {
  local port=$1 extra=${2:-}
  as_pg "$bindir/initdb" -U postgres --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C -D "$dir/primary" >/dev/null
  cat >> "$dir/primary/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
wal_level = replica
max_wal_senders = 10
hot_standby = on
max_connections = 200
$extra
CONF
  printf 'local all all trust\nhost replication all 127.0.0.1/32 trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n' > "$dir/primary/pg_hba.conf"
  as_pg "$bindir/pg_ctl" start -w -D "$dir/primary" -l "$dir/primary.log" >/dev/null
  psql_admin "$port" "CREATE ROLE app LOGIN PASSWORD 'app'"
  psql_admin "$port" "CREATE DATABASE app OWNER app"
}

# start_replica NAME PORT PRIMARY_PORT: streaming replica in $dir/NAME.
start_replica() {
  local name=$1 port=$2 primary=$3
  as_pg "$bindir/pg_basebackup" -h 127.0.0.1 -p "$primary" -U postgres -D "$dir/$name" -R -X stream --checkpoint=fast
  echo "port = $port" >> "$dir/$name/postgresql.auto.conf"
  as_pg "$bindir/pg_ctl" start -w -D "$dir/$name" -l "$dir/$name.log" >/dev/null
}

psql_admin() { "$bindir/psql" -X -q -A -t -h "$dir" -p "$1" -U postgres -d postgres -c "$2"; }

stop_servers() {
  for d in "$dir"/replica* "$dir"/primary; do
    [ -f "$d/PG_VERSION" ] && as_pg "$bindir/pg_ctl" stop -D "$d" -m fast >/dev/null 2>&1 || true
  done
}

# start_bench_fleet: release pgfleet on $fleet_port in front of the primary
# on $pg_port, pool $POOL, logging off, ${FLEET_WORKERS:-0} workers; sets
# $fleet_pid. Used by the benchmark scripts.
start_bench_fleet() {
  cat > "$dir/pgfleet.toml" <<TOML
[listen]
addr = "127.0.0.1:$fleet_port"
max_client_conn = 20000
[pool]
size = $POOL
[[users]]
name = "app"
password = "app"
[[databases]]
name = "app"
[cluster]
primary = "127.0.0.1:$pg_port"
[log]
level = "${FLEET_LOG_LEVEL:-error}"
[runtime]
workers = ${FLEET_WORKERS:-0}
TOML
  # FLEET_WRAPPER: a command to run pgfleet under (e.g. valgrind).
  RUST_LOG=${FLEET_LOG_LEVEL:-error} ${FLEET_WRAPPER:-} ./target/release/pgfleet --config "$dir/pgfleet.toml" >/dev/null 2>&1 &
  fleet_pid=$!
}

# start_bench_bouncer: PgBouncer on $bouncer_port with the same settings
# (transaction mode, pool $POOL, scram auth with the server's verifier,
# logging off); sets $bouncer_pid. BOUNCER_WRAPPER: a command to run it under.
start_bench_bouncer() {
  command -v pgbouncer >/dev/null || { echo "installing pgbouncer (apt)..." >&2; apt-get install -y -qq pgbouncer >/dev/null; }
  verifier=$(psql_admin "$pg_port" "SELECT rolpassword FROM pg_authid WHERE rolname = 'app'")
  printf '"app" "%s"\n' "$verifier" > "$dir/userlist.txt"
  cat > "$dir/pgbouncer.ini" <<INI
[databases]
app = host=127.0.0.1 port=$pg_port dbname=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = 20000
max_db_connections = $POOL
log_connections = 0
log_disconnections = 0
log_pooler_errors = 0
stats_period = 60
INI
  chown postgres "$dir/pgbouncer.ini" "$dir/userlist.txt" 2>/dev/null || true
  # runuser resets the open-files limit; raise it for the idle-clients test.
  as_pg sh -c "ulimit -n \$(ulimit -Hn); exec ${BOUNCER_WRAPPER:-} pgbouncer '$dir/pgbouncer.ini'" >/dev/null 2>&1 &
  sleep 0.5
  bouncer_pid=$(pgrep -n -f "pgbouncer $dir/pgbouncer.ini")
}

# bench_cleanup: the benchmark scripts' EXIT trap. Stops the proxies they
# started ($fleet_pid, $bouncer_pid; SIGINT lets valgrind write its
# profile), the servers, and removes $dir.
bench_cleanup() {
  [ -n "${fleet_pid:-}" ] && kill -INT "$fleet_pid" 2>/dev/null || true
  [ -n "${bouncer_pid:-}" ] && kill -INT "$bouncer_pid" 2>/dev/null || true
  sleep 1
  stop_servers
  rm -rf "$dir"
}

# wait_answering SECONDS PORT...: until app/app can run a query on each
# port (PGPASSWORD set), or exit 1 naming the port that stays silent.
wait_answering() {
  local secs=$1 p up
  shift
  for p in "$@"; do
    up=""
    for _ in $(seq $((secs * 5))); do
      "$bindir/psql" -X -q -h 127.0.0.1 -p "$p" -U app -d app -c 'SELECT 1' >/dev/null 2>&1 && up=1 && break
      sleep 0.2
    done
    [ -n "$up" ] || { echo "nothing answers on port $p (see PGPORT_BASE)" >&2; exit 1; }
  done
}
