//! Pool behaviour: many clients on few connections, FIFO waiting with a
//! deadline, clean hand-over after killed clients, session mode, and named
//! prepared statements across transactions and server connections.

use crate::harness::*;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_share_five_connections() {
    let p = proxy(5).await;
    let mut tasks = Vec::new();
    for i in 0..200i32 {
        // Named, so the server connections serving them can be counted
        // apart from the other tests' (which run at the same time).
        let s = format!("{} application_name=two_hundred_clients", conn_str(&p, "app", "app", "app"));
        tasks.push(tokio::spawn(async move {
            let c = connect_with(&s).await.unwrap();
            for j in 0..5i32 {
                let r = c.query_one("SELECT $1::int * 1000 + $2::int", &[&i, &j]).await.unwrap();
                assert_eq!(r.get::<_, i32>(0), i * 1000 + j);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = p.app.pools()[0].stats();
    assert!(stats.total <= 5, "pool grew to {}", stats.total);
    let serving = cluster().server_conns_where("application_name = 'two_hundred_clients'");
    assert!((1..=5).contains(&serving), "{serving} server connections served the clients");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_timeout_names_the_pool() {
    let p = start(config("size = 1\ncheckout_timeout = \"300ms\"", "")).await;
    let mut holder = connect(&p).await;
    let tx = holder.transaction().await.unwrap();
    tx.execute("SELECT 1", &[]).await.unwrap();
    // Two waiters one after the other: the pool's expiry timer serves the
    // first deadline, then re-arms (from an empty queue) for the second.
    for _ in 0..2 {
        let waiter = connect(&p).await;
        let t = std::time::Instant::now();
        let e = waiter.simple_query("SELECT 1").await.unwrap_err();
        let waited = t.elapsed();
        let db = e.as_db_error().expect("a server-style error");
        assert_eq!(db.code().code(), "53300");
        assert!(db.message().contains("app/app@primary"), "{}", db.message());
        assert!(waited >= Duration::from_millis(290) && waited < Duration::from_secs(2), "timed out after {waited:?}");
    }
    tx.commit().await.unwrap();
    // The pool still works for others afterwards.
    let c = connect(&p).await;
    c.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_leaves_no_lock_or_open_transaction() {
    let p = proxy(1).await;
    let admin = connect(&p).await;
    admin.batch_execute("DROP TABLE IF EXISTS kill_t; CREATE TABLE kill_t (id int primary key, v int); INSERT INTO kill_t VALUES (1, 0)").await.unwrap();
    drop(admin);
    for in_flight in [false, true] {
        // A raw socket, so that "killed" really closes the connection.
        let mut victim = RawClient::login(&p, "app", "app").await;
        let sql = if in_flight {
            "BEGIN; UPDATE kill_t SET v = v + 1 WHERE id = 1; SELECT pg_sleep(20)"
        } else {
            "BEGIN; UPDATE kill_t SET v = v + 1 WHERE id = 1"
        };
        let mut q = bytes::BytesMut::new();
        pgfleet::wire::build::query(&mut q, sql);
        victim.stream.write_all(&q).await.unwrap();
        if in_flight {
            tokio::time::sleep(Duration::from_millis(300)).await;
        } else {
            while victim.next().await.map(|(t, _)| t) != Some(b'Z') {}
        }
        drop(victim);
        // Another client on the same single-connection pool can take the row lock.
        let next = connect(&p).await;
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            next.batch_execute("SET lock_timeout = '5s'; UPDATE kill_t SET v = 100 WHERE id = 1").await
        })
        .await
        .expect("no lingering lock");
        r.unwrap();
        let v: i32 = next.query_one("SELECT v FROM kill_t WHERE id = 1", &[]).await.unwrap().get(0);
        assert_eq!(v, 100, "the killed transaction was rolled back");
        let idle_tx = cluster().psql_admin("SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND query LIKE '%kill_t%' AND (state LIKE 'idle in transaction%' OR query LIKE '%pg_sleep(20)%')");
        assert_eq!(idle_tx, "0");
    }
}

/// Waits until some pool of `p` has a checkout queued.
async fn wait_queued(p: &pgfleet::app::Running) {
    for _ in 0..500 {
        if p.app.pools().iter().any(|pool| !pool.longest_wait().is_zero()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("nobody queued");
}

/// A raw client that sends `sql` and, with the pool's only connection
/// held by another client, ends up queued for it.
async fn queue_query(p: &pgfleet::app::Running, sql: &str) -> RawClient {
    let mut c = RawClient::login(p, "app", "app").await;
    let mut q = bytes::BytesMut::new();
    pgfleet::wire::build::query(&mut q, sql);
    c.stream.write_all(&q).await.unwrap();
    wait_queued(p).await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_or_is_killed_while_queued_never_runs_its_statement() {
    let p = start(config("size = 1\ncheckout_timeout = \"20s\"", "")).await;
    let holder = connect(&p).await;
    holder.batch_execute("CREATE TABLE IF NOT EXISTS left_queue (who text)").await.unwrap();
    let count = |who: &'static str| {
        let holder = &holder;
        async move {
            let n: i64 = holder.query_one("SELECT count(*) FROM left_queue WHERE who = $1", &[&who]).await.unwrap().get(0);
            n
        }
    };
    // The app gave up on a queued write (its own timeout) and closed the
    // connection: the write must not run later, when a connection frees up.
    holder.batch_execute("BEGIN").await.unwrap();
    let gone = queue_query(&p, "INSERT INTO left_queue VALUES ('gone')").await;
    drop(gone);
    // pgfleet notices without waiting for the connection.
    let mut left = false;
    for _ in 0..200 {
        if p.app.pools().iter().all(|pool| pool.longest_wait().is_zero()) {
            left = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(left, "the closed client stayed queued");
    holder.batch_execute("COMMIT").await.unwrap();
    // Killed from the admin console while queued: the same, with an error.
    holder.batch_execute("BEGIN").await.unwrap();
    let mut killed = queue_query(&p, "INSERT INTO left_queue VALUES ('killed')").await;
    for c in p.app.conns.clients.lock().unwrap().values() {
        if c.state.load(std::sync::atomic::Ordering::Relaxed) == pgfleet::stats::CLIENT_WAITING {
            c.signal.raise(pgfleet::stats::KILL);
        }
    }
    let code = tokio::time::timeout(Duration::from_secs(2), killed.error_code()).await.expect("killed at once, not after the wait");
    assert_eq!(code.as_deref(), Some("57P01"));
    assert!(killed.next().await.is_none(), "the connection is closed after the error");
    holder.batch_execute("COMMIT").await.unwrap();
    // A client that said goodbye (Terminate) after its statement did not
    // give up: that statement still runs, as on PostgreSQL.
    holder.batch_execute("BEGIN").await.unwrap();
    let mut polite = queue_query(&p, "INSERT INTO left_queue VALUES ('polite')").await;
    polite.stream.write_all(&[b'X', 0, 0, 0, 4]).await.unwrap();
    drop(polite);
    tokio::time::sleep(Duration::from_millis(200)).await;
    holder.batch_execute("COMMIT").await.unwrap();
    let mut ran = false;
    for _ in 0..100 {
        if count("polite").await == 1 {
            ran = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ran, "the statement sent before Terminate never ran");
    // The pool lost nothing: with its one connection free, a new client
    // gets it at once, and neither write ever ran.
    let other = connect(&p).await;
    tokio::time::timeout(Duration::from_secs(2), other.simple_query("SELECT 1")).await.expect("pool whole").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(count("gone").await, 0);
    assert_eq!(count("killed").await, 0);
    assert_eq!(p.app.pools()[0].stats().total, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_resets_with_discard_all() {
    let p = start(config("size = 1\nmode = \"session\"", "")).await;
    let a = connect(&p).await;
    a.batch_execute("SET statement_timeout = '1234ms'; CREATE TEMP TABLE mine (x int)").await.unwrap();
    let pid_a: i32 = a.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    // In session mode a second client waits for the first to leave.
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = connect(&p).await;
    let st = b.simple_query("SHOW statement_timeout").await.unwrap();
    let v = match &st[1] {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).unwrap().to_string(),
        tokio_postgres::SimpleQueryMessage::RowDescription(_) => match &st[2] {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).unwrap().to_string(),
            _ => panic!(),
        },
        _ => panic!("unexpected {st:?}"),
    };
    assert_eq!(v, "0");
    let e = b.simple_query("SELECT * FROM mine").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42P01");
    // Reset, not replaced: the same server connection serves the next client.
    let pid_b: i32 = b.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_eq!(pid_a, pid_b, "the connection was closed instead of reset");
    assert_eq!(p.app.pools()[0].stats().total, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_size_prewarms_connections() {
    // The primary's and each replica's pools, before any client.
    // (min_size 2: 3 databases × 3 users × 3 servers of pools on the
    // cluster the other tests share.)
    let p = start(config("size = 4\nmin_size = 2", &routing_extra("10s", "off"))).await;
    let warm = |backend: &str| p.app.pools().iter().any(|pl| pl.key.backend == backend && pl.key.user == "app" && pl.key.database == "app" && pl.stats().idle >= 2);
    let mut ready = false;
    for _ in 0..100 {
        if ["primary", "r1", "r2"].iter().all(|b| warm(b)) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "pools were not pre-warmed: {:?}", p.app.pools().iter().map(|p| (p.key.backend.clone(), p.stats())).collect::<Vec<_>>());
    // A reload that removes r2: its pools close their connections and are
    // no longer kept warm.
    let r2: Vec<_> = p.app.pools().into_iter().filter(|pl| pl.key.backend == "r2").collect();
    let mut cfg = (*p.app.config()).clone();
    cfg.cluster.replicas.retain(|r| r.name != "r2");
    for g in cfg.cluster.groups.iter_mut().filter(|g| g.name == "analytics") {
        g.fallback = vec![];
    }
    p.app.apply(cfg);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(p.app.pools().iter().all(|pl| pl.key.backend != "r2"));
    for pl in r2 {
        assert_eq!(pl.stats().total, 0, "{} still has connections", pl.key);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_statements_survive_transaction_pooling() {
    let p = proxy(2).await;
    let main = connect(&p).await;
    let by_id = main.prepare("SELECT $1::int + 1").await.unwrap();
    let text = main.prepare("SELECT upper($1::text)").await.unwrap();
    let mut others = Vec::new();
    for i in 0..20i32 {
        let s = conn_str(&p, "app", "app", "app");
        others.push(tokio::spawn(async move {
            let c = connect_with(&s).await.unwrap();
            // Same statement names (tokio-postgres counts s0, s1, ...) but other SQL.
            let st = c.prepare("SELECT $1::int * 2").await.unwrap();
            for j in 0..50i32 {
                let r = c.query_one(&st, &[&(i + j)]).await.unwrap();
                assert_eq!(r.get::<_, i32>(0), (i + j) * 2);
            }
        }));
    }
    for n in 0..1000i32 {
        let r = main.query_one(&by_id, &[&n]).await.unwrap();
        assert_eq!(r.get::<_, i32>(0), n + 1);
        if n % 100 == 0 {
            let r = main.query_one(&text, &[&"abc"]).await.unwrap();
            assert_eq!(r.get::<_, &str>(0), "ABC");
        }
    }
    for t in others {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statement_cache_evicts_lru() {
    let p = start(config("size = 1\nprepared_statements_cache = 3", "")).await;
    let c = connect(&p).await;
    let stmts = {
        let mut v = Vec::new();
        for k in 0..8i32 {
            v.push((k, c.prepare(&format!("SELECT $1::int + {k}")).await.unwrap()));
        }
        v
    };
    for round in 0..3 {
        for (k, st) in &stmts {
            let r = c.query_one(st, &[&round]).await.unwrap();
            assert_eq!(r.get::<_, i32>(0), round + k);
        }
    }
    // The server connection never holds more than the cache limit.
    let rows = c.simple_query("SELECT count(*) FROM pg_prepared_statements").await.unwrap();
    let n: i64 = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
            _ => None,
        })
        .unwrap();
    assert!((1..=3).contains(&n), "{n} statements prepared on the server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_server_connections_are_paced_per_server() {
    // 30 clients that each need a connection of their own, 10 connects/s.
    let p = start(config("size = 30\nmax_connects_per_second = 10\ncheckout_timeout = \"20s\"", "")).await;
    connect(&p).await.simple_query("SELECT 1").await.unwrap(); // spends one token
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..30)
        .map(|_| {
            let s = conn_str(&p, "app", "app", "app") + " application_name=paced";
            tokio::spawn(async move {
                let c = connect_with(&s).await.unwrap();
                c.batch_execute("BEGIN; SELECT pg_sleep(0.01)").await.unwrap();
                c
            })
        })
        .collect();
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    let took = started.elapsed();
    // A burst of 10 (9 left), then 10 per second: about 2 s, never a storm.
    assert!(took >= std::time::Duration::from_millis(1700), "{took:?}");
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
    let open = tokio::task::block_in_place(|| cluster().server_conns_where("usename = 'app' AND application_name = 'paced'"));
    assert_eq!(open, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_pacer_never_holds_a_client_past_its_checkout_timeout() {
    // One connect per second; the first client holds the connection it
    // got. The second needs a new one, which the pacer allows only in
    // about a second: past its 400 ms checkout timeout, so it is told at
    // once (53300) instead of waiting for a connection it may not wait for.
    let p = start(config("size = 5\nmax_connects_per_second = 1\ncheckout_timeout = \"400ms\"", "")).await;
    let a = connect(&p).await;
    a.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let b = connect(&p).await;
    let t0 = std::time::Instant::now();
    let e = b.simple_query("SELECT 2").await.expect_err("no connection within the checkout timeout");
    assert_eq!(sqlstate(&e), "53300", "{e:?}");
    assert!(t0.elapsed() < Duration::from_millis(900), "{:?}", t0.elapsed());
    a.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_queued_behind_failing_connects_wait_out_a_primary_restart() {
    // The primary goes down for about a second (connections cut, connects
    // refused). Two clients need the pool's one connection: one connects
    // and backs off, the other waits in the queue past its 300 ms checkout
    // timeout. Both wait for the primary (up to failover_timeout) instead
    // of the queued one getting 53300.
    let c = cluster();
    let (fwd, down) = switch_forwarder(c.primary).await;
    let mut cfg = config("size = 1\ncheckout_timeout = \"300ms\"", "failover_timeout = \"10s\"");
    cfg.cluster.primary = format!("127.0.0.1:{fwd}");
    let p = start(cfg).await;
    let (a, b) = (connect(&p).await, connect(&p).await);
    a.simple_query("SELECT 1").await.unwrap();
    down.send(true).unwrap();
    // (The pooled connection's cut reaches pgfleet's socket.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = std::time::Instant::now();
    let run = |c: tokio_postgres::Client, n: i32| tokio::spawn(async move { c.query_one("SELECT $1::int", &[&n]).await.map(|r| r.get::<_, i32>(0)) });
    let (ta, tb) = (run(a, 1), run(b, 2));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    if ta.is_finished() || tb.is_finished() {
        let (a, b) = (ta.is_finished(), tb.is_finished());
        panic!("both wait for the primary: a {:?}, b {:?}", if a { Some(ta.await.unwrap()) } else { None }, if b { Some(tb.await.unwrap()) } else { None });
    }
    down.send(false).unwrap();
    assert_eq!(ta.await.unwrap().expect("served once the primary is back"), 1);
    assert_eq!(tb.await.unwrap().expect("served once the primary is back"), 2);
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growing_the_pool_on_reload_serves_clients_already_waiting() {
    let p = start(config("size = 1\ncheckout_timeout = \"5s\"", "")).await;
    let a = connect(&p).await;
    a.batch_execute("BEGIN; SELECT 1").await.unwrap(); // holds the only connection
    let b = connect(&p).await;
    let t0 = std::time::Instant::now();
    let waiting =
        tokio::spawn(async move { b.query_one("SELECT 1", &[]).await.map(|_| t0.elapsed()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "the second client waits for the only connection"
    );
    p.app
        .apply(config("size = 2\ncheckout_timeout = \"5s\"", ""));
    let took = waiting.await.unwrap().unwrap();
    assert!(
        took < Duration::from_secs(2),
        "the waiting client got the new slot only after {took:?}"
    );
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(p.app.pools()[0].stats().total, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_applies_startup_options_again_after_discard_all() {
    let p = start(config("size = 1\nmode = \"session\"", "")).await;
    let with_option = format!("{} options='-c statement_timeout=1234ms'", conn_str(&p, "app", "app", "app"));
    for round in 0..3 {
        // Each client gets the connection the last one left (DISCARD ALL
        // reset it to the server's default): the option must be set again.
        let c = connect_with(&with_option).await.unwrap();
        let v: String = c.query_one("SELECT current_setting('statement_timeout')", &[]).await.unwrap().get(0);
        assert_eq!(v, "1234ms", "round {round}");
        drop(c);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_with_their_own_search_path_do_not_share_prepared_statements() {
    // Schema per tenant, same SQL text: on one server connection, a shared
    // statement would be re-planned for the other schema's table and fail
    // ("cached plan must not change result type").
    let p = proxy(1).await;
    let setup = connect(&p).await;
    setup
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS tenant_a; CREATE SCHEMA IF NOT EXISTS tenant_b; \
             DROP TABLE IF EXISTS tenant_a.items, tenant_b.items; \
             CREATE TABLE tenant_a.items (id int, name text); INSERT INTO tenant_a.items VALUES (1, 'a'); \
             CREATE TABLE tenant_b.items (id int, name text, price numeric); INSERT INTO tenant_b.items VALUES (2, 'b', 9.5)",
        )
        .await
        .unwrap();
    let a = connect_with(&format!("{} options='-c search_path=tenant_a'", conn_str(&p, "app", "app", "app"))).await.unwrap();
    let b = connect(&p).await;
    b.batch_execute("SET search_path = tenant_b").await.unwrap();
    for _ in 0..3 {
        let rows = a.query("SELECT * FROM items", &[]).await.unwrap();
        assert_eq!((rows[0].len(), rows[0].get::<_, i32>(0)), (2, 1));
        let rows = b.query("SELECT * FROM items", &[]).await.unwrap();
        assert_eq!((rows[0].len(), rows[0].get::<_, i32>(0)), (3, 2));
    }
    // The usual pattern under transaction pooling: SET LOCAL per
    // transaction, from a session that started with tenant_a's path.
    let c = connect_with(&format!("{} options='-c search_path=tenant_a'", conn_str(&p, "app", "app", "app"))).await.unwrap();
    c.batch_execute("BEGIN; SET LOCAL search_path = tenant_b").await.unwrap();
    let rows = c.query("SELECT * FROM items", &[]).await.unwrap();
    assert_eq!((rows[0].len(), rows[0].get::<_, i32>(0)), (3, 2));
    c.batch_execute("COMMIT").await.unwrap();
    let rows = c.query("SELECT * FROM items", &[]).await.unwrap();
    assert_eq!((rows[0].len(), rows[0].get::<_, i32>(0)), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_a_database_ends_its_sessions_once_idle() {
    // Database "alias" has two server connections: one held by a
    // transaction, one by a pinned client (a temp table) inside a
    // transaction. A third client waits. A reload removes "alias": the
    // waiting client is told at once (not at the 30 s checkout timeout);
    // both transactions commit; then both sessions end.
    let p = start(config("size = 2\ncheckout_timeout = \"30s\"", "")).await;
    let url = conn_str(&p, "app", "app", "alias");
    let (holder, pinned, waiter) = (connect_with(&url).await.unwrap(), connect_with(&url).await.unwrap(), connect_with(&url).await.unwrap());
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    pinned.batch_execute("CREATE TEMP TABLE removed_t (v int); BEGIN; INSERT INTO removed_t VALUES (1)").await.unwrap();
    let waiting = tokio::spawn(async move { waiter.simple_query("SELECT 2").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the third client waits for a connection");
    let reloaded = std::time::Instant::now();
    remove_alias(&p);
    let answer = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("the waiting client was answered").unwrap();
    let e = answer.expect_err("no connection for a removed database");
    assert_eq!(sqlstate(&e), "3D000", "{e:?}");
    assert!(format!("{e:?}").contains("was removed from pgfleet's configuration"), "{e:?}");
    assert!(reloaded.elapsed() < Duration::from_secs(2), "{:?}", reloaded.elapsed());
    // The transactions under way finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    holder.batch_execute("SELECT 2; COMMIT").await.unwrap();
    let rows = pinned.simple_query("INSERT INTO removed_t VALUES (2); COMMIT; SELECT count(*) FROM removed_t").await.unwrap();
    assert!(rows.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("2"))));
    // Then, idle, the sessions end (the pinned one too, which would never
    // check out again).
    for (name, c) in [("holder", &holder), ("pinned", &pinned)] {
        assert!(within_2s(|| c.is_closed()).await, "the {name} session still runs");
        assert!(c.simple_query("SELECT 1").await.is_err());
    }
    assert!(p.app.pools().iter().all(|pl| pl.key.database != "alias"), "no pool for a removed database");
    let listed = || p.app.conns.clients.lock().unwrap().values().filter(|c| c.database == "alias").count();
    assert!(within_2s(|| listed() == 0).await, "sessions of the removed database still listed");
}

/// Whether `done` holds within 2 s (checked every 50 ms).
async fn within_2s(done: impl Fn() -> bool) -> bool {
    for _ in 0..40 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_a_user_ends_its_sessions_and_refuses_its_logins() {
    let p = start(config("size = 2", "")).await;
    let url = conn_str(&p, "md5user", "md5pw", "app");
    let c = connect_with(&url).await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    let mut cfg = (*p.app.config()).clone();
    cfg.users.retain(|u| u.name != "md5user");
    p.app.apply(cfg);
    // Idle: the session ends (28000) within the drain's quiet period.
    assert!(within_2s(|| c.is_closed()).await, "the removed user's session still runs");
    assert!(p.app.pools().iter().all(|pl| pl.key.user != "md5user"), "no pool for a removed user");
    let e = connect_with(&url).await.expect_err("the user is gone");
    assert_eq!(sqlstate(&e), "28P01", "{e:?}");
    // Other users are not touched.
    connect(&p).await.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_paused_database_answers_its_waiting_clients() {
    // PAUSE alias, then a reload removes it: RESUME could no longer name
    // it, so its waiting client is told at once; other databases run.
    let p = start(config("size = 2", "")).await;
    let admin = connect_with(&conn_str(&p, "admin", "admin", "pgfleet")).await.unwrap();
    let c = connect_with(&conn_str(&p, "app", "app", "alias")).await.unwrap();
    admin.simple_query("PAUSE alias").await.unwrap();
    let waiting = tokio::spawn(async move { c.simple_query("SELECT 1").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "paused");
    remove_alias(&p);
    let answer = tokio::time::timeout(Duration::from_secs(2), waiting).await.expect("the waiting client was answered").unwrap();
    assert_eq!(sqlstate(&answer.expect_err("its database is gone")), "3D000");
    connect(&p).await.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_pinned_client_of_a_removed_database_ends_at_its_next_statement() {
    // Pinned (a temp table) and never quiet for long: it does not wait for
    // an idle moment that never comes.
    let p = start(config("size = 2", "")).await;
    let c = connect_with(&conn_str(&p, "app", "app", "alias")).await.unwrap();
    c.batch_execute("CREATE TEMP TABLE busy_t (v int)").await.unwrap();
    remove_alias(&p);
    let mut ended = None;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Err(e) = c.simple_query("SELECT 1").await {
            ended = Some(e);
            break;
        }
    }
    let e = ended.expect("the session of a removed database kept running");
    assert_eq!(sqlstate(&e), "3D000", "{e:?}");
}

/// A reload that removes database "alias".
fn remove_alias(p: &pgfleet::app::Running) {
    let mut cfg = (*p.app.config()).clone();
    cfg.databases.retain(|d| d.name != "alias");
    p.app.apply(cfg);
}
