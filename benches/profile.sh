#!/usr/bin/env bash
# Profiles pgfleet (release) under pgbench with perf: where the proxy's CPU
# goes per transaction. Usage:
#   benches/profile.sh                         # -S -M simple -c 50, 10 s
#   MODE=extended CLIENTS=10 SECONDS_=5 benches/profile.sh
#   ARGS="-S -C" CLIENTS=10 benches/profile.sh   # other pgbench arguments (default -S)
# Writes perf.data and a text report to $OUT (default /tmp/pgfleet-profile).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps
command -v perf >/dev/null || { echo "perf is needed (apt-get install linux-perf)" >&2; exit 1; }
MODE=${MODE:-simple} CLIENTS=${CLIENTS:-50} SECONDS_=${SECONDS_:-10} POOL=${POOL:-20}
OUT=${OUT:-/tmp/pgfleet-profile}
mkdir -p "$OUT"
# Below the ephemeral port range (see compare.sh).
base=${PGPORT_BASE:-27432}
pg_port=$base fleet_port=$((base + 2))
dir=$(mktemp -d /tmp/pgfleet-prof.XXXXXX)
[ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
. scripts/lib.sh
fleet_pid=""
trap bench_cleanup EXIT
cargo build --release --locked -q
start_primary "$pg_port" "max_connections = 200
shared_buffers = 256MB
synchronous_commit = off"
export PGPASSWORD=app
"$bindir/pgbench" -h 127.0.0.1 -p "$pg_port" -U app -i -s 10 -q app >/dev/null 2>&1
start_bench_fleet
wait_answering 10 "$fleet_port"
perf record -F 2000 -g --call-graph dwarf,16384 -o "$OUT/perf.data" -p "$fleet_pid" -- sleep "$SECONDS_" >/dev/null 2>&1 &
perf_pid=$!
"$bindir/pgbench" -h 127.0.0.1 -p "$fleet_port" -U app ${ARGS:--S} -M "$MODE" -c "$CLIENTS" -j 2 -T "$SECONDS_" app 2>&1 | grep -E "^tps|failed"
wait "$perf_pid" || true
# (no `head` in these pipelines: with pipefail, its early exit would end the script)
perf report -i "$OUT/perf.data" --no-children --percent-limit 0.7 --stdio 2>/dev/null | grep -v "^$" > "$OUT/report.txt" || true
perf report -i "$OUT/perf.data" --no-children --sort symbol --percent-limit 0.3 --stdio -g none 2>/dev/null | grep -v "^#" | grep -v "^$" > "$OUT/flat.txt" || true
echo "report: $OUT/flat.txt (flat), $OUT/report.txt (call graphs)"
