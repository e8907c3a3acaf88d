"""psycopg 3 with prepare_threshold=0 (every query server-side prepared)
through pgfleet in transaction mode: several threads, mixed workload."""
import sys
import threading

import psycopg

DSN = sys.argv[1]
WORKERS = 6
errors = []


def worker(i):
    try:
        with psycopg.connect(DSN, prepare_threshold=0, autocommit=True) as conn:
            for j in range(60):
                assert conn.execute("SELECT %s::int + %s::int", (i, j)).fetchone()[0] == i + j
                assert conn.execute("SELECT upper(%s)", (f"w{i}",)).fetchone()[0] == f"W{i}"
                with conn.transaction():
                    conn.execute("INSERT INTO drv_psycopg (worker, n) VALUES (%s, %s)", (i, j))
                    n = conn.execute("SELECT count(*) FROM drv_psycopg WHERE worker = %s", (i,)).fetchone()[0]
                    assert n == j + 1, (n, j)
                try:
                    conn.execute("SELECT 1 / %s::int", (0,))
                except psycopg.errors.DivisionByZero:
                    pass
                else:
                    raise AssertionError("expected division by zero")
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO drv_psycopg (worker, n) VALUES (%s, %s)", [(i, 1000 + k) for k in range(20)])
            assert conn.execute("SELECT count(*) FROM drv_psycopg WHERE worker = %s", (i,)).fetchone()[0] == 80
            conn.execute("SET search_path TO public")
            assert conn.execute("SHOW search_path").fetchone()[0] == "public"
    except Exception as e:  # noqa: BLE001 - report everything
        errors.append(f"worker {i}: {e!r}")


with psycopg.connect(DSN, autocommit=True) as c:
    c.execute("DROP TABLE IF EXISTS drv_psycopg")
    c.execute("CREATE TABLE drv_psycopg (worker int, n int)")
threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if errors:
    print("\n".join(errors))
    sys.exit(1)
print("psycopg ok")
