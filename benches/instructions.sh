#!/usr/bin/env bash
# Instructions pgfleet and PgBouncer execute per transaction, counted by
# valgrind's callgrind. Unlike time, the count does not move with the machine's noise,
# so it can tell two builds apart by 1 %. Counts user-space work only (the
# kernel's share of the proxy's CPU is in compare.sh's "kernel %" column).
# Usage:
#   benches/instructions.sh                        # pgbench -S -M simple, 1 client
#   MODE=extended CLIENTS=4 TX=2000 benches/instructions.sh
#   CLIENTS=500 TX=10 WARMUP=5 benches/instructions.sh  # transactions per client
#   ARGS="-f my.sql" benches/instructions.sh       # other pgbench arguments (default -S)
# Prints instructions per transaction of each proxy, their ratio, and the
# functions that execute them;
# the callgrind files stay in $OUT (default /tmp/pgfleet-instructions).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps
command -v valgrind >/dev/null || { echo "installing valgrind (apt)..." >&2; apt-get install -y -qq valgrind >/dev/null; }
MODE=${MODE:-simple} CLIENTS=${CLIENTS:-1} TX=${TX:-2000} POOL=${POOL:-20}
OUT=${OUT:-/tmp/pgfleet-instructions}
rm -rf "$OUT" && mkdir -p "$OUT"
# Below the ephemeral port range (see compare.sh).
base=${PGPORT_BASE:-28432}
pg_port=$base bouncer_port=$((base + 1)) fleet_port=$((base + 2))
dir=$(mktemp -d /tmp/pgfleet-instr.XXXXXX)
[ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
. scripts/lib.sh
fleet_pid="" bouncer_pid=""
trap bench_cleanup EXIT
cargo build --release --locked -q
start_primary "$pg_port" "shared_buffers = 256MB
synchronous_commit = off"
export PGPASSWORD=app
"$bindir/pgbench" -h 127.0.0.1 -p "$pg_port" -U app -i -s 10 -q app >/dev/null 2>&1
chown postgres "$OUT" 2>/dev/null || true # PgBouncer runs as postgres and writes its profile there
vg="valgrind --tool=callgrind --callgrind-out-file=$OUT/callgrind.out.%p"
FLEET_WRAPPER="$vg" start_bench_fleet
BOUNCER_WRAPPER="$vg" start_bench_bouncer
wait_answering 60 "$fleet_port" "$bouncer_port" # slow to start under valgrind
bench() { "$bindir/pgbench" -h 127.0.0.1 -p "$1" -U app ${ARGS:--S} -M "$MODE" -c "$CLIENTS" -j 1 -t "$2" app 2>&1 | grep -E "^number of (transactions actually|failed)"; }

# measure NAME PORT PID [AS]: instructions per transaction of one proxy. Two
# measured runs of TX and 2*TX transactions per client: their difference is
# TX transactions per client without the logins and goodbyes.
measure() {
  local name=$1 port=$2 pid=$3 as=${4:-} n f totals=()
  bench "$port" "${WARMUP:-200}" >/dev/null # warm-up: first server connections, caches
  for n in "$TX" $((2 * TX)); do
    $as callgrind_control -z "$pid" >/dev/null
    bench "$port" "$n" >&2
    $as callgrind_control -d "run-$n" "$pid" >/dev/null
    sleep 0.5
    f=$(ls -t "$OUT"/callgrind.out."$pid".* | sed -n 1p)
    mv "$f" "$OUT/$name-$n.out"
    totals+=("$(sed -n 's/^summary: \([0-9]*\).*/\1/p' "$OUT/$name-$n.out")")
  done
  echo $(((totals[1] - totals[0]) / (TX * CLIENTS)))
}
fleet_ipt=$(measure pgfleet "$fleet_port" "$fleet_pid")
# vgdb talks to a valgrind of its own user only.
bouncer_ipt=$(measure pgbouncer "$bouncer_port" "$bouncer_pid" as_pg)
awk -v f="$fleet_ipt" -v b="$bouncer_ipt" -v m="$MODE" -v c="$CLIENTS" -v args="${ARGS:--S}" \
  'BEGIN {printf "instructions per transaction (pgbench %s -M %s -c %s): pgfleet %d, PgBouncer %d, pgfleet/PgBouncer %.2f\n", args, m, c, f, b, f / b}'
for name in pgfleet pgbouncer; do
  echo "top $name functions (self), run of $((2 * TX)) transactions per client:"
  # Functions still on the stack when the counters were zeroed show their
  # whole run as self cost (100 %); leave them out.
  callgrind_annotate --inclusive=no --threshold=100 "$OUT/$name-$((2 * TX)).out" 2>/dev/null |
    sed -n '/file:function/,$p' | grep -v '(100.0%)' | grep '%)' | sed -n '1,25p' | cut -c1-160
done
