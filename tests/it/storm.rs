//! A connection storm: thousands of clients at once are queued and served,
//! and the server never sees more than the pool.

use crate::harness::*;
use std::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_clients_at_once_on_a_pool_of_10() {
    // md5 keeps 2,000 logins cheap on both sides (SCRAM is tested elsewhere).
    let p = start(config("size = 10\ncheckout_timeout = \"60s\"", "[auth]\nmethod = \"md5\"")).await;
    let url = format!("{} application_name=storm connect_timeout=60", conn_str(&p, "app", "app", "app"));
    let started = Instant::now();
    let tasks: Vec<_> = (0..2000)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let c = connect_with(&url).await.map_err(|e| format!("connect {i}: {e:?}"))?;
                let row = c.query_one("SELECT $1::int + 1, pg_sleep(0.005)::text", &[&i]).await.map_err(|e| format!("query {i}: {e:?}"))?;
                let v: i32 = row.get(0);
                if v != i + 1 {
                    return Err(format!("client {i} got {v}"));
                }
                Ok::<_, String>(c)
            })
        })
        .collect();
    let ((clients, errors), max) = max_server_conns_during("usename = 'app' AND application_name = 'storm'", async {
        let mut clients = Vec::new();
        let mut errors = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(c) => clients.push(c),
                Err(e) => errors.push(e),
            }
        }
        (clients, errors)
    })
    .await;
    let took = started.elapsed();
    assert!(errors.is_empty(), "{} of 2000 failed, first: {:?}", errors.len(), errors.first());
    assert_eq!(clients.len(), 2000);
    eprintln!("storm: 2000 clients served in {} ms; server connections peaked at {max}", took.as_millis());
    assert!((1..=10).contains(&max), "server saw {max} connections for a pool of 10");
    assert_eq!(p.app.client_count(), 2000, "all still connected");
}
