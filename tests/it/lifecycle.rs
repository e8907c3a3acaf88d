//! Shutdown and connection lifetime: draining lets in-flight transactions
//! commit, idle server connections expire.

use crate::harness::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_transactions() {
    let p = proxy(2).await;
    let mut busy = connect(&p).await;
    let idle = connect(&p).await;
    busy.batch_execute("DROP TABLE IF EXISTS drain_t; CREATE TABLE drain_t (x int)").await.unwrap();
    let tx = busy.transaction().await.unwrap();
    tx.execute("INSERT INTO drain_t VALUES (1)", &[]).await.unwrap();
    let app = p.app.clone();
    let stopper = tokio::spawn(async move {
        let r = pgfleet::app::Running { addr: p.addr, app, metrics_addr: None, unix_socket: None };
        r.shutdown(Duration::from_secs(10)).await;
    });
    // Past the drain's quiet period (250 ms since the client's last message).
    tokio::time::sleep(Duration::from_millis(600)).await;
    // The idle client is told why it is disconnected.
    let e = idle.simple_query("SELECT 1").await.unwrap_err();
    assert!(e.is_closed() || e.code().map(|c| c.code()) == Some("57P01"), "{e}");
    // No new clients.
    assert!(connect_with(&conn_str_port(p.addr.port())).await.is_err());
    // The transaction in flight finishes and commits.
    tx.execute("INSERT INTO drain_t VALUES (2)", &[]).await.unwrap();
    tx.commit().await.unwrap();
    stopper.await.unwrap();
    let n = cluster().psql_on(cluster().primary, "app", "SELECT count(*) FROM drain_t");
    assert_eq!(n, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_idle_clients_that_hold_a_connection() {
    // A client pinned by LISTEN (a job queue's listener) and a session-mode
    // client hold their server connection between transactions: idle all
    // the same, they are told 57P01 instead of keeping the drain waiting
    // for its whole grace period.
    for mode in ["transaction", "session"] {
        let p = start(config(&format!("size = 2\nmode = \"{mode}\""), "")).await;
        let c = connect(&p).await;
        c.batch_execute("LISTEN drain_jobs").await.unwrap();
        let started = std::time::Instant::now();
        p.shutdown(Duration::from_secs(20)).await;
        assert_eq!(p.app.client_count(), 0, "{mode}: the drain waited out its grace");
        assert!(started.elapsed() < Duration::from_secs(10), "{mode}: {:?}", started.elapsed());
        let e = c.simple_query("SELECT 1").await.unwrap_err();
        assert!(e.is_closed() || e.code().map(|c| c.code()) == Some("57P01"), "{mode}: {e}");
    }
}

/// The kernel's timer of pgfleet's end of the connection from `client`
/// (`/proc/net/tcp`'s `tr`: "02" is the keepalive timer, "00" none).
fn tcp_timer(pgfleet: std::net::SocketAddr, client: std::net::SocketAddr) -> String {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let (local, remote) = (format!(":{:04X}", pgfleet.port()), format!(":{:04X}", client.port()));
    let line = table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 5 && f[1].ends_with(&local) && f[2].ends_with(&remote))
        .expect("pgfleet's socket of the connection");
    line[5].split(':').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sockets_use_tcp_keepalive() {
    // A client host that vanishes without a reset must not hold its
    // session (and a transaction it left open) until pgfleet restarts.
    // The default (on), and listen.tcp_keepalive = "0s" (off).
    for (keepalive, timer) in [(None, "02"), (Some(Duration::ZERO), "00")] {
        let mut cfg = config("size = 1", "");
        if let Some(d) = keepalive {
            cfg.listen.tcp_keepalive = pgfleet::config::Dur(d);
        }
        let p = start(cfg).await;
        let c = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(tcp_timer(p.addr, c.local_addr().unwrap()), timer, "{keepalive:?}");
    }
}

fn conn_str_port(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=app password=app dbname=app connect_timeout=2")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_server_connections_expire() {
    let p = start(config("size = 3\nserver_idle_timeout = \"1s\"", "")).await;
    let c = connect(&p).await;
    c.simple_query("SELECT 1").await.unwrap();
    assert_eq!(p.app.pools()[0].stats().total, 1);
    for _ in 0..60 {
        if p.app.pools()[0].stats().total == 0 {
            // The client still works: a new connection is opened.
            c.simple_query("SELECT 1").await.unwrap();
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("idle connection was not closed");
}
