//! Admin console and metrics: PgBouncer-compatible SHOW output after known
//! traffic, pgfleet's own SHOW tables, Prometheus counters that match what
//! was sent, and refusal of non-admin users.

use crate::harness::*;
use std::collections::HashMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::SimpleQueryMessage;

/// Rows of an admin SHOW as column-name -> value maps, plus the column order.
async fn show(admin: &tokio_postgres::Client, what: &str) -> (Vec<String>, Vec<HashMap<String, String>>) {
    let msgs = admin.simple_query(&format!("SHOW {what}")).await.unwrap_or_else(|e| panic!("SHOW {what}: {e}"));
    let mut cols = Vec::new();
    let mut rows = Vec::new();
    for m in msgs {
        match m {
            SimpleQueryMessage::RowDescription(d) => cols = d.iter().map(|c| c.name().to_string()).collect(),
            SimpleQueryMessage::Row(r) => {
                let mut map = HashMap::new();
                for (i, c) in r.columns().iter().enumerate() {
                    map.insert(c.name().to_string(), r.get(i).unwrap_or("NULL").to_string());
                }
                rows.push(map);
            }
            _ => {}
        }
    }
    (cols, rows)
}

fn cols(list: &str) -> Vec<String> {
    list.split(',').map(|s| s.trim().to_string()).collect()
}

