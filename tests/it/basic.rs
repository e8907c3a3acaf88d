//! tokio-postgres through pgfleet: simple and extended queries, transactions,
//! errors inside transactions, cancel, and session parameters.

use crate::harness::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_queries() {
    let p = proxy(2).await;
    let c = connect(&p).await;
    let rows = c.simple_query("SELECT 1 AS a; SELECT 'x' AS b").await.unwrap();
    let values: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(values, vec!["1", "x"]);
    let row = c.query_one("SELECT $1::int + $2::int, $3::text", &[&40i32, &2i32, &"hi"]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, &str>(1), "hi");
    let rows = c.query("SELECT g FROM generate_series(1, 1000) g", &[]).await.unwrap();
    assert_eq!(rows.len(), 1000);
    // Big values stream through unchanged.
    let big: String = c.query_one("SELECT repeat('x', 1048576)", &[]).await.unwrap().get(0);
    assert_eq!(big.len(), 1 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_rollback_and_errors() {
    let p = proxy(2).await;
    let mut c = connect(&p).await;
    c.batch_execute("DROP TABLE IF EXISTS tx_t; CREATE TABLE tx_t (id int primary key, v text)").await.unwrap();
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO tx_t VALUES (1, 'a')", &[]).await.unwrap();
    tx.commit().await.unwrap();
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO tx_t VALUES (2, 'b')", &[]).await.unwrap();
    tx.rollback().await.unwrap();
    // An error inside a transaction aborts it; the client sees 25P02 until ROLLBACK.
    c.batch_execute("BEGIN").await.unwrap();
    let e = c.batch_execute("INSERT INTO tx_t VALUES (1, 'dup')").await.unwrap_err();
    assert_eq!(sqlstate(&e), "23505");
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    let n: i64 = c.query_one("SELECT count(*) FROM tx_t", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
    // Errors outside transactions leave the session usable.
    let e = c.query("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "22012");
    let e = c.query("SELECT * FROM no_such_table", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "42P01");
    assert_eq!(c.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_only_the_running_query() {
    let p = proxy(3).await;
    let c = connect(&p).await;
    let other = connect(&p).await;
    let token = c.cancel_token();
    let other_task = tokio::spawn(async move {
        other.query_one("SELECT count(*) FROM pg_sleep(1.5)", &[]).await.map(|r| r.get::<_, i64>(0))
    });
    let sleeper = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30) /* cancel-only-running */").await.map(|_| ()) });
    wait_running("cancel-only-running").await;
    let started = std::time::Instant::now();
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), sleeper).await.expect("cancelled in time").unwrap().unwrap_err();
    assert_eq!(sqlstate(&e), "57014");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(other_task.await.unwrap().unwrap(), 1, "the other client's query is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_cancel_key_does_nothing() {
    let p = proxy(2).await;
    let c = connect(&p).await;
    // While a query runs (something a wrong match could cancel).
    let running = tokio::spawn(async move { c.query_one("SELECT count(*) FROM pg_sleep(1) /* bogus-cancel */", &[]).await.map(|r| r.get::<_, i64>(0)) });
    wait_running("bogus-cancel").await;
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(&pgfleet::wire::startup::cancel_request(12345, 678)).await.unwrap();
    // pgfleet answers a cancel by closing the connection, as PostgreSQL does.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.expect("cancel connection closed").unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(running.await.unwrap().unwrap(), 1, "a bogus key cancelled a query");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_follow_the_client() {
    // Pool size 1: both clients share one server connection.
    let p = proxy(1).await;
    let a = connect_with(&format!(
        "{} application_name=alpha options='-c search_path=alpha_schema,public -c TimeZone=Asia/Tokyo'",
        conn_str(&p, "app", "app", "app")
    ))
    .await
    .unwrap();
    let b = connect_with(&format!("{} application_name=beta", conn_str(&p, "app", "app", "app"))).await.unwrap();
    for _ in 0..20 {
        let ra = a.simple_query("SHOW search_path; SHOW application_name; SHOW TimeZone").await.unwrap();
        let rb = b.simple_query("SHOW search_path; SHOW application_name; SHOW TimeZone").await.unwrap();
        let vals = |rows: &[tokio_postgres::SimpleQueryMessage]| -> Vec<String> {
            rows.iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(vals(&ra), vec!["alpha_schema,public", "alpha", "Asia/Tokyo"]);
        let vb = vals(&rb);
        assert_eq!(vb[0], "\"$user\", public");
        assert_eq!(vb[1], "beta");
        assert_ne!(vb[2], "Asia/Tokyo");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_alias_maps_to_server_dbname() {
    let p = proxy(2).await;
    let c = connect_with(&conn_str(&p, "app", "app", "alias")).await.unwrap();
    let db: String = c.query_one("SELECT current_database()", &[]).await.unwrap().get(0);
    assert_eq!(db, "app");
}
