//! Session state in transaction mode: SET tracking and isolation, and
//! session-only features (LISTEN, advisory locks, temp tables, SQL PREPARE,
//! WITH HOLD cursors) pinning the client or being rejected.

use crate::harness::*;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio_postgres::SimpleQueryMessage;

async fn one(c: &tokio_postgres::Client, sql: &str) -> String {
    let rows = c.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_values_are_isolated_between_clients() {
    let p = proxy(2).await;
    // Logged in first with the same settings as everyone: clients share one
    // settings list until they change theirs (copy on write), so the others'
    // SETs must never show up here.
    let observer = connect(&p).await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let s = conn_str(&p, "app", "app", "app");
        tasks.push(tokio::spawn(async move {
            let c = connect_with(&s).await.unwrap();
            let tz = ["UTC", "Asia/Tokyo", "America/New_York", "Europe/Paris"][i % 4];
            c.batch_execute(&format!(
                "SET search_path = s{i}, public; SET statement_timeout = '{}ms'; SET TimeZone = '{tz}'; SET myapp.client = 'c{i}'",
                1001 + i
            ))
            .await
            .unwrap();
            for _ in 0..40 {
                assert_eq!(one(&c, "SHOW search_path").await, format!("s{i}, public"));
                assert_eq!(one(&c, "SHOW statement_timeout").await, format!("{}ms", 1001 + i));
                assert_eq!(one(&c, "SHOW TimeZone").await, tz);
                assert_eq!(one(&c, "SELECT current_setting('myapp.client')").await, format!("c{i}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for _ in 0..4 {
        assert_eq!(one(&observer, "SHOW search_path").await, "\"$user\", public");
        assert_eq!(one(&observer, "SHOW TimeZone").await, one(&connect(&p).await, "SHOW TimeZone").await);
    }
    // A fresh client sees none of it.
    let c = connect(&p).await;
    for _ in 0..4 {
        assert_eq!(one(&c, "SHOW search_path").await, "\"$user\", public");
        assert_eq!(one(&c, "SHOW statement_timeout").await, "0");
        assert_eq!(one(&c, "SELECT coalesce(current_setting('myapp.client', true), '')").await, "");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_local_rollback_reset_and_set_config() {
    let p = proxy(1).await;
    let c = connect(&p).await;
    let other = connect(&p).await;
    c.batch_execute("BEGIN; SET LOCAL statement_timeout = '5s'; COMMIT").await.unwrap();
    assert_eq!(one(&c, "SHOW statement_timeout").await, "0");
    c.batch_execute("BEGIN; SET statement_timeout = '6s'; ROLLBACK").await.unwrap();
    assert_eq!(one(&c, "SHOW statement_timeout").await, "0");
    c.batch_execute("BEGIN; SET statement_timeout = '7s'; COMMIT").await.unwrap();
    assert_eq!(one(&c, "SHOW statement_timeout").await, "7s");
    assert_eq!(one(&other, "SHOW statement_timeout").await, "0");
    c.batch_execute("RESET statement_timeout").await.unwrap();
    assert_eq!(one(&c, "SHOW statement_timeout").await, "0");
    one(&c, "SELECT set_config('work_mem', '8MB', false)").await;
    assert_eq!(one(&other, "SHOW work_mem").await, "4MB");
    assert_eq!(one(&c, "SHOW work_mem").await, "8MB");
    c.batch_execute("SET lock_timeout = '3s'").await.unwrap();
    c.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(one(&c, "SHOW work_mem").await, "4MB");
    assert_eq!(one(&c, "SHOW lock_timeout").await, "0");
    // Extended protocol SET works the same.
    c.execute("SET search_path TO ext_schema", &[]).await.unwrap();
    assert_eq!(one(&c, "SHOW search_path").await, "ext_schema");
    assert_eq!(one(&other, "SHOW search_path").await, "\"$user\", public");
}

async fn wait_pinned(p: &pgfleet::app::Running, why: &str) {
    for _ in 0..100 {
        if p.app.pinned_clients.load(Ordering::Relaxed) == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("client not pinned: {why}");
}

async fn wait_unpinned(p: &pgfleet::app::Running) {
    for _ in 0..100 {
        if p.app.pinned_clients.load(Ordering::Relaxed) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("client still pinned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_pins_until_unlisten() {
    let p = proxy(2).await;
    let mut listener = RawClient::login(&p, "app", "app").await;
    let mut q = bytes::BytesMut::new();
    pgfleet::wire::build::query(&mut q, "LISTEN fleet_chan");
    listener.stream.write_all(&q).await.unwrap();
    while listener.next().await.unwrap().0 != b'Z' {}
    assert_eq!(p.app.pinned_clients.load(Ordering::Relaxed), 1);
    let notifier = connect(&p).await;
    for i in 0..3 {
        notifier.batch_execute(&format!("NOTIFY fleet_chan, 'hello {i}'")).await.unwrap();
        let (tag, msg) = listener.next().await.unwrap();
        assert_eq!(tag, b'A', "NotificationResponse");
        assert!(String::from_utf8_lossy(&msg).contains(&format!("hello {i}")));
    }
    q.clear();
    pgfleet::wire::build::query(&mut q, "UNLISTEN *");
    listener.stream.write_all(&q).await.unwrap();
    while listener.next().await.unwrap().0 != b'Z' {}
    wait_unpinned(&p).await;
}

/// A notification that arrives while pgfleet's own hidden query (the
/// settings read-back after a SET) runs on the listener's connection is
/// still the client's: none may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_during_hidden_queries_reach_the_listener() {
    let p = proxy(3).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // tokio-postgres delivers notifications through its connection future.
    let url = conn_str(&p, "app", "app", "app");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    let driver = tokio::spawn(async move {
        let mut conn = std::pin::pin!(conn);
        loop {
            match std::future::poll_fn(|cx| conn.as_mut().poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    let _ = tx.send(n.payload().to_string());
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
    });
    client.batch_execute("LISTEN busy_chan").await.unwrap();
    let notifier = connect(&p).await;
    const N: usize = 150;
    let sender = tokio::spawn(async move {
        for i in 0..N {
            notifier.batch_execute(&format!("NOTIFY busy_chan, '{i}'")).await.unwrap();
        }
    });
    // Meanwhile the listener keeps changing a setting: each SET is followed
    // by pgfleet's hidden read-back query on the same connection.
    for i in 0..N {
        client.batch_execute(&format!("SET search_path = s{i}, public")).await.unwrap();
    }
    sender.await.unwrap();
    client.batch_execute("SELECT 1").await.unwrap();
    let mut got = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < N {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(payload)) => {
                got.insert(payload);
            }
            _ => break,
        }
    }
    assert_eq!(got.len(), N, "notifications lost");
    drop(client);
    let _ = driver.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advisory_locks_pin_and_are_released() {
    let p = proxy(2).await;
    let a = connect(&p).await;
    let b = connect(&p).await;
    assert_eq!(one(&a, "SELECT pg_advisory_lock(4242)::text").await, "");
    assert_eq!(p.app.pinned_clients.load(Ordering::Relaxed), 1);
    for _ in 0..5 {
        assert_eq!(one(&a, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()").await, "1");
        assert_eq!(one(&b, "SELECT pg_try_advisory_lock(4242)").await, "f");
    }
    assert_eq!(one(&a, "SELECT pg_advisory_unlock(4242)").await, "t");
    wait_unpinned(&p).await;
    assert_eq!(one(&b, "SELECT pg_try_advisory_lock(4242)").await, "t");
    assert_eq!(one(&b, "SELECT pg_advisory_unlock(4242)").await, "t");
    // A pinned client that disconnects leaves no lock behind (checked
    // from outside pgfleet: the session holding a lock may take it again).
    one(&a, "SELECT pg_advisory_lock(77)::text").await;
    drop(a);
    wait_unpinned(&p).await;
    let held = || tokio::task::block_in_place(|| cluster().psql_admin("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 77"));
    assert_eq!(held(), "0", "the lock outlived its client");
    assert_eq!(one(&b, "SELECT pg_try_advisory_lock(77)").await, "t");
    one(&b, "SELECT pg_advisory_unlock_all()::text").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_tables_and_sql_prepare_pin_the_client() {
    let p = proxy(2).await;
    let a = connect(&p).await;
    let others: Vec<_> = futures_join(&p, 4).await;
    a.batch_execute("CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (1), (2)").await.unwrap();
    a.batch_execute("PREPARE triple(int) AS SELECT $1 * 3").await.unwrap();
    for i in 0..10 {
        for o in &others {
            one(o, "SELECT 1").await;
        }
        assert_eq!(one(&a, "SELECT count(*) FROM scratch").await, "2");
        assert_eq!(one(&a, &format!("EXECUTE triple({i})")).await, (i * 3).to_string());
    }
    // Not leaked to other clients.
    let e = others[0].simple_query("EXECUTE triple(1)").await.unwrap_err();
    assert_eq!(sqlstate(&e), "26000");
    let e = others[0].simple_query("SELECT * FROM scratch").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42P01");
    a.batch_execute("DEALLOCATE triple").await.unwrap();
    assert_eq!(p.app.pinned_clients.load(Ordering::Relaxed), 1, "temp table still pins");
    a.batch_execute("DROP TABLE scratch").await.unwrap();
    wait_unpinned(&p).await;
    // WITH HOLD cursors pin too, CLOSE releases.
    a.batch_execute("DECLARE cur CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 3) g").await.unwrap();
    for o in &others {
        one(o, "SELECT 1").await;
    }
    assert_eq!(one(&a, "FETCH 1 FROM cur").await, "1");
    assert_eq!(one(&a, "FETCH 1 FROM cur").await, "2");
    a.batch_execute("CLOSE cur").await.unwrap();
    wait_unpinned(&p).await;
}

async fn futures_join(p: &pgfleet::app::Running, n: usize) -> Vec<tokio_postgres::Client> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(connect(p).await);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_clients_do_not_deadlock_the_pool() {
    let p = start(config("size = 2\ncheckout_timeout = \"500ms\"", "")).await;
    let a = connect(&p).await;
    let b = connect(&p).await;
    a.batch_execute("LISTEN x").await.unwrap();
    b.batch_execute("LISTEN y").await.unwrap();
    let c = connect(&p).await;
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "53300", "a clear error, not a hang");
    a.batch_execute("UNLISTEN *").await.unwrap();
    wait_for(|| p.app.pinned_clients.load(Ordering::Relaxed) == 1).await;
    let d = connect(&p).await;
    assert_eq!(one(&d, "SELECT 5").await, "5");
}

async fn wait_for(f: impl Fn() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_all_keeps_shared_statements_working() {
    let p = proxy(1).await;
    let a = connect(&p).await;
    let b = connect(&p).await;
    let sb = b.prepare("SELECT $1::int + 100").await.unwrap();
    assert_eq!(b.query_one(&sb, &[&1i32]).await.unwrap().get::<_, i32>(0), 101);
    a.batch_execute("DISCARD ALL").await.unwrap();
    a.batch_execute("DEALLOCATE ALL").await.unwrap();
    // b's statement is re-prepared on the (single) server connection.
    for i in 0..5 {
        assert_eq!(b.query_one(&sb, &[&i]).await.unwrap().get::<_, i32>(0), 100 + i);
    }
    let sa = a.prepare("SELECT $1::int + 100").await.unwrap();
    assert_eq!(a.query_one(&sa, &[&2i32]).await.unwrap().get::<_, i32>(0), 102);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_mode_fails_session_features_with_0a000() {
    let p = start(config("size = 2\nsession_state = \"reject\"", "")).await;
    let c = connect(&p).await;
    for sql in ["LISTEN x", "SELECT pg_advisory_lock(1)", "CREATE TEMP TABLE t (x int)", "PREPARE p AS SELECT 1"] {
        let e = c.simple_query(sql).await.unwrap_err();
        let db = e.as_db_error().unwrap();
        assert_eq!(db.code().code(), "0A000", "{sql}");
        assert!(db.message().contains("transaction pooling"), "{}", db.message());
    }
    // Inside a transaction the failure aborts it like any error.
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(sqlstate(&c.simple_query("LISTEN x").await.unwrap_err()), "0A000");
    assert_eq!(sqlstate(&c.simple_query("SELECT 1").await.unwrap_err()), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(p.app.pinned_clients.load(Ordering::Relaxed), 0);
    assert_eq!(one(&c, "SELECT 2").await, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_taken_while_the_unpin_check_runs_keeps_the_client_pinned() {
    use tokio::io::AsyncWriteExt;
    let p = start(config("size = 2", "")).await;
    let mut raw = RawClient::login(&p, "app", "app").await;
    let q = |sql: &str| {
        let mut m = bytes::BytesMut::new();
        pgfleet::wire::build::query(&mut m, sql);
        m
    };
    for round in 0..20 {
        raw.stream.write_all(&q("SELECT pg_advisory_lock(771)")).await.unwrap();
        until_ready(&mut raw).await;
        assert_eq!(p.app.pinned_clients.load(std::sync::atomic::Ordering::Relaxed), 1);
        // Unlock: pgfleet checks (a hidden query) whether anything is still
        // held. The next lock is sent the moment ReadyForQuery arrives, while
        // that check may still run.
        raw.stream.write_all(&q("SELECT pg_advisory_unlock(771)")).await.unwrap();
        until_ready(&mut raw).await;
        raw.stream.write_all(&q("SELECT pg_advisory_lock(772)")).await.unwrap();
        until_ready(&mut raw).await;
        assert_eq!(p.app.pinned_clients.load(std::sync::atomic::Ordering::Relaxed), 1, "round {round}: lock 772 is held, so the client stays pinned");
        raw.stream.write_all(&q("SELECT pg_advisory_unlock(772)")).await.unwrap();
        until_ready(&mut raw).await;
        wait_for(|| p.app.pinned_clients.load(std::sync::atomic::Ordering::Relaxed) == 0).await;
    }
}

async fn until_ready(raw: &mut RawClient) {
    while let Some((tag, _)) = raw.next().await {
        if tag == b'Z' {
            return;
        }
    }
    panic!("connection closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_the_server_refuses_fails_the_statement_instead_of_running_it_without() {
    // Pool size 1: both clients take turns on one server connection, so the
    // owner's settings are restored on it before each of its transactions.
    let p = proxy(1).await;
    let owner = connect(&p).await;
    let other = connect(&p).await;
    owner
        .batch_execute(
            "DROP TEXT SEARCH CONFIGURATION IF EXISTS public.tsc_refused; \
             CREATE TEXT SEARCH CONFIGURATION public.tsc_refused (COPY = pg_catalog.simple); \
             DROP TABLE IF EXISTS refused_log; CREATE TABLE refused_log (cfg text)",
        )
        .await
        .unwrap();
    owner.batch_execute("SET default_text_search_config = 'public.tsc_refused'").await.unwrap();
    assert_eq!(one(&owner, "SHOW default_text_search_config").await, "public.tsc_refused");
    // Another client takes the connection (the owner's setting is reset
    // there) and drops the configuration: the server now refuses the value.
    assert_eq!(one(&other, "SHOW default_text_search_config").await, "pg_catalog.english");
    other.batch_execute("DROP TEXT SEARCH CONFIGURATION public.tsc_refused").await.unwrap();
    // The owner's statement must not run with the server's default instead.
    let e = owner
        .batch_execute("INSERT INTO refused_log SELECT current_setting('default_text_search_config')")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "22023", "{e:?}");
    assert!(e.as_db_error().unwrap().message().contains("default_text_search_config"), "{e:?}");
    let e = owner.query("SELECT current_setting('default_text_search_config')", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "22023", "{e:?}");
    assert_eq!(one(&other, "SELECT count(*) FROM refused_log").await, "0");
    // The connection was left as it was: the other client still works.
    assert_eq!(one(&other, "SHOW default_text_search_config").await, "pg_catalog.english");
    other.batch_execute("DROP TABLE refused_log").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_startup_option_fails_statements_with_22023() {
    let p = proxy(1).await;
    let bad = connect_with(&format!("{} options='-c statement_timeout=soon'", conn_str(&p, "app", "app", "app")))
        .await
        .unwrap();
    let e = bad.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "22023", "{e:?}");
    assert!(e.as_db_error().unwrap().message().contains("statement_timeout"), "{e:?}");
    // Others on the same server connection are unaffected.
    let good = connect(&p).await;
    assert_eq!(one(&good, "SHOW statement_timeout").await, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_with_quotes_and_backslashes_are_restored_exactly() {
    let p = proxy(1).await;
    let a = connect(&p).await;
    let b = connect(&p).await;
    // The value is restored with set_config on the connection, which `b`
    // left with standard_conforming_strings = off: a plain '' literal would
    // read the backslashes as escapes there.
    a.batch_execute(r"SET standard_conforming_strings = off; SET myapp.path = E'C:\\tmp\\n''x'").await.unwrap();
    b.batch_execute("SET standard_conforming_strings = off").await.unwrap();
    for _ in 0..3 {
        assert_eq!(one(&b, "SELECT coalesce(current_setting('myapp.path', true), '')").await, "");
        assert_eq!(one(&a, "SHOW myapp.path").await, r"C:\tmp\n'x");
    }
}

/// Settings changed where pgfleet cannot see it (a function that calls
/// `set_config(..., false)`, a DO block) stay for the session on
/// PostgreSQL: they follow the client to its next connection and never
/// reach another client (a tenant id set for row-level security must not
/// leak).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_set_inside_functions_and_do_blocks_follow_the_client_only() {
    let c = cluster();
    tokio::task::block_in_place(|| {
        c.psql_on(
            c.primary,
            "app",
            "CREATE OR REPLACE FUNCTION set_tenant_fn(t text) RETURNS text LANGUAGE sql AS $$ SELECT pg_catalog.set_config('tenant_fn.id', t, false) $$",
        )
    });
    for wait_catalog in [false, true] {
        // One connection: every client lands on the same server session.
        let p = proxy(1).await;
        if wait_catalog {
            // The function known as VOLATILE (before: not loaded yet).
            for _ in 0..100 {
                if p.app.catalogs.is_loaded("app") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(p.app.catalogs.is_loaded("app"), "the function catalog loads in transaction mode");
        }
        let a = connect(&p).await;
        let b = connect(&p).await;
        let tenant = "SELECT coalesce(current_setting('tenant_fn.id', true), '')";
        // Catalog not loaded yet: pgfleet cannot tell which custom settings
        // the function set, so the connection is closed after it (the
        // client may lose the value; another client never sees it).
        let follows = wait_catalog;
        assert_eq!(one(&a, "SELECT set_tenant_fn('a')").await, "a");
        assert_eq!(one(&b, tenant).await, "", "another client must not see the setting");
        if follows {
            assert_eq!(one(&a, tenant).await, "a", "the setting stays with its client");
        }
        one(&b, "SELECT set_tenant_fn('b')").await;
        if follows {
            assert_eq!(one(&a, tenant).await, "a");
            assert_eq!(one(&b, tenant).await, "b");
        }
        // In an explicit transaction, through the extended protocol.
        a.batch_execute("BEGIN").await.unwrap();
        let tx = a.query_one("SELECT set_tenant_fn($1)", &[&"a2"]).await.unwrap();
        assert_eq!(tx.get::<_, String>(0), "a2");
        a.batch_execute("COMMIT").await.unwrap();
        assert_ne!(one(&b, tenant).await, "a2");
        if follows {
            assert_eq!(one(&b, tenant).await, "b");
            assert_eq!(one(&a, tenant).await, "a2");
        }
        // A DO block changing a built-in setting and a custom one.
        a.batch_execute("DO $$BEGIN PERFORM pg_catalog.set_config('statement_timeout', '4321', false); SET do_block.id = 'd'; END$$").await.unwrap();
        assert_eq!(one(&b, "SHOW statement_timeout").await, "0");
        assert_eq!(one(&b, "SELECT coalesce(current_setting('do_block.id', true), '')").await, "");
        if follows {
            assert_eq!(one(&a, "SHOW statement_timeout").await, "4321ms");
            assert_eq!(one(&a, "SELECT current_setting('do_block.id')").await, "d");
        }
        // A fresh client sees none of it.
        let fresh = connect(&p).await;
        assert_eq!(one(&fresh, tenant).await, "");
        assert_eq!(one(&fresh, "SHOW statement_timeout").await, "0");
        assert_eq!(one(&fresh, "SELECT coalesce(current_setting('do_block.id', true), '')").await, "");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_returns_to_the_value_the_client_started_with() {
    // On PostgreSQL, RESET (and RESET ALL, DISCARD ALL, SET x TO DEFAULT)
    // goes back to the session's start value: what the client's startup
    // packet said (drivers send TimeZone, DateStyle, application_name,
    // options), not the server's default.
    let p = proxy(1).await;
    let s = format!(
        "{} application_name=startapp options='-c statement_timeout=1234 -c TimeZone=Asia/Tokyo -c myapp.tag=start'",
        conn_str(&p, "app", "app", "app")
    );
    let c = connect_with(&s).await.unwrap();
    let other = connect(&p).await;
    async fn check(c: &tokio_postgres::Client) {
        assert_eq!(one(c, "SHOW statement_timeout").await, "1234ms");
        assert_eq!(one(c, "SHOW TimeZone").await, "Asia/Tokyo");
        assert_eq!(one(c, "SHOW application_name").await, "startapp");
        assert_eq!(one(c, "SELECT current_setting('myapp.tag')").await, "start");
    }
    check(&c).await;
    let set = "SET statement_timeout = '5s'; SET TimeZone = 'UTC'; SET application_name = 'x'; SET myapp.tag = 'x'";
    c.batch_execute(set).await.unwrap();
    assert_eq!(one(&c, "SHOW statement_timeout").await, "5s");
    c.batch_execute("RESET statement_timeout; RESET TimeZone; RESET application_name; RESET myapp.tag").await.unwrap();
    check(&c).await;
    c.batch_execute(set).await.unwrap();
    c.batch_execute("RESET ALL").await.unwrap();
    check(&c).await;
    c.batch_execute(set).await.unwrap();
    c.batch_execute("SET statement_timeout TO DEFAULT; SET TimeZone TO DEFAULT; SET application_name TO DEFAULT").await.unwrap();
    c.batch_execute("SET myapp.tag TO DEFAULT").await.unwrap();
    check(&c).await;
    c.batch_execute(set).await.unwrap();
    c.batch_execute("DISCARD ALL").await.unwrap();
    check(&c).await;
    // A RESET rolled back changes nothing.
    c.batch_execute(set).await.unwrap();
    c.batch_execute("BEGIN; RESET ALL; ROLLBACK").await.unwrap();
    assert_eq!(one(&c, "SHOW statement_timeout").await, "5s");
    assert_eq!(one(&c, "SHOW TimeZone").await, "UTC");
    // A RESET in a DO block: the start value too.
    c.batch_execute(set).await.unwrap();
    c.batch_execute("DO $$BEGIN RESET statement_timeout; RESET myapp.tag; END$$").await.unwrap();
    assert_eq!(one(&c, "SHOW statement_timeout").await, "1234ms");
    assert_eq!(one(&c, "SELECT current_setting('myapp.tag')").await, "start");
    // Extended protocol too; and the other client never sees any of it.
    c.execute("RESET ALL", &[]).await.unwrap();
    check(&c).await;
    assert_eq!(one(&other, "SHOW statement_timeout").await, "0");
    assert_eq!(one(&other, "SELECT coalesce(current_setting('myapp.tag', true), '')").await, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_created_inside_do_blocks_and_functions_pins_the_client() {
    // pgfleet cannot see into a DO block or a function: what they leave on
    // the connection (a temp table, an advisory lock) is found at the end of
    // the transaction, and pins the client like the plain statements would.
    let p = proxy(2).await;
    let a = connect(&p).await;
    let others: Vec<_> = futures_join(&p, 3).await;
    a.batch_execute("DO $$BEGIN CREATE TEMP TABLE scratch_do (x int); INSERT INTO scratch_do VALUES (7); END$$").await.unwrap();
    // (Found by the check that runs after the client has its answer.)
    wait_pinned(&p, "a temp table made by a DO block pins").await;
    for _ in 0..5 {
        for o in &others {
            one(o, "SELECT 1").await;
        }
        assert_eq!(one(&a, "SELECT x FROM scratch_do").await, "7");
    }
    let e = others[0].simple_query("SELECT * FROM scratch_do").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42P01", "another client saw the temp table");
    a.batch_execute("DROP TABLE scratch_do").await.unwrap();
    wait_unpinned(&p).await;
    // An advisory lock taken by a function the application wrote.
    a.batch_execute("CREATE OR REPLACE FUNCTION take_job_lock(k bigint) RETURNS void LANGUAGE sql AS 'SELECT pg_advisory_lock(k)'").await.unwrap();
    // (The function catalog learns of it.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    one(&a, "SELECT take_job_lock(918273)::text").await;
    wait_pinned(&p, "a lock taken by a function pins").await;
    assert_eq!(one(&a, "SELECT pg_advisory_unlock(918273)::text").await, "true", "the lock is on the client's own connection");
    wait_unpinned(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_the_state_check_cannot_see_last_until_the_client_leaves() {
    let p = proxy(2).await;
    let a = connect(&p).await;
    let others: Vec<_> = futures_join(&p, 3).await;
    // A setting whose name is a parameter: pgfleet cannot track it.
    a.query("SELECT set_config($1, $2, false)", &[&"myapp.tenant", &"42"]).await.unwrap();
    // A temporary function (not a table: pg_class does not list it).
    a.batch_execute("CREATE FUNCTION pg_temp.answer() RETURNS int LANGUAGE sql AS 'SELECT 42'").await.unwrap();
    for _ in 0..5 {
        for o in &others {
            one(o, "SELECT 1").await;
        }
        assert_eq!(one(&a, "SELECT current_setting('myapp.tenant')").await, "42");
        assert_eq!(one(&a, "SELECT pg_temp.answer()").await, "42");
        assert_eq!(p.app.pinned_clients.load(Ordering::Relaxed), 1);
    }
    for o in &others {
        assert_eq!(one(o, "SELECT coalesce(current_setting('myapp.tenant', true), '')").await, "", "the setting leaked");
    }
    drop(a);
    wait_unpinned(&p).await;
    // A temporary function alone pins, and dropping it unpins.
    let b = connect(&p).await;
    b.batch_execute("CREATE FUNCTION pg_temp.answer2() RETURNS int LANGUAGE sql AS 'SELECT 43'").await.unwrap();
    for o in &others {
        one(o, "SELECT 1").await;
    }
    assert_eq!(one(&b, "SELECT pg_temp.answer2()").await, "43");
    assert_eq!(p.app.pinned_clients.load(Ordering::Relaxed), 1);
    b.batch_execute("DROP FUNCTION pg_temp.answer2()").await.unwrap();
    wait_unpinned(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_are_read_as_the_server_reads_them_with_standard_conforming_strings_off() {
    // 'O\'Brien' is one string when standard_conforming_strings is off: the
    // lock call after it must be seen (and pin the client).
    let p = proxy(2).await;
    let a = connect(&p).await;
    let others: Vec<_> = futures_join(&p, 3).await;
    a.batch_execute("SET standard_conforming_strings = off").await.unwrap();
    assert_eq!(one(&a, "SELECT 'O\\'Brien' || pg_advisory_lock(4343)::text").await, "O'Brien");
    assert_eq!(p.app.pinned_clients.load(Ordering::Relaxed), 1, "the lock call was not seen");
    for o in &others {
        one(o, "SELECT 1").await;
    }
    assert_eq!(one(&a, "SELECT pg_advisory_unlock(4343)::text").await, "true", "the lock is on the client's own connection");
    wait_unpinned(&p).await;
    // Extended protocol too (a named statement, shared with the sessions
    // that read it the same way only).
    let st = a.prepare("SELECT 'it\\'s' || pg_advisory_lock(4344)::text").await.unwrap();
    let row = a.query_one(&st, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "it's");
    assert_eq!(p.app.pinned_clients.load(Ordering::Relaxed), 1, "the lock call was not seen");
    assert_eq!(one(&a, "SELECT pg_advisory_unlock(4344)::text").await, "true");
    wait_unpinned(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_reach_the_server_intact_whatever_encoding_the_last_client_used() {
    // pgfleet's own SQL is UTF-8: a connection the previous client left in
    // LATIN1 must not read the next client's 'café' as 'cafÃ©'.
    use tokio::io::AsyncWriteExt;
    let p = proxy(1).await;
    let mut out = bytes::BytesMut::new();
    pgfleet::wire::startup::startup_message(&mut out, &[("user", "app"), ("database", "app"), ("client_encoding", "LATIN1")]);
    let (mut latin, _) = RawClient::login_with(&p, &out, "app").await;
    let mut q = bytes::BytesMut::new();
    pgfleet::wire::build::query(&mut q, "SELECT 1");
    latin.stream.write_all(&q).await.unwrap();
    assert_eq!(crate::protocol::read_cycle(&mut latin).await.1, Vec::<String>::new());
    let s = format!("{} application_name=café options='-c myapp.who=José'", conn_str(&p, "app", "app", "app"));
    let c = connect_with(&s).await.unwrap();
    for _ in 0..3 {
        // (PostgreSQL 15 shows each non-ASCII byte of an application_name as
        // '?': two for é, four if it had been read as LATIN1.)
        assert_eq!(one(&c, "SHOW application_name").await, "caf??");
        assert_eq!(one(&c, "SELECT current_setting('myapp.who')").await, "José");
        // The LATIN1 client takes the connection back in between.
        latin.stream.write_all(&q).await.unwrap();
        assert_eq!(crate::protocol::read_cycle(&mut latin).await.1, Vec::<String>::new());
    }
}

/// Waits until the function catalog of `app` is loaded.
async fn catalog_loaded(p: &pgfleet::app::Running) {
    for _ in 0..100 {
        if p.app.catalogs.is_loaded("app") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the function catalog did not load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changed_out_of_sight_by_writes_and_do_blocks_stays_with_its_client() {
    let c = cluster();
    tokio::task::block_in_place(|| {
        c.psql_on(
            c.primary,
            "app",
            "CREATE OR REPLACE FUNCTION set_tenant_w(t text) RETURNS text LANGUAGE sql AS $$ SELECT pg_catalog.set_config('tenant_w.id', t, false) $$; \
             DROP TABLE IF EXISTS tenant_w_log; CREATE TABLE tenant_w_log (t text); GRANT ALL ON tenant_w_log TO app; \
             DO $$BEGIN CREATE ROLE pgf_tenant_role; EXCEPTION WHEN duplicate_object THEN NULL; END$$; GRANT pgf_tenant_role TO app",
        )
    });
    // One connection: every client lands on the same server session.
    let p = proxy(1).await;
    catalog_loaded(&p).await;
    let a = connect(&p).await;
    let b = connect(&p).await;
    // A function called by a write sets a setting for the session (a
    // tenant id that row-level security reads).
    let tenant = "SELECT coalesce(current_setting('tenant_w.id', true), '')";
    a.batch_execute("INSERT INTO tenant_w_log SELECT set_tenant_w('42')").await.unwrap();
    assert_eq!(one(&b, tenant).await, "", "another client must not see the setting");
    assert_eq!(one(&a, tenant).await, "42", "the setting stays with its client");
    // SET ROLE in a DO block: the next client must not run with its
    // privileges.
    a.batch_execute("DO $$BEGIN SET ROLE pgf_tenant_role; END$$").await.unwrap();
    assert_eq!(one(&b, "SELECT current_user").await, "app");
    assert_eq!(one(&a, "SELECT current_user").await, "pgf_tenant_role");
    a.batch_execute("RESET ROLE").await.unwrap();
    assert_eq!(one(&a, "SELECT current_user").await, "app");
    // A client that leaves before its SET was read back (pipelined behind
    // it: a transaction it leaves open): the next one does not get it.
    let mut raw = RawClient::login(&p, "app", "app").await;
    let mut out = bytes::BytesMut::new();
    pgfleet::wire::build::query(&mut out, "SET tenant_w.id = 'left'");
    pgfleet::wire::build::query(&mut out, "BEGIN; SELECT 1");
    raw.stream.write_all(&out).await.unwrap();
    let mut readies = 0;
    while readies < 2 {
        if raw.next().await.unwrap().0 == b'Z' {
            readies += 1;
        }
    }
    drop(raw);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(one(&b, tenant).await, "");
}

/// PostgreSQL lets a STABLE function call set_config (only data changes
/// are refused there): such a function counts as VOLATILE, so what it sets
/// is read back and stays with its client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stable_function_that_sets_a_setting_does_not_leak_it() {
    let c = cluster();
    tokio::task::block_in_place(|| {
        c.psql_on(
            c.primary,
            "app",
            "CREATE OR REPLACE FUNCTION set_tenant_stable(t text) RETURNS text LANGUAGE sql STABLE AS $$ SELECT pg_catalog.set_config('tenant_stable.id', t, false) $$; \
             CREATE OR REPLACE FUNCTION set_tenant_atomic(t text) RETURNS text LANGUAGE sql STABLE RETURN pg_catalog.set_config('tenant_stable.id', t, false);",
        )
    });
    let p = proxy(1).await;
    for _ in 0..100 {
        if p.app.catalogs.is_loaded("app") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(p.app.catalogs.is_loaded("app"));
    let a = connect(&p).await;
    let b = connect(&p).await;
    let tenant = "SELECT coalesce(current_setting('tenant_stable.id', true), '')";
    assert_eq!(one(&a, "SELECT set_tenant_stable('a')").await, "a");
    assert_eq!(one(&b, tenant).await, "", "another client must not see the setting");
    assert_eq!(one(&a, tenant).await, "a", "the setting stays with its client");
    // A SQL-standard body (no `prosrc`): the same.
    assert_eq!(one(&b, "SELECT set_tenant_atomic('b')").await, "b");
    assert_eq!(one(&a, tenant).await, "a");
    assert_eq!(one(&b, tenant).await, "b");
}
