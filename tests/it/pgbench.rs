//! pgbench through pgfleet: zero failed transactions, and the server never
//! sees more connections than the pool size.

use crate::harness::*;

fn pgbench(p: &pgfleet::app::Running, args: &[&str]) -> String {
    let port = p.addr.port().to_string();
    let mut all = vec!["-h", "127.0.0.1", "-p", &port, "-U", "bench"];
    all.extend_from_slice(args);
    all.push("bench");
    let out = run_client("pgbench", &all, "bench");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

fn field(text: &str, prefix: &str) -> u64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .and_then(|rest| rest.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| panic!("no {prefix:?} in pgbench output:\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_50_clients_pool_5_simple_extended_prepared() {
    let p = proxy(5).await;
    pgbench(&p, &["-i", "-s", "1", "-q"]);
    for mode in ["simple", "extended", "prepared"] {
        let p2 = &p;
        // Only this proxy's connections: pgfleet applies pgbench's
        // application_name to the server connections serving it.
        let (out, max) = max_server_conns_during("usename = 'bench' AND application_name = 'pgbench'", async move {
            tokio::task::block_in_place(|| pgbench(p2, &["-M", mode, "-c", "50", "-j", "2", "-T", "10"]))
        })
        .await;
        let processed = field(&out, "number of transactions actually processed:");
        assert!(processed > 100, "{mode}: only {processed} transactions\n{out}");
        let failed = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("number of failed transactions:"))
            .map(|r| r.split_whitespace().next().unwrap().parse::<u64>().unwrap())
            .unwrap_or(0);
        assert_eq!(failed, 0, "{mode}: failed transactions\n{out}");
        assert!(max <= 5, "{mode}: server saw {max} connections for a pool of 5");
        assert!(max >= 1);
        assert!(p.app.pools().iter().all(|pl| pl.stats().total <= 5));
    }
}
