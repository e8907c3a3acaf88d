//! Classifier microbenchmark (no external harness): ns per call for typical
//! statements. Run: `cargo bench --bench classify`. Target: < 300 ns for a
//! typical 100-byte SELECT.

use pgfleet::router::classify;
use std::hint::black_box;
use std::time::Instant;

fn main() {
    let cases = [
        ("pgbench -S", "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;"),
        (
            "100-byte SELECT",
            "SELECT u.id, u.name, u.email FROM users u WHERE u.org_id = $1 AND u.active ORDER BY u.created_at DESC LIMIT 50",
        ),
        ("UPDATE", "UPDATE pgbench_accounts SET abalance = abalance + -3344 WHERE aid = 48213;"),
        ("INSERT", "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 2, 3, CURRENT_TIMESTAMP);"),
        ("CTE + comment", "/* app:list */ WITH recent AS (SELECT * FROM events WHERE ts > now() - interval '1 hour') SELECT count(*) FROM recent"),
        ("SET", "SET search_path TO app, public"),
    ];
    let extra: Vec<String> = Vec::new();
    for (name, sql) in cases {
        let iters = 1_000_000u32;
        for _ in 0..iters / 10 {
            black_box(classify(black_box(sql), &extra));
        }
        let t = Instant::now();
        for _ in 0..iters {
            black_box(classify(black_box(sql), &extra));
        }
        println!("{name:20} {:4} bytes {:8.1} ns/call", sql.len(), t.elapsed().as_nanos() as f64 / iters as f64);
    }
}
