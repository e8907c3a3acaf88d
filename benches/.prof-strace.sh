#!/usr/bin/env bash
# Profiles pgfleet (release) under pgbench with perf: where the proxy's CPU
# goes per transaction. Usage:
#   benches/profile.sh                         # -S -M simple -c 50, 10 s
#   MODE=extended CLIENTS=10 SECONDS_=5 benches/profile.sh
# Writes perf.data and a text report to $OUT (default /tmp/pgfleet-profile).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps

MODE=${MODE:-simple} CLIENTS=${CLIENTS:-50} SECONDS_=${SECONDS_:-10} POOL=${POOL:-20}
OUT=${OUT:-/tmp/pgfleet-profile}
mkdir -p "$OUT"
base=${PGPORT_BASE:-57432}
pg_port=$base fleet_port=$((base + 2))
dir=$(mktemp -d /tmp/pgfleet-prof.XXXXXX)
[ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
. scripts/lib.sh
fleet_pid=""
cleanup() {
  [ -n "$fleet_pid" ] && kill -INT "$fleet_pid" 2>/dev/null || true
  sleep 0.3
  stop_servers
  rm -rf "$dir"
}
trap cleanup EXIT
cargo build --release --locked -q
start_primary "$pg_port" "max_connections = 200
shared_buffers = 256MB
synchronous_commit = off"
export PGPASSWORD=app
"$bindir/pgbench" -h 127.0.0.1 -p "$pg_port" -U app -i -s 10 -q app >/dev/null 2>&1
cat > "$dir/pgfleet.toml" <<TOML
[listen]
addr = "127.0.0.1:$fleet_port"
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
level = "error"
TOML
RUST_LOG=error ./target/release/pgfleet --config "$dir/pgfleet.toml" >/dev/null 2>&1 &
fleet_pid=$!
sleep 0.5
strace -c -f -p "$fleet_pid" -o "$OUT/strace.txt" & perf_pid=$!; sleep 0.2

"$bindir/pgbench" -h 127.0.0.1 -p "$fleet_port" -U app -S -M "$MODE" -c "$CLIENTS" -j 2 -T "$SECONDS_" app 2>&1 | grep -E "^tps|failed"
wait "$perf_pid" || true


echo "report: $OUT/flat.txt (flat), $OUT/report.txt (call graphs)"
