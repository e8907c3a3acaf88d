//! Failures of real servers on private clusters (never the shared one):
//! a replica promoted after the primary stops, a replica killed under
//! pgbench, and a "primary" that is really a standby.

use crate::harness::*;
use pgfleet::topology::Writer;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn one_replica_extra(c: &Cluster, replica_groups: &[&str]) -> String {
    let mut s = String::from("lag_check_interval = \"100ms\"\nfailover_timeout = \"20s\"\n");
    for (i, port) in c.replicas.iter().enumerate() {
        s.push_str(&format!(
            "[[cluster.replicas]]\nname = \"r{}\"\naddr = \"127.0.0.1:{port}\"\ngroups = [\"{}\"]\n",
            i + 1,
            replica_groups[i]
        ));
    }
    s.push_str("[[cluster.groups]]\nname = \"default\"\nmax_lag = \"10s\"\nfallback = [\"primary\"]\n");
    s.push_str("[routing]\ndefault_workload = \"default\"\n");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_replica_takes_writes_without_restart_and_no_acked_write_is_lost() {
    let c = Arc::new(tokio::task::spawn_blocking(|| private_cluster("failover", 1)).await.unwrap());
    let p = start(config_for(&c, "size = 4", &one_replica_extra(&c, &["default"]))).await;
    let url = conn_str(&p, "app", "app", "app");
    connect_with(&url).await.unwrap().batch_execute("CREATE TABLE fo (v int PRIMARY KEY)").await.unwrap();

    // One writer, reconnecting on errors; every acknowledged value is recorded.
    let acked = Arc::new(Mutex::new(Vec::<(i32, Instant)>::new()));
    let failures = Arc::new(Mutex::new(Vec::<(Instant, String)>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (acked, failures, stop, url) = (acked.clone(), failures.clone(), stop.clone(), url.clone());
        tokio::spawn(async move {
            let mut client: Option<tokio_postgres::Client> = None;
            let mut v = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    match connect_with(&url).await {
                        Ok(c) => client = Some(c),
                        Err(e) => {
                            failures.lock().unwrap().push((Instant::now(), format!("connect: {e}")));
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    }
                }
                v += 1;
                match client.as_ref().unwrap().execute("INSERT INTO fo VALUES ($1)", &[&v]).await {
                    Ok(_) => acked.lock().unwrap().push((v, Instant::now())),
                    Err(e) => failures.lock().unwrap().push((Instant::now(), format!("insert {v}: {e:?}"))),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = acked.lock().unwrap().len();
    assert!(before > 20, "writes flow before the failover: {before}");

    let c2 = c.clone();
    let stop_began = Instant::now();
    let stopped_at = tokio::task::spawn_blocking(move || {
        let out = c2.pg_ctl("primary", &["stop", "-m", "fast", "-w"]);
        assert!(out.status.success(), "{out:?}");
        let t = Instant::now();
        std::thread::sleep(Duration::from_millis(800));
        let out = c2.pg_ctl("replica0", &["promote", "-w"]);
        assert!(out.status.success(), "{out:?}");
        t
    })
    .await
    .unwrap();
    // Writes resume on the promoted replica.
    let resumed = loop {
        if let Some((_, t)) = acked.lock().unwrap().iter().find(|(_, t)| *t > stopped_at) {
            break *t;
        }
        assert!(stopped_at.elapsed() < Duration::from_secs(20), "writes never resumed: {:?}", failures.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();

    assert_eq!(p.app.topology().writer(), Writer::Replica(0));
    let acked: Vec<i32> = acked.lock().unwrap().iter().map(|(v, _)| *v).collect();
    let failures = failures.lock().unwrap().clone();
    let last_before = acked.iter().filter(|_| true).count();
    eprintln!(
        "failover: {} writes acknowledged, {} failed ({failures:?}), gap from primary stop to first write on the new primary: {} ms",
        last_before,
        failures.len(),
        resumed.duration_since(stopped_at).as_millis()
    );
    // Only what was in flight while the primary stopped may fail: nothing
    // before the stop began, nothing once writes resumed, and no more than
    // the one writer can have had in flight meanwhile (one per attempt).
    assert!(failures.iter().all(|(t, _)| *t >= stop_began && *t <= resumed), "{failures:?}");
    assert!(failures.len() <= 2, "{failures:?}");
    // Every acknowledged write is on the new primary.
    let c3 = c.clone();
    let present: Vec<i32> = tokio::task::spawn_blocking(move || c3.psql_on(c3.replicas[0], "app", "SELECT string_agg(v::text, ',') FROM fo"))
        .await
        .unwrap()
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let missing: Vec<_> = acked.iter().filter(|v| !present.contains(v)).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    // The session that waited out the switch, and new ones, work.
    let after = connect_with(&url).await.unwrap();
    after.execute("INSERT INTO fo VALUES (-1)", &[]).await.unwrap();

    // The old primary comes back still thinking it is the primary (two
    // primaries). A reload that changes anything in [cluster] must keep
    // writes on the promoted server: no split brain.
    let c4 = c.clone();
    tokio::task::spawn_blocking(move || c4.pg_ctl_start("primary"))
        .await
        .unwrap();
    let extra = one_replica_extra(&c, &["default"]).replace("\"100ms\"", "\"150ms\"");
    p.app.apply(config_for(&c, "size = 4", &extra));
    tokio::time::sleep(Duration::from_millis(800)).await; // several monitor rounds
    assert_eq!(
        p.app.topology().writer(),
        Writer::Replica(0),
        "the reload must keep the promoted writer"
    );
    after
        .execute("INSERT INTO fo VALUES (-2)", &[])
        .await
        .unwrap();
    let on = |port: u16, v: i32| {
        let c = c.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                c.psql_on(
                    port,
                    "app",
                    &format!("SELECT count(*) FROM fo WHERE v = {v}"),
                )
            })
            .await
            .unwrap()
                == "1"
        }
    };
    assert!(
        on(c.replicas[0], -2).await,
        "a write after the reload reached the promoted server"
    );
    assert!(
        !on(c.primary, -2).await,
        "a write after the reload reached the old primary"
    );

    // The operator fails back on purpose: the promoted server leaves the
    // config and writes go to the configured primary again. The pool's idle
    // connections to the promoted server must not be reused for them.
    let extra = "lag_check_interval = \"100ms\"\n[[cluster.groups]]\nname = \"default\"\nfallback = [\"primary\"]\n[routing]\ndefault_workload = \"default\"\n";
    p.app.apply(config_for(&c, "size = 4", extra));
    after
        .execute("INSERT INTO fo VALUES (-3)", &[])
        .await
        .unwrap();
    assert!(
        on(c.primary, -3).await,
        "the write after failing back reached the configured primary"
    );
    assert!(
        !on(c.replicas[0], -3).await,
        "the write after failing back went to the server the pool left"
    );
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_never_go_to_a_standby() {
    // "primary" points at a streaming replica: writes wait failover_timeout,
    // then fail with 57P03; nothing is attempted on the standby.
    let c = cluster();
    let mut cfg = config("size = 2", "failover_timeout = \"1s\"");
    cfg.cluster.primary = format!("127.0.0.1:{}", c.replicas[0]);
    let p = start(cfg).await;
    // Login needs the server's parameters, from a primary: refused.
    let e = connect_with(&conn_str(&p, "app", "app", "app")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "57P03", "{e:?}");
    assert!(format!("{e:?}").contains("in recovery"), "{e:?}");
    assert_eq!(p.app.pools().iter().map(|p| p.stats().total).sum::<usize>(), 0, "no connection kept to the standby");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_under_pgbench_loses_no_transaction() {
    let c = Arc::new(tokio::task::spawn_blocking(|| private_cluster("kill", 2)).await.unwrap());
    let p = start(config_for(&c, "size = 10", &one_replica_extra(&c, &["default", "default"]))).await;
    wait_replicas_usable(&p).await;
    let port = p.addr.port().to_string();
    let pgbench = {
        let c = c.clone();
        move |args: &[&str]| {
            let mut all = vec!["-h", "127.0.0.1", "-p", &port, "-U", "bench"];
            all.extend_from_slice(args);
            all.push("bench");
            let out = std::process::Command::new(c.bindir.join("pgbench")).args(&all).env("PGPASSWORD", "bench").output().unwrap();
            (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
        }
    };
    let init = pgbench.clone();
    let (ok, text) = tokio::task::spawn_blocking(move || init(&["-i", "-s", "1", "-q"])).await.unwrap();
    assert!(ok, "{text}");
    // Let the replicas catch up with the initialisation before reading.
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_replicas_usable(&p).await;

    // Rate-limited (-R) so the rest of the suite keeps some CPU; 20 clients
    // still have statements in flight when the replica dies.
    let run = tokio::task::spawn_blocking(move || pgbench(&["-S", "-c", "20", "-j", "2", "-T", "20", "-R", "3000"]));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let c2 = c.clone();
    tokio::task::spawn_blocking(move || {
        let out = c2.pg_ctl("replica0", &["stop", "-m", "immediate"]);
        assert!(out.status.success(), "{out:?}");
    })
    .await
    .unwrap();
    let (ok, text) = run.await.unwrap();
    eprintln!("pgbench with a replica killed at 5 s:\n{text}");
    assert!(ok, "pgbench failed:\n{text}");
    assert!(!text.contains("aborted"), "{text}");
    let failed = text
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("0");
    assert_eq!(failed, "0", "{text}");
    // The dead replica is out of rotation; the other one kept serving.
    let snap = p.app.topology().snapshot();
    assert!(!snap.replicas[0].reachable, "{snap:?}");
    assert!(snap.replicas[1].groups.iter().all(|(_, ok)| *ok), "{snap:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_kept_on_the_old_primary_runs_nothing_more_there() {
    // Session mode (or a pinned client) keeps its server connection
    // between transactions. When its pool moves to another server (a
    // failover, a reload pointing cluster.primary elsewhere), that
    // connection is to the old primary: the session must end rather than
    // go on writing there.
    let c = cluster();
    let (fwd, carried) = forwarder(c.primary).await;
    let p = start(config("size = 2\nmode = \"session\"", "")).await;
    let old = connect(&p).await;
    old.simple_query("SELECT 1").await.unwrap();
    let mut cfg = config("size = 2\nmode = \"session\"", "");
    cfg.cluster.primary = format!("127.0.0.1:{fwd}");
    p.app.apply(cfg);
    let e = old.simple_query("SELECT 1").await.unwrap_err();
    assert!(e.is_closed() || e.code().map(|c| c.code()) == Some("08006"), "{e}");
    let new = connect(&p).await;
    new.simple_query("SELECT 1").await.unwrap();
    assert!(carried.load(std::sync::atomic::Ordering::Relaxed) > 0, "the new session is on the new server");
}
