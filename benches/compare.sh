#!/usr/bin/env bash
# Side-by-side benchmark: direct PostgreSQL vs PgBouncer vs pgfleet, on one
# machine, in one run, interleaved (A B C A B C ...), with equal settings:
# transaction mode, same pool size, TCP on 127.0.0.1, SCRAM auth, logging off.
# Prints medians and ratios. Usage:
#   benches/compare.sh                 # full run (ROUNDS=3, DURATION=5)
#   ROUNDS=3 DURATION=3 CASES="S-simple-1 S-simple-50" benches/compare.sh
#   IDLE_CLIENTS=0 skips the idle-RSS measurement; FLEET_WORKERS=1 runs pgfleet single-threaded.
# Needs root or sudo for apt (PostgreSQL, pgbouncer) when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
POOL=${POOL:-20}
IDLE_CLIENTS=${IDLE_CLIENTS:-10000}
# Case = SCRIPT-MODE-CLIENTS. SCRIPT: S (pgbench -S), tpcb (default script),
# C (-S with a new connection per transaction), R8k / R1m (one row of 8 kB /
# 1 MB: large results must not stall in the proxy).
ALL_CASES="S-simple-1 S-simple-10 S-simple-50 S-simple-500 S-extended-1 S-extended-10 S-extended-50 S-extended-500 S-prepared-1 S-prepared-50 tpcb-simple-50 C-simple-10 R8k-simple-1 R1m-simple-1"
CASES=${CASES:-$ALL_CASES}
# Below the ephemeral port range (32768-60999): a client socket lingering in
# TIME_WAIT on a port in that range makes binding the port fail.
base=${PGPORT_BASE:-26432}
pg_port=$base bouncer_port=$((base + 1)) fleet_port=$((base + 2))
ulimit -n 65536 2>/dev/null || true

