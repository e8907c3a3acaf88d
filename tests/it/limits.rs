//! `[[limits]]` admission control: concurrency budgets, token-bucket rates
//! and the write budget, each with the SQLSTATE and message a client sees.

use crate::harness::*;
use std::time::{Duration, Instant};

fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_budget_queues_then_refuses_with_53300() {
    let p = start(config(
        "size = 5",
        "[[limits]]\nname = \"app-txns\"\nuser = \"app\"\nmax_in_flight = 2\nmax_wait = \"300ms\"",
    ))
    .await;
    let (a, b, c) = (connect(&p).await, connect(&p).await, connect(&p).await);
    a.batch_execute("BEGIN; SELECT 1").await.unwrap();
    b.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let started = Instant::now();
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "53300");
    assert!(message(&e).contains("app-txns"), "names the limit: {e:?}");
    assert!(started.elapsed() >= Duration::from_millis(250), "waited max_wait first");
    // The session survives the refusal; a slot freed while waiting is taken.
    let waiter = tokio::spawn(async move {
        let t = Instant::now();
        c.simple_query("SELECT 1").await.map(|_| t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.batch_execute("COMMIT").await.unwrap();
    let waited = waiter.await.unwrap().expect("admitted once a transaction finished");
    assert!(waited >= Duration::from_millis(80), "{waited:?}");
    // Other users are not limited by this rule.
    let other = connect_with(&conn_str(&p, "bench", "bench", "bench")).await.unwrap();
    other.simple_query("SELECT 1").await.unwrap();
    let admin = connect_with(&conn_str(&p, "admin", "admin", "pgfleet")).await.unwrap();
    let rows = admin.simple_query("SHOW LIMITS").await.unwrap();
    let row = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    }).unwrap();
    assert_eq!(row.get("name"), Some("app-txns"));
    assert_eq!(row.get("in_flight"), Some("1"), "b still holds one slot");
    assert_eq!(row.get("rejected"), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_waiting_for_admission_never_runs_its_statement() {
    use tokio::io::AsyncWriteExt;
    let p = start(config(
        "size = 3",
        "[[limits]]\nname = \"one\"\nuser = \"app\"\nmax_in_flight = 1\nmax_wait = \"20s\"",
    ))
    .await;
    let holder = connect(&p).await;
    holder.batch_execute("CREATE TABLE IF NOT EXISTS left_admission (x int)").await.unwrap();
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let mut gone = RawClient::login(&p, "app", "app").await;
    let mut q = bytes::BytesMut::new();
    pgfleet::wire::build::query(&mut q, "INSERT INTO left_admission VALUES (1)");
    gone.stream.write_all(&q).await.unwrap();
    let limiter = p.app.limits().rules[0].clone();
    let waiting = |n: usize| {
        let limiter = limiter.clone();
        async move {
            for _ in 0..300 {
                if limiter.waiting.load(std::sync::atomic::Ordering::Relaxed) == n {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        }
    };
    assert!(waiting(1).await, "queued for admission");
    drop(gone);
    assert!(waiting(0).await, "left the admission queue when the client closed");
    holder.batch_execute("COMMIT").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let n: i64 = holder.query_one("SELECT count(*) FROM left_admission", &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "the write of a client that left ran anyway");
    assert_eq!(limiter.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_allows_the_burst_then_refuses_with_53300() {
    let p = start(config(
        "size = 2",
        "[[limits]]\ndatabase = \"app\"\nrate = 5\nburst = 3\nmax_wait = \"0s\"",
    ))
    .await;
    let c = connect(&p).await;
    let mut ok = 0;
    let mut refused = Vec::new();
    let started = std::time::Instant::now();
    for _ in 0..8 {
        match c.simple_query("SELECT 1").await {
            Ok(_) => ok += 1,
            Err(e) => refused.push(e),
        }
    }
    // The burst, plus what 5/s refilled meanwhile (a loaded machine is slow).
    let refilled = (started.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!((3..=3 + refilled).contains(&ok), "burst of 3 (+{refilled} refilled at most): {ok}");
    assert!(ok < 8, "nothing was refused");
    assert!(refused.iter().all(|e| sqlstate(e) == "53300"), "{refused:?}");
    assert!(message(&refused[0]).contains("database=app"), "{:?}", refused[0]);
    // Tokens come back at the configured rate.
    tokio::time::sleep(Duration::from_millis(450)).await;
    c.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_budget_limits_primary_transactions_only() {
    let _r = REPLICAS.read().await;
    let extra = routing_extra("10s", "off")
        + "[[limits]]\nname = \"writes\"\nworkload = \"default\"\nwrites_only = true\nmax_in_flight = 1\nmax_wait = \"200ms\"\n";
    let p = start(config("size = 4", &extra)).await;
    wait_replicas_usable(&p).await;
    let setup = connect(&p).await;
    setup.batch_execute("CREATE TABLE IF NOT EXISTS limits_w (v int)").await.unwrap();
    let writer = connect(&p).await;
    writer.batch_execute("BEGIN; INSERT INTO limits_w VALUES (1)").await.unwrap();
    // A second write waits for the budget and is refused...
    let other = connect(&p).await;
    let e = other.simple_query("INSERT INTO limits_w VALUES (2)").await.unwrap_err();
    assert_eq!(sqlstate(&e), "53300");
    assert!(message(&e).contains("\"writes\""), "{e:?}");
    // ...while reads (replica) keep flowing.
    for _ in 0..10 {
        assert_ne!(port_of(&other, "SELECT inet_server_port()::text").await, cluster().primary);
    }
    writer.batch_execute("COMMIT").await.unwrap();
    other.simple_query("INSERT INTO limits_w VALUES (3)").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_between_transactions_holds_no_admission() {
    // A LISTEN worker keeps its server connection, but idle it is no
    // transaction in flight: it must not hold max_in_flight forever, and
    // its own next transactions are admitted (and counted) again.
    let p = start(config(
        "size = 5",
        "[[limits]]\nname = \"one-at-a-time\"\nuser = \"app\"\nmax_in_flight = 1\nmax_wait = \"300ms\"",
    ))
    .await;
    let (listener, other) = (connect(&p).await, connect(&p).await);
    listener.batch_execute("LISTEN pgfleet_pinned_admission").await.unwrap();
    other.simple_query("SELECT 1").await.expect("the idle pinned client holds no permit");
    // The pinned client's own transaction takes the permit again...
    listener.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let e = other.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "53300", "{e:?}");
    // ...and gives it back when it ends.
    listener.batch_execute("COMMIT").await.unwrap();
    other.simple_query("SELECT 1").await.unwrap();
    listener.simple_query("SELECT 1").await.unwrap();
    // With the budget full, the pinned client is not made to wait (its
    // connection may hold the lock the others wait for).
    other.batch_execute("BEGIN").await.unwrap();
    let t0 = std::time::Instant::now();
    listener.simple_query("SELECT 1").await.expect("never refused");
    assert!(t0.elapsed() < Duration::from_millis(250), "did not wait: {:?}", t0.elapsed());
    other.batch_execute("COMMIT").await.unwrap();
}
