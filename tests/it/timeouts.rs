//! Proxy-enforced timeouts and the SQLSTATE each one gives the client.

use crate::harness::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_cancels_with_57014_and_the_session_goes_on() {
    let p = start(config("size = 2", "[timeouts]\nquery = \"300ms\"")).await;
    let c = connect(&p).await;
    let started = Instant::now();
    let e = c.simple_query("SELECT pg_sleep(10)").await.unwrap_err();
    assert_eq!(sqlstate(&e), "57014");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    let rows = c.simple_query("SELECT 1").await.unwrap();
    assert!(matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(_)));
    // Quick statements are untouched.
    for _ in 0..20 {
        c.simple_query("SELECT pg_sleep(0.01)").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_in_transaction_timeout_rolls_back_with_25p03() {
    let p = start(config("size = 1", "[timeouts]\nidle_in_transaction = \"300ms\"")).await;
    let setup = connect(&p).await;
    setup.batch_execute("DROP TABLE IF EXISTS iit_t; CREATE TABLE iit_t (id int primary key, v int); INSERT INTO iit_t VALUES (1, 0)").await.unwrap();
    drop(setup);
    // A raw client: the 25P03 it is sent when idle is read as is.
    use tokio::io::AsyncWriteExt;
    let mut idle = RawClient::login(&p, "app", "app").await;
    let mut out = bytes::BytesMut::new();
    pgfleet::wire::build::query(&mut out, "BEGIN; UPDATE iit_t SET v = 1 WHERE id = 1");
    idle.stream.write_all(&out).await.unwrap();
    assert_eq!(crate::protocol::read_cycle(&mut idle).await.1, Vec::<String>::new());
    let started = Instant::now();
    assert_eq!(idle.error_code().await.as_deref(), Some("25P03"));
    assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());
    // The single pooled connection is free again, the row unlocked, and the
    // idle transaction's update rolled back.
    let next = connect(&p).await;
    next.batch_execute("SET lock_timeout = '2s'").await.unwrap();
    let v: i32 = next.query_one("SELECT v FROM iit_t WHERE id = 1", &[]).await.unwrap().get(0);
    assert_eq!(v, 0, "the idle transaction's update was committed");
    next.batch_execute("UPDATE iit_t SET v = 2 WHERE id = 1").await.unwrap();
    // Idle counts from the end of the last statement: a statement in a
    // transaction that runs longer than the limit is not idleness.
    let busy = connect(&p).await;
    busy.batch_execute("BEGIN; SELECT pg_sleep(0.6)").await.unwrap();
    busy.batch_execute("UPDATE iit_t SET v = 3 WHERE id = 1; COMMIT").await.expect("not timed out right after a long statement");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_mid_copy_is_idle_in_transaction() {
    // The server waits for the client's COPY data and the client sends
    // none: its transaction (and the table's lock) is held open by a client
    // doing nothing, which idle_in_transaction ends, as between statements.
    use crate::protocol::msg;
    use tokio::io::AsyncWriteExt;
    let p = start(config("size = 1", "[timeouts]\nidle_in_transaction = \"400ms\"")).await;
    connect(&p).await.batch_execute("DROP TABLE IF EXISTS copy_idle; CREATE TABLE copy_idle (v int)").await.unwrap();
    let mut raw = RawClient::login(&p, "app", "app").await;
    let mut out = bytes::BytesMut::new();
    pgfleet::wire::build::query(&mut out, "COPY copy_idle FROM STDIN");
    raw.stream.write_all(&out).await.unwrap();
    while raw.next().await.unwrap().0 != b'G' {}
    raw.stream.write_all(&msg(b'd', b"1\n")).await.unwrap();
    let started = Instant::now();
    assert_eq!(raw.error_code().await.as_deref(), Some("25P03"));
    assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());
    assert!(raw.next().await.is_none(), "connection closed");
    // Nothing was copied, and the one pooled connection serves again.
    let c = connect(&p).await;
    let n: i64 = c.query_one("SELECT count(*) FROM copy_idle", &[]).await.unwrap().get(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_idle_timeout_disconnects_with_57p05() {
    let p = start(config("size = 1", "[timeouts]\nclient_idle = \"300ms\"")).await;
    let mut raw = RawClient::login(&p, "app", "app").await;
    let started = Instant::now();
    assert_eq!(raw.error_code().await.as_deref(), Some("57P05"));
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(raw.next().await.is_none(), "connection closed");
    // An active client is not affected.
    let c = connect(&p).await;
    for _ in 0..8 {
        c.simple_query("SELECT 1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_covers_each_pipelined_query() {
    // Two queries sent at once: the second one's time counts from when the
    // first one ended, not never.
    use tokio::io::AsyncWriteExt;
    let p = start(config("size = 1", "[timeouts]\nquery = \"400ms\"")).await;
    let mut raw = RawClient::login(&p, "app", "app").await;
    let mut out = bytes::BytesMut::new();
    pgfleet::wire::build::query(&mut out, "SELECT 1");
    pgfleet::wire::build::query(&mut out, "SELECT pg_sleep(10)");
    let started = Instant::now();
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(crate::protocol::read_cycle(&mut raw).await, (vec!["1".to_string()], vec![]));
    let (_, errors) = crate::protocol::read_cycle(&mut raw).await;
    assert_eq!(errors, vec!["57014".to_string()]);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_restarts_per_statement_in_a_pipeline() {
    // A pipeline (psycopg 3, pgx) sends a statement and a Flush, reads the
    // result, works for a while and sends the next one before its Sync. The
    // time between is not a query running: the next statement has the
    // whole limit, as with PostgreSQL's statement_timeout.
    use crate::protocol::{msg, tags_to_ready};
    use tokio::io::AsyncWriteExt;
    let p = start(config("size = 1", "[timeouts]\nquery = \"700ms\"")).await;
    let mut raw = RawClient::login(&p, "app", "app").await;
    let mut out = bytes::BytesMut::new();
    out.extend_from_slice(&msg(b'P', b"\0SELECT 1\0\0\0"));
    out.extend_from_slice(&msg(b'B', b"\0\0\0\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'E', b"\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'H', b""));
    raw.stream.write_all(&out).await.unwrap();
    while raw.next().await.unwrap().0 != b'C' {}
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Shorter than the limit: must run to its end.
    let mut out = bytes::BytesMut::new();
    out.extend_from_slice(&msg(b'P', b"\0SELECT pg_sleep(0.3)::text || 'done'\0\0\0"));
    out.extend_from_slice(&msg(b'B', b"\0\0\0\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'E', b"\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'S', b""));
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(tags_to_ready(&mut raw).await, ["1", "2", "D done", "C SELECT 1", "Z"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_data_after_a_failed_copy_does_not_start_the_query_clock() {
    // Session mode keeps the connection bound: CopyData the client still
    // sends after the server failed its COPY goes to the server (which
    // ignores it) and gets no answer. It must not start the clock of the
    // client's next query.
    use crate::protocol::msg;
    use tokio::io::AsyncWriteExt;
    let p = start(config("mode = \"session\"\nsize = 1", "[timeouts]\nquery = \"700ms\"")).await;
    connect(&p).await.batch_execute("DROP TABLE IF EXISTS copy_clock; CREATE TABLE copy_clock (v int)").await.unwrap();
    let mut raw = RawClient::login(&p, "app", "app").await;
    let mut out = bytes::BytesMut::new();
    pgfleet::wire::build::query(&mut out, "COPY copy_clock FROM STDIN");
    raw.stream.write_all(&out).await.unwrap();
    while raw.next().await.unwrap().0 != b'G' {}
    raw.stream.write_all(&msg(b'd', b"not a number\n")).await.unwrap();
    assert_eq!(crate::protocol::read_cycle(&mut raw).await, (vec![], vec!["22P02".to_string()]));
    let mut late = Vec::new();
    for _ in 0..5 {
        late.extend_from_slice(&msg(b'd', b"1\n"));
    }
    late.extend_from_slice(&msg(b'c', b""));
    raw.stream.write_all(&late).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Shorter than the limit: must run to its end.
    let mut out = bytes::BytesMut::new();
    pgfleet::wire::build::query(&mut out, "SELECT pg_sleep(0.3)::text || 'done'");
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(crate::protocol::read_cycle(&mut raw).await, (vec!["done".to_string()], vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_idle_applies_to_clients_that_hold_a_server_connection() {
    // Session mode and a pinned client keep their server connection between
    // transactions: idle, they are closed all the same (57P05), and the
    // connection goes back to the pool.
    use tokio::io::AsyncWriteExt;
    for (mode, pin) in [("session", ""), ("transaction", "LISTEN idle_chan")] {
        let p = start(config(&format!("mode = \"{mode}\"\nsize = 1\ncheckout_timeout = \"5s\""), "[timeouts]\nclient_idle = \"400ms\"")).await;
        let mut raw = RawClient::login(&p, "app", "app").await;
        let mut out = bytes::BytesMut::new();
        pgfleet::wire::build::query(&mut out, if pin.is_empty() { "SELECT 1" } else { pin });
        raw.stream.write_all(&out).await.unwrap();
        assert_eq!(crate::protocol::read_cycle(&mut raw).await.1, Vec::<String>::new(), "{mode}");
        let started = Instant::now();
        assert_eq!(raw.error_code().await.as_deref(), Some("57P05"), "{mode}");
        assert!(started.elapsed() >= Duration::from_millis(300), "{mode}");
        // The only connection serves the next client.
        let c = connect(&p).await;
        tokio::time::timeout(Duration::from_secs(3), c.simple_query("SELECT 1")).await.expect("connection freed").unwrap();
    }
}