dir=$(mktemp -d /tmp/pgfleet-bench.XXXXXX)
[ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
. scripts/lib.sh
out="$dir/results.tsv"
: > "$out"
bouncer_pid="" fleet_pid=""
trap bench_cleanup EXIT

echo "== building pgfleet (release)" >&2
cargo build --release --locked -q

echo "== PostgreSQL on $pg_port, PgBouncer on $bouncer_port, pgfleet on $fleet_port (pool $POOL)" >&2
start_primary "$pg_port" "max_connections = 700
shared_buffers = 256MB
synchronous_commit = off
log_min_messages = warning"
export PGPASSWORD=app
"$bindir/pgbench" -h 127.0.0.1 -p "$pg_port" -U app -i -s 10 -q app >/dev/null 2>&1

echo "SELECT repeat('x', 8192);" > "$dir/R8k.sql"
echo "SELECT repeat('x', 1048576);" > "$dir/R1m.sql"
start_bench_bouncer

start_bench_fleet
wait_answering 10 "$bouncer_port" "$fleet_port"

cpu_ticks() { [ -z "$1" ] && echo 0 && return; awk '{print $14 + $15}' "/proc/$1/stat"; }
sys_ticks() { [ -z "$1" ] && echo 0 && return; awk '{print $15}' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

# run_case TARGET CASE ROUND: one pgbench run; appends a TSV line.
run_case() {
  local target=$1 case=$2 round=$3 port pid=""
  case $target in
    direct) port=$pg_port ;;
    pgbouncer) port=$bouncer_port pid=$bouncer_pid ;;
    pgfleet) port=$fleet_port pid=$fleet_pid ;;
  esac
  IFS=- read -r script mode clients <<<"$case"
  local args=(-h 127.0.0.1 -p "$port" -U app -M "$mode" -c "$clients" -j 2 -T "$DURATION" --log --log-prefix="$dir/log")
  [ "$script" = S ] && args+=(-S)
  [ "$script" = C ] && args+=(-S -C)
  [[ $script == R* ]] && args+=(-f "$dir/$script.sql")
  rm -f "$dir"/log*
  local before after text tps failed
  before=$(cpu_ticks "$pid") sys_before=$(sys_ticks "$pid")
  text=$("$bindir/pgbench" "${args[@]}" app 2>&1) || { echo "pgbench failed for $target $case: $text" >&2; return 0; }
  after=$(cpu_ticks "$pid") sys_after=$(sys_ticks "$pid")
  tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' <<<"$text" | head -1)
  failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$text")
  local tx lat
  tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$text")
  # Latency (µs) is the third field of every pgbench --log line.
  lat=$(cat "$dir"/log* 2>/dev/null | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {if (NR) printf "%d %d", a[int(NR*0.5)+(NR*0.5>int(NR*0.5))], a[int(NR*0.99)+(NR*0.99>int(NR*0.99))]; else printf "0 0"}')
  local cpu_ms_per_1k=0 sys_share=0
  if [ -n "$pid" ] && [ "${tx:-0}" -gt 0 ]; then
    cpu_ms_per_1k=$(awk -v t=$((after - before)) -v n="$tx" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", t * 1000 / hz / n * 1000}')
    sys_share=$(awk -v t=$((after - before)) -v s=$((sys_after - sys_before)) 'BEGIN {printf "%.3f", t ? s / t : 0}')
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$case" "$target" "$round" "${tps:-0}" "$lat" "$cpu_ms_per_1k" "$sys_share" "${failed:-0}" | tr ' ' '\t' >> "$out"
  echo "  $case $target round $round: tps ${tps:-0}" >&2
}

for round in $(seq "$ROUNDS"); do
  for case in $CASES; do
    for target in direct pgbouncer pgfleet; do
      # PgBouncer (Debian's 1.18) has no prepared statements in transaction mode.
      if [[ $case == S-prepared-* && $target == pgbouncer ]]; then continue; fi
      run_case "$target" "$case" "$round"
    done
  done
done

# RSS per idle client: open IDLE_CLIENTS authenticated idle connections.
idle_rss() {
  local port=$1 pid=$2 before after
  before=$(rss_kb "$pid")
  python3 - "$port" "$IDLE_CLIENTS" <<'PY' &
import socket, sys, time, hashlib, hmac, base64, os, struct
port, n = int(sys.argv[1]), int(sys.argv[2])
def msg(t, b): return t + struct.pack('!I', len(b) + 4) + b
def read(s):
    h = b''
    while len(h) < 5: h += s.recv(5 - len(h))
    n = struct.unpack('!I', h[1:5])[0] - 4; b = b''
    while len(b) < n: b += s.recv(n - len(b))
    return h[:1], b
salted = {}
socks = []
for i in range(n):
    s = socket.create_connection(('127.0.0.1', port))
    body = struct.pack('!I', 196608) + b'user\0app\0database\0app\0\0'
    s.sendall(struct.pack('!I', len(body) + 4) + body)
    nonce = base64.b64encode(os.urandom(18)).decode()
    first_bare = 'n=,r=' + nonce
    while True:
        t, b = read(s)
        if t == b'R':
            code = struct.unpack('!I', b[:4])[0]
            if code == 10:
                cf = ('n,,' + first_bare).encode()
                s.sendall(msg(b'p', b'SCRAM-SHA-256\0' + struct.pack('!I', len(cf)) + cf))
            elif code == 11:
                sf = b[4:].decode(); attrs = dict(kv.split('=', 1) for kv in sf.split(','))
                key = (attrs['s'], attrs['i'])
                if key not in salted:
                    salted[key] = hashlib.pbkdf2_hmac('sha256', b'app', base64.b64decode(attrs['s']), int(attrs['i']))
                sp = salted[key]
                ck = hmac.new(sp, b'Client Key', 'sha256').digest()
                sk = hashlib.sha256(ck).digest()
                without = 'c=biws,r=' + attrs['r']
                am = (first_bare + ',' + sf + ',' + without).encode()
                sig = hmac.new(sk, am, 'sha256').digest()
                proof = base64.b64encode(bytes(a ^ b for a, b in zip(ck, sig))).decode()
                s.sendall(msg(b'p', (without + ',p=' + proof).encode()))
        elif t == b'Z':
            break
        elif t == b'E':
            raise SystemExit('login failed: %r' % b)
    socks.append(s)
print('open', file=sys.stderr, flush=True)
time.sleep(600)
PY
  local py=$!
  for _ in $(seq 600); do
    [ "$(ls /proc/$py/fd 2>/dev/null | wc -l)" -ge "$IDLE_CLIENTS" ] && break
    sleep 0.5
  done
  sleep 2
  after=$(rss_kb "$pid")
  kill $py 2>/dev/null; wait $py 2>/dev/null || true
  awk -v a="$after" -v b="$before" -v n="$IDLE_CLIENTS" 'BEGIN {printf "%.2f", (a - b) / n}'
}
rss_bouncer=- rss_fleet=-
if [ "$IDLE_CLIENTS" -gt 0 ]; then
  echo "== RSS per idle client ($IDLE_CLIENTS connections each)" >&2
  rss_bouncer=$(idle_rss "$bouncer_port" "$bouncer_pid")
  rss_fleet=$(idle_rss "$fleet_port" "$fleet_pid")
fi

python3 - "$out" "$rss_bouncer" "$rss_fleet" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(list)
per_round = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    case, target, rnd, tps, p50, p99, cpu, sys_share, failed = line.rstrip('\n').split('\t')
    rows[(case, target)].append((float(tps), int(p50), int(p99), float(cpu), int(failed), float(sys_share)))
    per_round[(case, target)][rnd] = float(tps)
med = lambda v: statistics.median(v) if v else 0
cases = list(dict.fromkeys(c for c, _ in rows))
print(f"{'case':18} {'direct tps':>11} {'bouncer tps':>12} {'pgfleet tps':>12} {'fleet/bouncer':>14} {'fleet/direct':>13} "
      f"{'rounds f/b':>10} {'p50 us d/b/f':>18} {'+p50 b/f':>11} {'p99 us d/b/f':>20} {'cpu ms/1k b/f':>15} {'cpu f/b':>8} {'kernel % b/f':>13} {'failed':>7}")
for c in cases:
    m = {t: [med([r[i] for r in rows[(c, t)]]) for i in range(6)] for t in ('direct', 'pgbouncer', 'pgfleet') if (c, t) in rows}
    g = lambda t, i: m[t][i] if t in m else float('nan')
    ratio = lambda a, b: a / b if b else float('nan')
    # fleet/bouncer per round (the runs of a round are back to back): the spread is the noise.
    rr = [ratio(per_round[(c, 'pgfleet')][k], b) for k, b in per_round[(c, 'pgbouncer')].items() if k in per_round[(c, 'pgfleet')]]
    spread = f"{min(rr):.2f}-{max(rr):.2f}" if rr else "-"
    print(f"{c:18} {g('direct',0):11.0f} {g('pgbouncer',0):12.0f} {g('pgfleet',0):12.0f} "
          f"{ratio(g('pgfleet',0), g('pgbouncer',0)):14.2f} {ratio(g('pgfleet',0), g('direct',0)):13.2f} {spread:>10} "
          f"{g('direct',1):6.0f}/{g('pgbouncer',1):5.0f}/{g('pgfleet',1):5.0f} {g('pgbouncer',1)-g('direct',1):5.0f}/{g('pgfleet',1)-g('direct',1):5.0f} {g('direct',2):6.0f}/{g('pgbouncer',2):6.0f}/{g('pgfleet',2):6.0f} "
          f"{g('pgbouncer',3):7.1f}/{g('pgfleet',3):6.1f} {ratio(g('pgfleet',3), g('pgbouncer',3)):8.2f} {100*g('pgbouncer',5):6.0f}/{100*g('pgfleet',5):5.0f} "
          f"{int(sum(r[4] for t in ('direct','pgbouncer','pgfleet') for r in rows.get((c, t), []))):7d}")
print("(rounds f/b: lowest and highest pgfleet/PgBouncer TPS ratio of a single round; +p50: latency added over direct PostgreSQL, median of the rounds' p50s; kernel %: share of the proxy's CPU time spent in the kernel)")
print(f"\nRSS per idle client: PgBouncer {sys.argv[2]} kB, pgfleet {sys.argv[3]} kB")
PY
