//! Classifier microbenchmarks (criterion): time per call for typical
//! statements. Run: `cargo bench --bench classify`. Target: < 300 ns for a
//! typical 100-byte SELECT.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pgfleet::router::classify;

fn classify_bench(c: &mut Criterion) {
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
    let mut g = c.benchmark_group("classify");
    for (name, sql) in cases {
        g.bench_function(format!("{name} ({} bytes)", sql.len()), |b| b.iter(|| black_box(classify(black_box(sql), &extra))));
    }
    g.finish();
}

criterion_group!(benches, classify_bench);
criterion_main!(benches);