async fn admin_client(p: &pgfleet::app::Running, db: &str) -> tokio_postgres::Client {
    connect_with(&conn_str(p, "admin", "admin", db)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_reports_known_traffic() {
    let _shared = REPLICAS.read().await;
    let p = routing_proxy("size = 3", "10s", "off").await;
    let c = connect_with(&format!("{} application_name=known-app", conn_str(&p, "app", "app", "app"))).await.unwrap();
    for _ in 0..10 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    c.simple_query("CREATE TABLE IF NOT EXISTS adm_t (x int)").await.unwrap();
    let admin = admin_client(&p, "pgbouncer").await;
    let (pc, pools) = show(&admin, "POOLS").await;
    assert_eq!(pc, cols("database, user, cl_active, cl_waiting, cl_active_cancel_req, cl_waiting_cancel_req, sv_active, sv_active_cancel, sv_being_canceled, sv_idle, sv_used, sv_tested, sv_login, maxwait, maxwait_us, pool_mode, load_balance_hosts"));
    let app_pool = pools.iter().find(|r| r["database"] == "app" && r["user"] == "app").expect("app pool");
    assert_eq!(app_pool["pool_mode"], "transaction");
    assert!(app_pool["sv_idle"].parse::<u32>().unwrap() >= 1);
    let (sc, stats) = show(&admin, "STATS").await;
    assert_eq!(sc[..4], cols("database, total_server_assignment_count, total_xact_count, total_query_count")[..]);
    assert_eq!(sc.len(), 23);
    let (tc, totals) = show(&admin, "STATS_TOTALS").await;
    assert_eq!(tc, cols("database, server_assignment_count, xact_count, query_count, bytes_received, bytes_sent, xact_time, query_time, wait_time, client_parse_count, server_parse_count, bind_count"));
    let t = totals.iter().find(|r| r["database"] == "app").unwrap();
    assert_eq!(t["xact_count"], "11", "10 SELECTs + 1 CREATE");
    assert_eq!(t["query_count"], "11");
    assert!(t["bytes_received"].parse::<u64>().unwrap() > 11 * 10);
    assert_eq!(stats.iter().find(|r| r["database"] == "app").unwrap()["total_xact_count"], "11");
    let (cc, clients) = show(&admin, "CLIENTS").await;
    assert_eq!(cc, cols("type, user, database, replication, state, addr, port, local_addr, local_port, connect_time, request_time, wait, wait_us, close_needed, ptr, link, remote_pid, tls, application_name, prepared_statements, id"));
    assert!(clients.iter().any(|r| r["application_name"] == "known-app" && r["user"] == "app" && r["state"] == "idle"));
    let (svc, servers) = show(&admin, "SERVERS").await;
    assert_eq!(svc, cc);
    assert!(servers.iter().any(|r| r["database"] == "app" && r["type"] == "S"));
    let (dc, dbs) = show(&admin, "DATABASES").await;
    assert_eq!(dc, cols("name, host, port, database, force_user, pool_size, min_pool_size, reserve_pool_size, server_lifetime, pool_mode, load_balance_hosts, max_connections, current_connections, max_client_connections, current_client_connections, paused, disabled"));
    assert!(dbs.iter().any(|r| r["name"] == "alias" && r["database"] == "app" && r["pool_size"] == "3"));
    let (lc, lists) = show(&admin, "LISTS").await;
    assert_eq!(lc, cols("list, items"));
    assert!(lists.iter().all(|r| r["items"].parse::<i64>().is_ok()));
    let (cfc, conf) = show(&admin, "CONFIG").await;
    assert_eq!(cfc, cols("key, value, default, changeable"));
    assert!(conf.iter().any(|r| r["key"] == "max_client_conn" && r["value"] == "10000"));
    // No secret in any SHOW output ("md5pw" and "bench" are test users'
    // passwords; "bench" is also a database and user name, so only the
    // distinctive one is looked for).
    for what in ["CONFIG", "DATABASES", "POOLS", "CLIENTS", "SERVERS", "USERS"] {
        if let Ok(msgs) = admin.simple_query(&format!("SHOW {what}")).await {
            for m in msgs {
                if let SimpleQueryMessage::Row(r) = m {
                    for i in 0..r.len() {
                        let v = r.get(i).unwrap_or("");
                        assert!(!v.contains("md5pw"), "SHOW {what} shows a password: {v}");
                    }
                }
            }
        }
    }
    let lists_users = lists.iter().find(|r| r["list"] == "used_clients").map(|r| r["items"].parse::<i64>().unwrap());
    assert!(lists_users.is_some_and(|n| n >= 1), "SHOW LISTS used_clients: {lists:?}");
    let (vc, v) = show(&admin, "VERSION").await;
    assert_eq!(vc, cols("version"));
    assert!(v[0]["version"].starts_with("pgfleet "));
    // pgfleet's own tables.
    let (_, replicas) = show(&admin, "REPLICAS").await;
    let r1 = replicas.iter().find(|r| r["replica"] == "r1").unwrap();
    assert_eq!(r1["state"], "usable");
    assert_eq!(r1["groups"], "default,chat");
    let (_, groups) = show(&admin, "GROUPS").await;
    assert!(groups.iter().any(|g| g["group"] == "analytics" && g["fallback"] == "error" && g["members"] == "r2"));
    let (_, workloads) = show(&admin, "WORKLOADS").await;
    let w = workloads.iter().find(|r| r["workload"] == "default").unwrap();
    assert_eq!(w["reads"], "10");
    assert_eq!(w["writes"], "1");
    assert_eq!(w["to_replica"], "10");
    assert_eq!(w["to_primary"], "1");
    // Unknown commands are errors, not disconnects.
    assert_eq!(sqlstate(&admin.simple_query("SHOW NONSENSE").await.unwrap_err()), "42601");
    assert_eq!(show(&admin, "VERSION").await.1.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_admin_users_are_refused() {
    let p = proxy(2).await;
    for db in ["pgfleet", "pgbouncer"] {
        let e = connect_with(&conn_str(&p, "app", "app", db)).await.unwrap_err();
        assert_eq!(sqlstate(&e), "28000");
    }
    // Wrong admin password: refused like any login.
    let e = connect_with(&conn_str(&p, "admin", "nope", "pgfleet")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "28P01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_that_is_not_utf8_gets_22021() {
    use tokio::io::AsyncWriteExt;
    let p = proxy(2).await;
    let mut startup = bytes::BytesMut::new();
    pgfleet::wire::startup::startup_message(&mut startup, &[("user", "admin"), ("database", "pgfleet")]);
    let (mut raw, _) = RawClient::login_with(&p, &startup, "admin").await;
    // "SHOW POOLS" with a Latin-1 byte in it: an error, not an empty query.
    raw.stream.write_all(b"Q\0\0\0\x11SHOW POOLS\xe9;\0").await.unwrap();
    assert_eq!(raw.error_code().await.as_deref(), Some("22021"));
    assert_eq!(raw.next().await.map(|m| m.0), Some(b'Z'));
    // The session goes on.
    raw.stream.write_all(b"Q\0\0\0\x0fSHOW POOLS\0").await.unwrap();
    let mut tags = Vec::new();
    while let Some((tag, _)) = raw.next().await {
        tags.push(tag);
        if tag == b'Z' {
            break;
        }
    }
    assert_eq!(tags.first(), Some(&b'T'), "{tags:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maxwait_is_the_longest_wait_of_the_clients_still_waiting() {
    use std::time::Duration;
    let p = start(config("size = 1\ncheckout_timeout = \"1s\"", "")).await;
    let admin = admin_client(&p, "pgfleet").await;
    let holder = connect(&p).await;
    holder.batch_execute("BEGIN").await.unwrap();
    let maxwait = || async {
        let (_, rows) = show(&admin, "POOLS").await;
        let r = rows.iter().find(|r| r["database"] == "app" && r["user"] == "app").expect("app pool row").clone();
        r["maxwait"].parse::<u64>().unwrap() * 1_000_000 + r["maxwait_us"].parse::<u64>().unwrap()
    };
    let (first, second) = (connect(&p).await, connect(&p).await);
    let a = tokio::spawn(async move { first.simple_query("SELECT 1").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = tokio::spawn(async move { second.simple_query("SELECT 1").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let w = maxwait().await;
    assert!((600_000..1_000_000).contains(&w), "the first waiter's wait: {w} µs");
    // The first waiter gives up (checkout_timeout); the second still waits.
    assert!(a.await.unwrap().is_err());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!b.is_finished());
    let w = maxwait().await;
    assert!((500_000..1_000_000).contains(&w), "the second waiter's wait: {w} µs");
    assert!(b.await.unwrap().is_err());
    assert_eq!(maxwait().await, 0, "nobody waits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_kill() {
    let p = proxy(2).await;
    let admin = admin_client(&p, "pgfleet").await;
    let c = connect(&p).await;
    c.simple_query("SELECT 1").await.unwrap();
    admin.simple_query("PAUSE app").await.unwrap();
    let q = tokio::spawn(async move { c.simple_query("SELECT 42").await.map(|_| ()) });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!q.is_finished(), "a paused database holds new transactions");
    // Shown as waiting, for as long as it has (what a switchover's
    // dashboards watch).
    let (_, rows) = show(&admin, "POOLS").await;
    let r = rows.iter().find(|r| r["database"] == "app" && r["user"] == "app").expect("app pool row");
    assert_eq!(r["cl_waiting"], "1", "{r:?}");
    let waited = r["maxwait"].parse::<u64>().unwrap() * 1_000_000 + r["maxwait_us"].parse::<u64>().unwrap();
    assert!(waited >= 250_000, "{r:?}");
    admin.simple_query("RESUME app").await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), q).await.unwrap().unwrap().unwrap();
    let victim = connect(&p).await;
    victim.simple_query("SELECT 1").await.unwrap();
    admin.simple_query("KILL app").await.unwrap();
    let e = victim.simple_query("SELECT 1").await.unwrap_err();
    assert!(e.is_closed() || e.code().map(|c| c.code()) == Some("57P01"), "{e}");
    // A killed database stays paused (PgBouncer's KILL): a client that
    // comes back waits for RESUME.
    let back = connect(&p).await;
    let q = tokio::spawn(async move { back.simple_query("SELECT 43").await.map(|_| ()) });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!q.is_finished(), "a killed database holds new transactions until RESUME");
    admin.simple_query("RESUME app").await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), q).await.unwrap().unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_admitted_during_a_pause_waits_for_resume() {
    // A rate limit holds a write in admission while PAUSE returns (no
    // server is busy). When its token comes, the write must still wait for
    // RESUME: the admin may be switching primaries meanwhile.
    let c0 = cluster();
    c0.psql_on(c0.primary, "app", "DROP TABLE IF EXISTS pause_adm_t; CREATE TABLE pause_adm_t (x int); GRANT ALL ON pause_adm_t TO app");
    let p = start(config("size = 2", "[[limits]]\ndatabase = \"app\"\nrate = 1\nburst = 1\nmax_wait = \"10s\"")).await;
    let admin = admin_client(&p, "pgfleet").await;
    let c = connect(&p).await;
    c.simple_query("SELECT 1").await.unwrap(); // the burst's one token
    let w = tokio::spawn(async move { c.simple_query("INSERT INTO pause_adm_t VALUES (1)").await.map(|_| ()) });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    admin.simple_query("PAUSE app").await.unwrap();
    // Past the next token (1 per second).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(!w.is_finished(), "admitted during the pause, it ran anyway");
    assert_eq!(c0.psql_on(c0.primary, "app", "SELECT count(*) FROM pause_adm_t"), "0");
    admin.simple_query("RESUME app").await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), w).await.unwrap().unwrap().unwrap();
    assert_eq!(c0.psql_on(c0.primary, "app", "SELECT count(*) FROM pause_adm_t"), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_closes_the_killed_clients_server_connections() {
    // Session mode: every server connection belongs to a client. KILL must
    // close them (the maintenance it makes room for, DROP DATABASE, needs
    // them gone), not reset them and keep them in the pool.
    let p = start(config("size = 1\nmode = \"session\"", "")).await;
    let admin = admin_client(&p, "pgfleet").await;
    let victim = connect(&p).await;
    let pid: i32 = victim.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    admin.simple_query("KILL app").await.unwrap();
    assert!(victim.simple_query("SELECT 1").await.is_err());
    admin.simple_query("RESUME app").await.unwrap();
    let next = connect(&p).await;
    let next_pid: i32 = next.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_ne!(next_pid, pid, "the killed client's server connection was reused");
    // (A backend takes a moment to exit once its connection is closed.)
    let mut alive = 1;
    for _ in 0..40 {
        alive = next.query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", &[&pid]).await.unwrap().get::<_, i64>(0);
        if alive == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(alive, 0, "the killed client's server connection is still open");
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    let status = body.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body)
}

fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        (n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))).then(|| value.parse().ok())?
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_the_traffic_sent() {
    let _shared = REPLICAS.read().await;
    let mut cfg = config("size = 3", &routing_extra("10s", "off"));
    cfg.admin.metrics_addr = Some("127.0.0.1:0".into());
    let p = start(cfg).await;
    wait_replicas_usable(&p).await;
    let addr = p.metrics_addr.unwrap();
    // The failing query comes from another client: tokio-postgres returns on
    // the ErrorResponse, so its next query may share that binding.
    let other = connect_with(&conn_str(&p, "bench", "bench", "bench")).await.unwrap();
    assert!(other.simple_query("SELECT 1/0").await.is_err());
    let c = connect(&p).await;
    for _ in 0..25 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    for _ in 0..5 {
        c.simple_query("CREATE TABLE IF NOT EXISTS met_t (x int)").await.unwrap();
    }
    let (status, text) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let l = [("database", "app"), ("user", "app"), ("workload", "default")];
    assert_eq!(metric(&text, "pgfleet_transactions_total", &l), Some(30.0), "{text}");
    assert_eq!(metric(&text, "pgfleet_queries_total", &l), Some(30.0));
    assert_eq!(metric(&text, "pgfleet_routing_decisions_total", &[("target", "replica"), ("reason", "read")]), Some(26.0));
    assert_eq!(metric(&text, "pgfleet_routing_decisions_total", &[("target", "primary"), ("reason", "write")]), Some(5.0));
    assert_eq!(metric(&text, "pgfleet_errors_total", &[("sqlstate", "22012")]), Some(1.0));
    assert_eq!(metric(&text, "pgfleet_query_duration_seconds_count", &[("workload", "default"), ("route", "replica")]), Some(25.0 + 1.0));
    assert_eq!(metric(&text, "pgfleet_replica_usable", &[("replica", "r1"), ("group", "default")]), Some(1.0));
    assert_eq!(metric(&text, "pgfleet_clients", &[("state", "idle")]), Some(2.0));
    assert!(metric(&text, "pgfleet_client_bytes_sent_total", &l).unwrap() > 0.0);
    assert!(metric(&text, "pgfleet_replica_lag_bytes", &[("replica", "r2")]).is_some());
    // Exported at zero, so an alert on a restart has a series to watch.
    assert_eq!(metric(&text, "pgfleet_background_restarts_total", &[("task", "lag_monitor")]), Some(0.0));
    assert_eq!(metric(&text, "pgfleet_background_restarts_total", &[("task", "pool_upkeep")]), Some(0.0));
    // No SQL text or client addresses in labels.
    assert!(!text.contains("SELECT") && !text.contains("127.0.0.1"));
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    assert_eq!(http_get(addr, "/readyz").await.0, 200);
    assert_eq!(http_get(addr, "/nope").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_reload_resume_moves_waiting_transactions_to_the_new_primary() {
    // PgBouncer's switchover: PAUSE, point the config at the new primary,
    // RELOAD, RESUME. Writes that waited during the pause must run on the
    // new primary, and must not point the pool back at the old one.
    let _replicas = REPLICAS.read().await;
    let c = cluster();
    let (fwd, carried) = forwarder(c.primary).await;
    let extra = routing_extra("10s", "off");
    let p = start(config("size = 2", &extra)).await;
    wait_replicas_usable(&p).await;
    let admin = admin_client(&p, "pgfleet").await;
    let clients: Vec<_> = futures_util::future::join_all((0..3).map(|_| connect(&p))).await;
    for cl in &clients {
        // A read, served by a replica: the session's last pool is not the primary's.
        cl.simple_query("SELECT 1").await.unwrap();
    }
    admin.simple_query("PAUSE app").await.unwrap();
    let waiting: Vec<_> = clients
        .into_iter()
        .map(|cl| tokio::spawn(async move { cl.simple_query("SELECT pg_current_wal_lsn()::text").await.map(|_| cl) }))
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut cfg = config("size = 2", &extra);
    cfg.cluster.primary = format!("127.0.0.1:{fwd}");
    p.app.apply(cfg);
    admin.simple_query("RESUME app").await.unwrap();
    let mut clients = Vec::new();
    for w in waiting {
        clients.push(tokio::time::timeout(std::time::Duration::from_secs(10), w).await.unwrap().unwrap().unwrap());
    }
    let check = |when: &str| {
        let primary_pools: Vec<_> = p.app.pools().into_iter().filter(|pl| pl.key.backend == "primary" && pl.key.database == "app").collect();
        assert!(!primary_pools.is_empty());
        for pl in &primary_pools {
            assert_eq!(pl.addr(), format!("127.0.0.1:{fwd}"), "{when}: the pool went back to the old primary");
        }
        assert!(carried.load(std::sync::atomic::Ordering::Relaxed) > 0, "{when}: nothing reached the new primary");
    };
    check("the writes that waited out the pause");
    for cl in &clients {
        cl.simple_query("SELECT pg_current_wal_lsn()::text").await.unwrap();
    }
    check("later writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_a_databases_server_name_retires_its_connections() {
    let p = proxy(2).await;
    let s = conn_str(&p, "app", "app", "alias");
    let cl = connect_with(&s).await.unwrap();
    let other = connect_with(&s).await.unwrap();
    // Both connections of the pool open, to "app".
    let (a, b) = tokio::join!(cl.simple_query("SELECT current_database(), pg_sleep(0.2)"), other.simple_query("SELECT pg_sleep(0.2)"));
    a.unwrap();
    b.unwrap();
    async fn db(c: &tokio_postgres::Client) -> String {
        c.query_one("SELECT current_database()", &[]).await.unwrap().get::<_, String>(0)
    }
    assert_eq!(db(&cl).await, "app");
    let mut cfg = config("size = 2", "");
    cfg.databases.iter_mut().find(|d| d.name == "alias").unwrap().dbname = Some("bench".into());
    p.app.apply(cfg);
    for _ in 0..10 {
        assert_eq!(db(&cl).await, "bench", "a connection to the old database was reused");
        assert_eq!(db(&other).await, "bench", "a connection to the old database was reused");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_check_their_database_and_pause_state() {
    let p = proxy(2).await;
    let admin = admin_client(&p, "pgfleet").await;
    let code = |r: Result<Vec<SimpleQueryMessage>, tokio_postgres::Error>| r.err().and_then(|e| e.code().map(|c| c.code().to_string()));
    for cmd in ["PAUSE nosuchdb", "RESUME nosuchdb", "KILL nosuchdb"] {
        assert_eq!(code(admin.simple_query(cmd).await).as_deref(), Some("3D000"), "{cmd}");
    }
    assert!(!p.app.is_paused("nosuchdb") && !p.app.is_paused("app"));
    assert_eq!(code(admin.simple_query("RESUME app").await).as_deref(), Some("55000"), "RESUME of a database not paused");
    // A global PAUSE is lifted only by a global RESUME, never reported
    // lifted by a RESUME of one database.
    admin.simple_query("PAUSE").await.unwrap();
    assert_eq!(code(admin.simple_query("RESUME app").await).as_deref(), Some("55000"));
    assert!(p.app.is_paused("app"));
    admin.simple_query("RESUME").await.unwrap();
    assert!(!p.app.is_paused("app"));
    // Idle logged-in clients are cl_active, as in PgBouncer.
    let idle: Vec<_> = futures_util::future::join_all((0..3).map(|_| connect(&p))).await;
    idle[0].simple_query("SELECT 1").await.unwrap();
    let (_, rows) = show(&admin, "POOLS").await;
    let app = rows.iter().find(|r| r["database"] == "app" && r["user"] == "app").expect("a pool row for app/app");
    assert_eq!(app["cl_active"], "3", "{app:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_admin_consoles_or_paused_clients() {
    let p = proxy(2).await;
    let admin = admin_client(&p, "pgfleet").await;
    let other_admin = admin_client(&p, "pgbouncer").await;
    let c = connect(&p).await;
    admin.simple_query("PAUSE app").await.unwrap();
    let waiting = tokio::spawn(async move { c.simple_query("SELECT 1").await.map(|_| ()) });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let began = std::time::Instant::now();
    admin.simple_query("SHUTDOWN").await.unwrap();
    p.shutdown(std::time::Duration::from_secs(20)).await;
    assert!(began.elapsed() < std::time::Duration::from_secs(5), "shutdown waited {:?}", began.elapsed());
    assert_eq!(p.app.client_count(), 0);
    let e = waiting.await.unwrap().unwrap_err();
    assert!(e.code().map(|c| c.code()) == Some("57P01") || e.is_closed(), "{e}");
    assert!(other_admin.simple_query("SHOW POOLS").await.is_err(), "the console was closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_open_when_its_user_loses_admin_rights_is_closed() {
    let p = proxy(2).await;
    let admin = admin_client(&p, "pgfleet").await;
    admin.simple_query("SHOW VERSION").await.unwrap();
    let mut cfg = (*p.app.config()).clone();
    cfg.admin.users.clear();
    p.app.apply(cfg);
    let e = admin.simple_query("SHUTDOWN").await.expect_err("no longer an admin");
    assert_eq!(sqlstate(&e), "28000", "{e:?}");
    // The SHUTDOWN did not run.
    connect(&p).await.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_pipelined_behind_the_consoles_login_is_answered() {
    let p = proxy(2).await;
    let mut startup = bytes::BytesMut::new();
    pgfleet::wire::startup::startup_message(&mut startup, &[("user", "admin"), ("database", "pgbouncer")]);
    let mut query = bytes::BytesMut::new();
    postgres_protocol::message::frontend::query("SHOW VERSION", &mut query).unwrap();
    let (mut admin, _) = RawClient::login_pipelining(&p, &startup, "admin", &query).await;
    let mut tags = Vec::new();
    while let Some((tag, msg)) = admin.next().await {
        tags.push(tag);
        if tag == b'D' {
            assert!(String::from_utf8_lossy(&msg).contains("pgfleet"), "{msg:?}");
        }
        if tag == b'Z' {
            break;
        }
    }
    assert_eq!(tags, b"TDCZ", "the pipelined SHOW was answered");
}
