//! Read/write routing on a real primary + 2 streaming replicas: writes on
//! the primary, reads on the workload's replicas, isolation between
//! workloads, lag exclusion and re-admission, read-your-writes.

use crate::harness::*;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_primary_reads_on_replicas_both_protocols() {
    let _shared = REPLICAS.read().await;
    let c = cluster();
    let p = routing_proxy("size = 3", "10s", "off").await;
    let writer = connect(&p).await;
    writer.batch_execute("CREATE TABLE IF NOT EXISTS rt_w (id serial primary key, port int); CREATE SEQUENCE IF NOT EXISTS rt_seq").await.unwrap();
    let reader = connect(&p).await;
    let r1 = c.replicas[0];
    // The replica has to have replayed the DDL before reads can use the table.
    while cluster().psql_on(r1, "app", "SELECT count(*) FROM pg_class WHERE relname = 'rt_w'") != "1" {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..100 {
        // Autocommit reads, simple and extended, go to the default group's replica.
        assert_eq!(port_of(&reader, "SELECT inet_server_port()::text").await, r1, "simple read {i}");
        let port: i32 = reader.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
        assert_eq!(port as u16, r1, "extended read {i}");
        assert_eq!(port_of(&reader, "/* a comment */ WITH x AS (SELECT inet_server_port() p) SELECT p::text FROM x").await, r1);
        // Writes and anything that locks or has side effects: primary.
        assert_eq!(port_of(&writer, "INSERT INTO rt_w (port) VALUES (inet_server_port()) RETURNING port::text").await, c.primary);
        let port: i32 = writer.query_one("INSERT INTO rt_w (port) VALUES (inet_server_port()) RETURNING port", &[]).await.unwrap().get(0);
        assert_eq!(port as u16, c.primary);
        assert_eq!(port_of(&writer, "SELECT inet_server_port()::text FROM (SELECT nextval('rt_seq')) s").await, c.primary);
        assert_eq!(port_of(&writer, "SELECT inet_server_port()::text FROM rt_w WHERE id = 1 FOR UPDATE").await, c.primary);
        assert_eq!(port_of(&reader, "SELECT inet_server_port()::text; SELECT count(*) FROM rt_w").await, r1);
    }
    // A transaction is routed as a whole.
    let rows = writer.simple_query("BEGIN; SELECT inet_server_port()::text; COMMIT").await.unwrap();
    let port: u16 = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
        _ => None,
    }).unwrap();
    assert_eq!(port, c.primary);
    reader.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(port_of(&reader, "SELECT inet_server_port()::text").await, r1);
    let e = reader.simple_query("INSERT INTO rt_w (port) VALUES (0)").await.unwrap_err();
    assert_eq!(sqlstate(&e), "25006", "a write inside READ ONLY fails like on PostgreSQL");
    reader.batch_execute("ROLLBACK").await.unwrap();
    // Hints and SET pgfleet.route.
    assert_eq!(port_of(&reader, "/* pgfleet: route=primary */ SELECT inet_server_port()::text").await, c.primary);
    reader.batch_execute("SET pgfleet.route = 'primary'").await.unwrap();
    assert_eq!(port_of(&reader, "SELECT inet_server_port()::text").await, c.primary);
    reader.batch_execute("RESET pgfleet.route").await.unwrap();
    assert_eq!(port_of(&reader, "SELECT inet_server_port()::text").await, r1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_write_after_read_waits_for_the_primary() {
    let _shared = REPLICAS.read().await;
    let c = cluster();
    let p = routing_proxy("size = 3", "10s", "off").await;
    connect(&p).await.batch_execute("CREATE TABLE IF NOT EXISTS rt_pipe (port int)").await.unwrap();
    let mut raw = RawClient::login(&p, "app", "app").await;
    let mut out = bytes::BytesMut::new();
    pgfleet::wire::build::query(&mut out, "SELECT inet_server_port()::text");
    pgfleet::wire::build::query(&mut out, "INSERT INTO rt_pipe VALUES (inet_server_port()) RETURNING port::text");
    pgfleet::wire::build::query(&mut out, "SELECT inet_server_port()::text");
    raw.stream.write_all(&out).await.unwrap();
    let mut ports = Vec::new();
    let mut readies = 0;
    while readies < 3 {
        let (tag, m) = raw.next().await.unwrap();
        match tag {
            b'D' => ports.push(String::from_utf8_lossy(&m[11..]).parse::<u16>().unwrap()),
            b'E' => panic!("{:?}", pgfleet::wire::error_fields(&m)),
            b'Z' => readies += 1,
            _ => {}
        }
    }
    // A read pipelined behind a write stays on the primary connection that
    // is still bound (which also gives it the write's effects).
    assert_eq!(ports, vec![c.replicas[0], c.primary, c.primary]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_batch_that_arrives_in_pieces_is_routed_as_a_whole() {
    // A pipeline larger than one read: a read first, then (in a later
    // write, as libpq flushes every 8 kB) a write and transaction control,
    // then Sync. Routed on its first piece, it went to a replica, where
    // the write fails (25006).
    let _shared = REPLICAS.read().await;
    let c = cluster();
    let p = routing_proxy("size = 3", "10s", "off").await;
    connect(&p).await.batch_execute("CREATE TABLE IF NOT EXISTS rt_pieces (port int)").await.unwrap();
    let mut raw = RawClient::login(&p, "app", "app").await;
    let step = |sql: &str| {
        let mut out = bytes::BytesMut::new();
        pgfleet::wire::build::parse(&mut out, b"", &[sql.as_bytes(), b"\0\0\0"].concat());
        out.extend_from_slice(&crate::protocol::msg(b'B', b"\0\0\0\0\0\0\0\0"));
        out.extend_from_slice(&crate::protocol::msg(b'E', b"\0\0\0\0\0"));
        out.to_vec()
    };
    // (In one write too: a BEGIN after the first message opens a
    // transaction that must be on the primary.)
    let insert = "INSERT INTO rt_pieces VALUES (inet_server_port()) RETURNING port::text";
    for (second, pieces) in [(insert, true), ("BEGIN", true), ("BEGIN", false)] {
        raw.stream.write_all(&step("SELECT inet_server_port()::text")).await.unwrap();
        if pieces {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        raw.stream.write_all(&[step(second), crate::protocol::msg(b'S', b"")].concat()).await.unwrap();
        let mut ports = Vec::new();
        loop {
            let (tag, m) = raw.next().await.unwrap();
            match tag {
                b'D' => ports.push(String::from_utf8_lossy(&m[11..]).parse::<u16>().unwrap()),
                b'E' => panic!("{second}: {:?}", pgfleet::wire::error_fields(&m)),
                b'Z' => break,
                _ => {}
            }
        }
        assert_eq!(ports[0], c.primary, "{second}: {ports:?}");
        if second == "BEGIN" {
            raw.stream.write_all(&crate::protocol::msg(b'Q', b"COMMIT\0")).await.unwrap();
            crate::protocol::read_cycle(&mut raw).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_only_reach_their_group() {
    let _shared = REPLICAS.read().await;
    let c = cluster();
    let (r1, r2) = (c.replicas[0], c.replicas[1]);
    let p = routing_proxy("size = 3", "10s", "off").await;
    let base = conn_str(&p, "app", "app", "app");
    let by_rule = connect_with(&format!("{base} application_name=metabase-prod")).await.unwrap();
    let by_option = connect_with(&format!("{base} options='-c pgfleet.workload=chat'")).await.unwrap();
    let by_set = connect(&p).await;
    by_set.batch_execute("SET pgfleet.workload = 'analytics'").await.unwrap();
    let by_set_ext = connect(&p).await;
    by_set_ext.execute("SET pgfleet.workload = 'analytics'", &[]).await.unwrap();
    let plain = connect(&p).await;
    for _ in 0..50 {
        assert_eq!(port_of(&by_rule, "SELECT inet_server_port()::text").await, r2);
        assert_eq!(port_of(&by_option, "SELECT inet_server_port()::text").await, r1);
        assert_eq!(port_of(&by_set, "SELECT inet_server_port()::text").await, r2);
        let port: i32 = by_set_ext.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
        assert_eq!(port as u16, r2);
        assert_eq!(port_of(&plain, "SELECT inet_server_port()::text").await, r1);
        assert_eq!(port_of(&plain, "/* pgfleet: workload=analytics */ SELECT inet_server_port()::text").await, r2);
    }
    // SHOW answers from pgfleet, in both protocols.
    let rows = by_set.simple_query("SHOW pgfleet.workload").await.unwrap();
    assert!(matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("analytics")));
    let w: String = by_option.query_one("SHOW pgfleet.workload", &[]).await.unwrap().get(0);
    assert_eq!(w, "chat");
    // Unknown workloads are errors.
    let e = plain.simple_query("SET pgfleet.workload = 'nope'").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42704");
    let e = plain.simple_query("/* pgfleet: workload=nope */ SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42704");
    let e = connect_with(&format!("{base} options='-c pgfleet.workload=nope'")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "42704");
    // The session is still fine, and nothing reached PostgreSQL: it has no such setting.
    assert_eq!(port_of(&plain, "SELECT inet_server_port()::text").await, r1);
    let v = plain.simple_query("SELECT coalesce(current_setting('pgfleet.workload', true), 'unset')").await.unwrap();
    assert!(matches!(&v[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("unset")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_error_gives_a_clear_error_and_writes_still_work() {
    let _shared = REPLICAS.read().await;
    let c = cluster();
    // A group whose only replica does not exist.
    let extra = format!(
        "lag_check_interval = \"100ms\"\n[[cluster.replicas]]\nname = \"ghost\"\naddr = \"127.0.0.1:{}\"\ngroups = [\"ghosts\"]\n\
         [[cluster.groups]]\nname = \"ghosts\"\nfallback = [\"error\"]\n[routing]\ndefault_workload = \"ghosts\"\n",
        free_port()
    );
    let p = start(config("size = 2", &extra)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let cl = connect(&p).await;
    let e = cl.simple_query("SELECT 1").await.unwrap_err();
    let db = e.as_db_error().unwrap();
    assert_eq!(db.code().code(), "57P03");
    assert!(db.message().contains("ghosts") && db.message().contains("ghost:"), "{}", db.message());
    // Extended protocol too, and the session survives.
    let e = cl.query("SELECT $1::int", &[&1i32]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "57P03");
    assert_eq!(port_of(&cl, "CREATE TEMP TABLE IF NOT EXISTS t_x (a int); SELECT inet_server_port()::text").await, c.primary);
}

/// Writes to the primary every 20 ms until dropped (so replicas can lag).
struct Churn(tokio::task::JoinHandle<()>);

impl Churn {
    async fn start() -> Churn {
        let c = cluster();
        let s = format!("host=127.0.0.1 port={} user=app password=app dbname=app", c.primary);
        let direct = connect_with(&s).await.unwrap();
        direct.batch_execute("CREATE TABLE IF NOT EXISTS churn (x int)").await.unwrap();
        Churn(tokio::spawn(async move {
            loop {
                let _ = direct.batch_execute("INSERT INTO churn VALUES (1)").await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }))
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn wait_port(c: &tokio_postgres::Client, want: u16, limit: Duration) -> Duration {
    wait_port_of(c, "SELECT inet_server_port()::text", want, limit).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_replica_is_excluded_and_readmitted() {
    let _exclusive = REPLICAS.write().await;
    let c = cluster();
    let r1 = c.replicas[0];
    let p = routing_proxy("size = 3", "300ms", "off").await;
    let reader = connect(&p).await;
    assert_eq!(port_of(&reader, "SELECT inet_server_port()::text").await, r1);
    let _churn = Churn::start().await;
    c.psql_on(r1, "postgres", "SELECT pg_wal_replay_pause()");
    // Over a 300 ms budget, with 100 ms checks: out well within 2.5 s.
    let took = wait_port(&reader, c.primary, Duration::from_millis(2500)).await;
    let snap = p.app.topology().snapshot();
    let why = snap.replicas[0].excluded_because.clone().unwrap_or_default();
    assert!(why.contains("over the budget of group default"), "{why} (after {took:?})");
    // Reads keep succeeding meanwhile, all on the fallback.
    for _ in 0..20 {
        assert_eq!(port_of(&reader, "SELECT inet_server_port()::text").await, c.primary);
    }
    c.psql_on(r1, "postgres", "SELECT pg_wal_replay_resume()");
    wait_port(&reader, r1, Duration::from_secs(5)).await;
}

/// Resumes a replica's replay when dropped, so a failed test leaves no
/// paused replica behind for the others.
struct ReplayPaused(u16);

impl ReplayPaused {
    fn pause(port: u16) -> ReplayPaused {
        let c = cluster();
        c.psql_on(port, "postgres", "SELECT pg_wal_replay_pause()");
        while c.psql_on(port, "postgres", "SELECT pg_get_wal_replay_pause_state()") != "paused" {
            std::thread::sleep(Duration::from_millis(20));
        }
        ReplayPaused(port)
    }
}

impl Drop for ReplayPaused {
    fn drop(&mut self) {
        cluster().psql_on(self.0, "postgres", "SELECT pg_wal_replay_resume()");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelining_client_leaves_a_replica_that_falls_behind() {
    // Both replicas serve the client's group. The client always has reads
    // in flight, so its connection never comes back to the pool between
    // them; once its replica falls out of the group, its next reads go to
    // the other replica instead of on along the connection it holds.
    use futures_util::StreamExt;
    use std::sync::{atomic::AtomicBool, atomic::Ordering::Relaxed, Arc, Mutex};
    let _exclusive = REPLICAS.write().await;
    let c = cluster();
    let extra = format!(
        "lag_check_interval = \"100ms\"\n\
         [[cluster.replicas]]\nname = \"r1\"\naddr = \"127.0.0.1:{}\"\ngroups = [\"default\"]\n\
         [[cluster.replicas]]\nname = \"r2\"\naddr = \"127.0.0.1:{}\"\ngroups = [\"default\"]\n\
         [[cluster.groups]]\nname = \"default\"\nmax_lag = \"300ms\"\nfallback = [\"primary\"]\n\
         [routing]\ndefault_workload = \"default\"\nread_your_writes = \"off\"\n",
        c.replicas[0], c.replicas[1]
    );
    let p = start(config("size = 3", &extra)).await;
    wait_replicas_usable(&p).await;
    let client = Arc::new(connect(&p).await);
    let seen = Arc::new(Mutex::new(Vec::<(std::time::Instant, u16)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let pipeline = {
        let (seen, stop) = (seen.clone(), stop.clone());
        tokio::spawn(async move {
            let mut inflight = futures_util::stream::FuturesUnordered::new();
            while !stop.load(Relaxed) {
                // (Each read takes 10 ms: the server always has the next
                // ones queued, the connection never falls idle.)
                while inflight.len() < 8 {
                    let c = client.clone();
                    inflight.push(async move { port_of(&c, "SELECT inet_server_port()::text FROM pg_sleep(0.01)").await });
                }
                let port = inflight.next().await.unwrap();
                seen.lock().unwrap().push((std::time::Instant::now(), port));
            }
        })
    };
    let last = || seen.lock().unwrap().last().map(|(_, p)| *p);
    while seen.lock().unwrap().len() < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let bound = last().unwrap();
    let i = c.replicas.iter().position(|r| *r == bound).expect("reads on a replica");
    let _paused = ReplayPaused::pause(bound);
    let _churn = Churn::start().await;
    let topo = p.app.topology();
    let started = std::time::Instant::now();
    while topo.snapshot().replicas[i].usable_in(0) {
        assert!(started.elapsed() < Duration::from_secs(10), "the paused replica never left its group");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let out = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Relaxed);
    pipeline.await.unwrap();
    let after: Vec<u16> = seen.lock().unwrap().iter().filter(|(t, _)| *t > out + Duration::from_millis(300)).map(|(_, p)| *p).collect();
    assert!(after.len() >= 5, "the pipeline kept going: {after:?}");
    assert!(after.iter().all(|p| *p != bound), "reads stayed on the replica that fell behind: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_at_start_gets_no_reads_until_its_lag_is_known() {
    let _exclusive = REPLICAS.write().await;
    let c = cluster();
    let r1 = c.replicas[0];
    // Replication to r1 stalls, the primary writes once and goes idle: r1 is
    // behind by WAL of unknown age when pgfleet starts. Its byte lag is tiny
    // and its time budget 10 s, yet it must not serve reads (it lacks the
    // row) while the monitor cannot tell how old the missing WAL is.
    let paused = ReplayPaused::pause(r1);
    // (The test cluster runs with synchronous_commit off; this commit is flushed.)
    c.psql_on(c.primary, "app", "SET synchronous_commit = on; CREATE TABLE IF NOT EXISTS behind (x int); GRANT SELECT ON behind TO PUBLIC; INSERT INTO behind VALUES (1)");
    let p = start(config("size = 3", &routing_extra("10s", "off"))).await;
    let mut waited = 0;
    while p.app.topology().snapshot().checked_at_us == 0 {
        assert!(waited < 200, "the monitor never checked");
        waited += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snap = p.app.topology().snapshot();
    let why = snap.replicas[0].excluded_because.clone().unwrap_or_default();
    assert!(why.contains("lag unknown"), "{:?}", snap.replicas[0]);
    let reader = connect(&p).await;
    for _ in 0..20 {
        assert_eq!(port_of(&reader, "SELECT inet_server_port()::text").await, c.primary);
        let n: i64 = reader.query_one("SELECT count(*) FROM behind", &[]).await.unwrap().get(0);
        assert!(n >= 1, "a read saw the replica's stale data");
    }
    drop(paused);
    wait_port(&reader, r1, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_keep_serving_reads_across_a_reload() {
    let _shared = REPLICAS.read().await;
    let c = cluster();
    let r1 = c.replicas[0];
    let p = routing_proxy("size = 3", "10s", "off").await;
    // Writes keep the replicas a little behind the primary all along.
    let _churn = Churn::start().await;
    let reader = connect(&p).await;
    wait_port(&reader, r1, Duration::from_secs(5)).await;
    for round in 0..6 {
        // A cluster change: a new topology and monitor. What the old one
        // learned carries over, so reads do not fall back to the primary
        // while the new monitor takes its first look.
        let budget = if round % 2 == 0 { "9s" } else { "10s" };
        p.app.apply(config("size = 3", &routing_extra(budget, "off")));
        let snap = p.app.topology().snapshot();
        assert_eq!(p.app.topology().groups[0].max_lag, Some(Duration::from_secs(if round % 2 == 0 { 9 } else { 10 })));
        assert!(snap.replicas.iter().all(|r| r.groups.iter().all(|(_, ok)| *ok)), "right after reload {round}: {snap:?}");
        for i in 0..10 {
            assert_eq!(port_of(&reader, "SELECT inet_server_port()::text").await, r1, "read {i} after reload {round}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_replica_reads_keep_succeeding() {
    let _exclusive = REPLICAS.write().await;
    let c = cluster();
    let r1 = c.replicas[0];
    let p = routing_proxy("size = 3", "10s", "off").await;
    let readers = [connect(&p).await, connect(&p).await];
    for r in &readers {
        assert_eq!(port_of(r, "SELECT inet_server_port()::text").await, r1);
    }
    let out = c.pg_ctl("replica0", &["stop", "-m", "immediate"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for i in 0..50 {
        for r in &readers {
            let port = port_of(r, "SELECT inet_server_port()::text").await;
            assert_eq!(port, c.primary, "read {i} after the replica stopped");
        }
    }
    let snap = p.app.topology().snapshot();
    assert!(!snap.replicas[0].reachable);
    let out = c.pg_ctl("replica0", &["start", "-w", "-l", &c.dir.join("replica0.log").display().to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_replicas_usable(&p).await;
    wait_port(&readers[0], r1, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_with_a_lagging_replica() {
    let _exclusive = REPLICAS.write().await;
    let c = cluster();
    let r1 = c.replicas[0];
    let auto_conf = c.dir.join("replica0/postgresql.auto.conf");
    let original = std::fs::read_to_string(&auto_conf).unwrap();
    std::fs::write(&auto_conf, format!("{original}recovery_min_apply_delay = '500ms'\n")).unwrap();
    assert!(c.pg_ctl("replica0", &["reload"]).status.success());
    let p = routing_proxy("size = 4", "5s", "lsn").await;
    let writer = connect(&p).await;
    writer.batch_execute("CREATE TABLE IF NOT EXISTS ryw (id serial primary key, v int)").await.unwrap();
    let bystander = connect(&p).await;
    let insert = writer.prepare("INSERT INTO ryw (v) VALUES ($1) RETURNING id").await.unwrap();
    let select = writer.prepare("SELECT v FROM ryw WHERE id = $1").await.unwrap();
    for i in 0..1000i32 {
        let id: i32 = writer.query_one(&insert, &[&i]).await.unwrap().get(0);
        let rows = writer.query(&select, &[&id]).await.unwrap();
        assert_eq!(rows.len(), 1, "iteration {i}: own write not visible");
        assert_eq!(rows[0].get::<_, i32>(0), i);
        if i % 100 == 0 {
            // Reads that do not follow a write still go to the replica.
            assert_eq!(port_of(&bystander, "SELECT inet_server_port()::text").await, r1);
        }
    }
    // The floor is visible and can be carried to another connection.
    let lsn: String = writer.query_one("SHOW pgfleet.lsn", &[]).await.unwrap().get(0);
    assert_ne!(lsn, "0/0");
    let other = connect(&p).await;
    other.batch_execute(&format!("SET pgfleet.min_lsn = '{lsn}'")).await.unwrap();
    writer.batch_execute("INSERT INTO ryw (v) VALUES (-1)").await.unwrap();
    let lsn2: String = writer.query_one("SHOW pgfleet.lsn", &[]).await.unwrap().get(0);
    other.batch_execute(&format!("SET pgfleet.min_lsn = '{lsn2}'")).await.unwrap();
    let n: i64 = other.query_one("SELECT count(*) FROM ryw WHERE v = -1", &[]).await.unwrap().get(0);
    assert_eq!(n, 1, "a floor carried across connections");
    // Once the replica has replayed past the floor, the writer reads from it again.
    wait_port(&writer, r1, Duration::from_secs(5)).await;
    std::fs::write(&auto_conf, original).unwrap();
    assert!(c.pg_ctl("replica0", &["reload"]).status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_holds_with_asynchronous_commit() {
    let _shared = REPLICAS.read().await;
    let c = cluster();
    // The test cluster runs with synchronous_commit = off: a commit returns
    // before its WAL is written, so the floor must be where the commit was
    // inserted, not what the primary has written so far. No apply delay:
    // the replica is close behind, the way a floor taken too low shows.
    assert_eq!(c.psql_on(c.primary, "app", "SHOW synchronous_commit"), "off");
    let p = routing_proxy("size = 4", "10s", "lsn").await;
    let writer = connect(&p).await;
    writer.batch_execute("CREATE TABLE IF NOT EXISTS ryw_async (id serial primary key, v int)").await.unwrap();
    let insert = writer.prepare("INSERT INTO ryw_async (v) VALUES ($1) RETURNING id").await.unwrap();
    let select = writer.prepare("SELECT v FROM ryw_async WHERE id = $1").await.unwrap();
    for i in 0..300i32 {
        if i % 30 == 0 {
            // The hard case: the first write after a quiet spell, when the
            // replica has replayed all the primary had written.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let id: i32 = writer.query_one(&insert, &[&i]).await.unwrap().get(0);
        let rows = writer.query(&select, &[&id]).await.unwrap();
        assert_eq!(rows.len(), 1, "iteration {i}: own write not visible");
    }
    // The floor is one the replica reaches: reads return to it.
    wait_port(&writer, c.replicas[0], Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pinned_on_a_replica_gets_an_error_for_a_write_not_a_hang() {
    let _shared = REPLICAS.read().await;
    let p = routing_proxy("size = 3", "10s", "off").await;
    let client = connect(&p).await;
    // A read-only transaction goes to a replica, where PREPARE pins the client.
    client.batch_execute("BEGIN READ ONLY").await.unwrap();
    client
        .batch_execute("PREPARE rt_pinned_p AS SELECT 1")
        .await
        .unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    let write = tokio::time::timeout(
        Duration::from_secs(5),
        client.batch_execute("CREATE TABLE IF NOT EXISTS rt_pinned (v int)"),
    )
    .await;
    let err = write
        .expect("the write must not wait forever for the pinned replica connection")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "25006", "{err:?}");
    // The session goes on, still pinned where its prepared statement lives.
    let one: i32 = client
        .query_one("EXECUTE rt_pinned_p", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(one, 1);
    client
        .batch_execute("DEALLOCATE rt_pinned_p")
        .await
        .unwrap();
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS rt_pinned (v int)")
        .await
        .unwrap();
}

/// Polls `sql` (returning a port) until it is answered by `want`; how long that took.
async fn wait_port_of(c: &tokio_postgres::Client, sql: &str, want: u16, limit: Duration) -> Duration {
    let started = std::time::Instant::now();
    loop {
        let got = port_of(c, sql).await;
        if got == want {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{sql}: still answered by {got}, not {want}, after {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until replica r1 has function `name` and pgfleet's catalog of
/// "app" is loaded (until then, reads that call functions go to the
/// primary: not sure, primary).
async fn wait_function_everywhere(p: &pgfleet::app::Running, name: &str) {
    let c = cluster();
    let started = std::time::Instant::now();
    let sql = format!("SELECT count(*) FROM pg_proc WHERE proname = '{name}'");
    while c.psql_on(c.replicas[0], "app", &sql) != "1" || !p.app.catalogs.is_loaded("app") {
        assert!(started.elapsed() < Duration::from_secs(10), "the replica or the catalog never caught up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_calling_the_applications_volatile_functions_go_to_the_primary() {
    let _shared = REPLICAS.read().await;
    let c = cluster();
    let r1 = c.replicas[0];
    let extra = routing_extra("10s", "off").replace(
        "read_your_writes = \"off\"\n",
        "read_your_writes = \"off\"\nfunction_catalog_refresh = \"1s\"\nread_functions = [\"public.fn_port_allowed\"]\n",
    );
    let p = start(config("size = 3", &extra)).await;
    wait_replicas_usable(&p).await;
    let writer = connect(&p).await;
    // Made through pgfleet: the catalog is reloaded when this commits.
    // CREATE FUNCTION makes a function VOLATILE unless it says otherwise.
    writer
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS fn_orders (n int); \
             CREATE OR REPLACE FUNCTION fn_create_order(n int) RETURNS int LANGUAGE sql \
               AS 'INSERT INTO fn_orders VALUES (n) RETURNING n'; \
             CREATE OR REPLACE FUNCTION fn_port_volatile() RETURNS text LANGUAGE sql AS 'SELECT inet_server_port()::text'; \
             CREATE OR REPLACE FUNCTION fn_port_allowed() RETURNS text LANGUAGE sql AS 'SELECT inet_server_port()::text'; \
             CREATE OR REPLACE FUNCTION \"Fn_Port_Quoted\"() RETURNS text LANGUAGE sql AS 'SELECT inet_server_port()::text'; \
             CREATE OR REPLACE FUNCTION fn_port_stable() RETURNS text STABLE LANGUAGE sql AS 'SELECT inet_server_port()::text'",
        )
        .await
        .unwrap();
    wait_function_everywhere(&p, "fn_port_stable").await;
    let reader = connect(&p).await;
    for _ in 0..5 {
        // A SELECT that writes through the application's function: on a
        // replica it would fail with 25006.
        let n: i32 = reader.query_one("SELECT fn_create_order(7)", &[]).await.unwrap().get(0);
        assert_eq!(n, 7);
        assert_eq!(port_of(&reader, "SELECT inet_server_port()::text FROM (SELECT fn_create_order(8)) s").await, c.primary);
        assert_eq!(port_of(&reader, "SELECT fn_port_volatile()").await, c.primary);
        assert_eq!(port_of(&reader, "SELECT app.public.\"Fn_Port_Quoted\"()").await, c.primary);
        let port: String = reader.query_one("SELECT public.fn_port_volatile()", &[]).await.unwrap().get(0);
        assert_eq!(port.parse::<u16>().unwrap(), c.primary, "extended protocol");
        // STABLE cannot write; listed in read_functions: the replica.
        assert_eq!(port_of(&reader, "SELECT fn_port_stable()").await, r1);
        assert_eq!(port_of(&reader, "SELECT fn_port_allowed()").await, r1);
        assert_eq!(port_of(&reader, "SELECT lower(inet_server_port()::text)").await, r1);
    }
    // One extended-protocol batch (one Sync): a later statement that calls
    // the writing function takes the whole batch to the primary.
    let mut raw = RawClient::login(&p, "app", "app").await;
    let mut batch = crate::protocol::pbe("", Some("SELECT inet_server_port()::text"));
    batch.extend(crate::protocol::pbe("", Some("SELECT fn_create_order(9)::text")));
    batch.extend(crate::protocol::msg(b'S', b""));
    raw.stream.write_all(&batch).await.unwrap();
    let (rows, errors) = crate::protocol::read_cycle(&mut raw).await;
    assert_eq!(errors, Vec::<String>::new());
    assert_eq!(rows, vec![c.primary.to_string(), "9".to_string()]);
    // DDL prepared in one round (Parse/Describe/Sync) and run in the next
    // (Bind/Execute/Sync), as lib/pq does: the catalog is reloaded after
    // the round that ran it, not the one that parsed it.
    let ddl = "CREATE OR REPLACE FUNCTION fn_late() RETURNS text LANGUAGE sql AS 'SELECT inet_server_port()::text'";
    let mut round = crate::protocol::msg(b'P', &[b"\0", ddl.as_bytes(), b"\0\0\0"].concat());
    round.extend(crate::protocol::msg(b'D', b"S\0"));
    round.extend(crate::protocol::msg(b'S', b""));
    raw.stream.write_all(&round).await.unwrap();
    assert_eq!(crate::protocol::read_cycle(&mut raw).await.1, Vec::<String>::new());
    // (A reload started by that round would have finished by now.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut round = crate::protocol::pbe("", None);
    round.extend(crate::protocol::msg(b'S', b""));
    raw.stream.write_all(&round).await.unwrap();
    assert_eq!(crate::protocol::read_cycle(&mut raw).await.1, Vec::<String>::new());
    wait_function_everywhere(&p, "fn_late").await;
    assert_eq!(port_of(&reader, "SELECT fn_late()").await, c.primary);
    // Changed through pgfleet: followed as soon as the replica has it.
    writer.batch_execute("ALTER FUNCTION fn_port_volatile() STABLE").await.unwrap();
    wait_port_of(&reader, "SELECT fn_port_volatile()", r1, Duration::from_secs(10)).await;
    // Changed behind pgfleet's back: followed within the refresh interval.
    c.psql_on(c.primary, "app", "ALTER FUNCTION fn_port_volatile() VOLATILE");
    wait_port_of(&reader, "SELECT fn_port_volatile()", c.primary, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_transactions_are_not_sent_where_a_standby_refuses_them() {
    let _shared = REPLICAS.read().await;
    let c = cluster();
    let p = routing_proxy("size = 3", "10s", "off").await;
    let client = connect(&p).await;
    assert_eq!(port_of(&client, "SELECT inet_server_port()::text").await, c.replicas[0]);
    // Explicitly serializable, even READ ONLY: the primary.
    client.batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY").await.unwrap();
    assert_eq!(port_of(&client, "SELECT inet_server_port()::text").await, c.primary);
    client.batch_execute("COMMIT").await.unwrap();
    // Serializable by default for this session: every read on the primary.
    client.batch_execute("SET default_transaction_isolation = 'serializable'").await.unwrap();
    assert_eq!(port_of(&client, "SELECT inet_server_port()::text").await, c.primary);
    client.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(port_of(&client, "SELECT inet_server_port()::text").await, c.primary);
    client.batch_execute("COMMIT").await.unwrap();
    client.batch_execute("RESET default_transaction_isolation").await.unwrap();
    // (The first read may still run on the primary connection the RESET
    // ran on, bound until pgfleet's own check after it ends.)
    port_of(&client, "SELECT inet_server_port()::text").await;
    assert_eq!(port_of(&client, "SELECT inet_server_port()::text").await, c.replicas[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_call_message_counts_as_a_write_for_read_your_writes() {
    // libpq's large-object calls are FunctionCall messages: what they
    // write must raise the client's read-your-writes floor like any write.
    let _shared = REPLICAS.read().await;
    let p = routing_proxy("size = 3", "10s", "lsn").await;
    let oid: u32 = connect(&p).await.query_one("SELECT 'lo_creat'::regproc::oid", &[]).await.unwrap().get(0);
    let mut raw = RawClient::login(&p, "app", "app").await;
    let mut body = oid.to_be_bytes().to_vec();
    body.extend(0u16.to_be_bytes()); // argument formats: text
    body.extend(1u16.to_be_bytes());
    body.extend(1u32.to_be_bytes());
    body.push(b'0');
    body.extend(0u16.to_be_bytes()); // result format
    raw.stream.write_all(&crate::protocol::msg(b'F', &body)).await.unwrap();
    loop {
        let (tag, m) = raw.next().await.unwrap();
        assert_ne!(tag, b'E', "{:?}", pgfleet::wire::error_fields(&m));
        if tag == b'Z' {
            break;
        }
    }
    raw.stream.write_all(&crate::protocol::msg(b'Q', b"SHOW pgfleet.lsn\0")).await.unwrap();
    let (rows, errors) = crate::protocol::read_cycle(&mut raw).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_ne!(rows, vec!["0/0".to_string()], "the call's LSN is the floor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_adds_write_functions_reroutes_statements_prepared_before() {
    // routing.write_functions names functions that write though declared
    // STABLE. A statement prepared before the reload that adds one must
    // go to the primary from then on, not only statements parsed after it.
    let _shared = REPLICAS.read().await;
    let c = cluster();
    let p = routing_proxy("size = 3", "10s", "off").await;
    let writer = connect(&p).await;
    writer
        .batch_execute(
            "CREATE OR REPLACE FUNCTION fn_stable_port() RETURNS text LANGUAGE sql STABLE AS 'SELECT inet_server_port()::text'",
        )
        .await
        .unwrap();
    wait_function_everywhere(&p, "fn_stable_port").await;
    let client = connect(&p).await;
    let stmt = client.prepare("SELECT fn_stable_port()").await.unwrap();
    let port = |r: tokio_postgres::Row| r.get::<_, String>(0).parse::<u16>().unwrap();
    assert_eq!(port(client.query_one(&stmt, &[]).await.unwrap()), c.replicas[0]);
    let mut cfg = (*p.app.config()).clone();
    cfg.routing.write_functions = vec!["public.fn_stable_port".into()];
    p.app.apply(cfg);
    assert_eq!(port(client.query_one(&stmt, &[]).await.unwrap()), c.primary, "the prepared statement");
    assert_eq!(port_of(&client, "SELECT fn_stable_port()").await, c.primary);
}

/// A forwarder to `port` that lets `allowed` connections of `user` through
/// and answers that user's later ones as a full server does (FATAL 53300);
/// other users' connections always pass. Returns the port and how many it
/// refused.
async fn full_server_forwarder(port: u16, user: &'static str, allowed: usize) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::AsyncReadExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fwd = l.local_addr().unwrap().port();
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (n, passed) = (refused.clone(), std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)));
    tokio::spawn(async move {
        while let Ok((mut a, _)) = l.accept().await {
            let (n, passed) = (n.clone(), passed.clone());
            tokio::spawn(async move {
                let mut len = [0u8; 4];
                if a.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut packet = vec![0u8; u32::from_be_bytes(len) as usize - 4];
                if a.read_exact(&mut packet).await.is_err() {
                    return;
                }
                let marker = format!("user\0{user}\0");
                let is_user = packet.windows(marker.len()).any(|w| w == marker.as_bytes());
                if is_user && passed.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= allowed {
                    n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let body = b"SFATAL\0VFATAL\0C53300\0Msorry, too many clients already\0\0";
                    let _ = a.write_all(&crate::protocol::msg(b'E', body)).await;
                    return;
                }
                if let Ok(mut b) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = b.write_all(&[&len[..], &packet].concat()).await;
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
        }
    });
    (fwd, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_at_max_connections_serves_reads_on_the_connections_it_has() {
    // The replica lets pgfleet's pool have one connection and refuses
    // more (53300). A second read at the same time waits for that one
    // connection instead of marking the replica down (which sent the
    // group's reads to the primary).
    let _shared = REPLICAS.read().await;
    let c = cluster();
    let (fwd, refused) = full_server_forwarder(c.replicas[0], "app", 1).await;
    let extra = format!("health_user = \"bench\"\n{}", routing_extra("10s", "off"))
        .replace(&format!("127.0.0.1:{}", c.replicas[0]), &format!("127.0.0.1:{fwd}"));
    let p = start(config("size = 3", &extra)).await;
    wait_replicas_usable(&p).await;
    let (a, b) = (connect(&p).await, connect(&p).await);
    // (The replica's port as the replica sees it: the forwarder's target.)
    assert_eq!(port_of(&a, "SELECT inet_server_port()::text").await, c.replicas[0]);
    let slow = tokio::spawn(async move { port_of(&a, "SELECT inet_server_port()::text FROM pg_sleep(0.5)").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(port_of(&b, "SELECT inet_server_port()::text").await, c.replicas[0], "waited for the replica's connection");
    assert_eq!(slow.await.unwrap(), c.replicas[0]);
    assert!(refused.load(std::sync::atomic::Ordering::SeqCst) >= 1, "the second connect was refused");
    assert!(p.app.topology().snapshot().replicas[0].usable_in(0), "not marked down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_replica_delays_no_other_servers_check() {
    // r1 stops answering without closing anything (a frozen VM, a
    // partition): each of its checks waits out the timeout (5 intervals).
    // The primary and r2 are still checked every interval, so their lag is
    // current; r1 leaves its groups once its check times out, and returns
    // when it answers again.
    let _shared = REPLICAS.read().await;
    let c = cluster();
    let (fwd, frozen) = freezing_forwarder(c.replicas[0]).await;
    let extra = routing_extra("10s", "off")
        .replace("lag_check_interval = \"100ms\"", "lag_check_interval = \"400ms\"")
        .replace(&format!("127.0.0.1:{}", c.replicas[0]), &format!("127.0.0.1:{fwd}"));
    let p = start(config("size = 3", &extra)).await;
    wait_replicas_usable(&p).await;
    frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    let topo = p.app.topology();
    let started = std::time::Instant::now();
    let (mut rounds, mut seen, mut r1_out) = (0, topo.snapshot().checked_at_us, None);
    while started.elapsed() < Duration::from_millis(4000) {
        let s = topo.snapshot();
        if s.checked_at_us != seen {
            (rounds, seen) = (rounds + 1, s.checked_at_us);
            assert!(s.replicas[1].usable_in(2), "r2 stays in analytics: {:?}", s.replicas[1]);
        }
        if r1_out.is_none() && !s.replicas[0].usable_in(0) {
            r1_out = Some((started.elapsed(), s.replicas[0].excluded_because.clone().unwrap_or_default()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One round per interval (the checks of a round that waited for r1
    // took 2 s each: 2 rounds).
    assert!(rounds >= 7, "{rounds} rounds in 4 s at a 400 ms interval");
    let (when, why) = r1_out.expect("r1 left its groups");
    assert!(why.contains("timed out"), "{why}");
    assert!(when < Duration::from_millis(3200), "r1 out after {when:?} (timeout 2 s)");
    frozen.store(false, std::sync::atomic::Ordering::SeqCst);
    wait_replicas_usable(&p).await;
}

/// A forwarder to `port` that, the first time pgfleet sends a message
/// containing `needle`, closes that connection (as a server that dies at
/// that moment).
async fn cutting_forwarder(port: u16, needle: &'static [u8]) -> (u16, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use tokio::io::AsyncReadExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fwd = l.local_addr().unwrap().port();
    let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = cut.clone();
    tokio::spawn(async move {
        while let Ok((a, _)) = l.accept().await {
            let done = done.clone();
            tokio::spawn(async move {
                let Ok(b) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return };
                let (mut ar, mut aw) = a.into_split();
                let (mut br, mut bw) = b.into_split();
                let back = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut br, &mut aw).await;
                });
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match ar.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let hit = buf[..n].windows(needle.len()).any(|w| w == needle);
                    if hit && !done.swap(true, std::sync::atomic::Ordering::SeqCst) {
                        break; // the "server" dies as the message arrives
                    }
                    if bw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                back.abort();
            });
        }
    });
    (fwd, cut)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_lost_during_the_check_after_a_write_does_not_end_the_client_session() {
    // After a write, pgfleet asks the primary for its WAL position
    // (read-your-writes). The connection dies at that moment: the client
    // has its answer and must carry on, its reads kept on the primary
    // until the position is known again.
    let _shared = REPLICAS.read().await;
    let c = cluster();
    let (fwd, cut) = cutting_forwarder(c.primary, b"pg_current_wal_insert_lsn").await;
    let mut cfg = config("size = 3", &routing_extra("10s", "lsn"));
    cfg.cluster.primary = format!("127.0.0.1:{fwd}");
    let p = start(cfg).await;
    wait_replicas_usable(&p).await;
    let client = connect(&p).await;
    client.batch_execute("CREATE TABLE IF NOT EXISTS rt_lost_check (n int)").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(cut.load(std::sync::atomic::Ordering::SeqCst), "the check was cut");
    let rows = client.query("SELECT count(*) FROM rt_lost_check", &[]).await.expect("the session goes on");
    assert_eq!(rows.len(), 1);
    assert_eq!(port_of(&client, "SELECT inet_server_port()::text").await, c.primary, "the write's position is not known yet");
    // Once the monitor has read the primary's position after it: replicas.
    wait_port(&client, c.replicas[0], Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_lsn_covers_a_write_pipelined_before_it_and_min_lsn_keeps_the_own_floor() {
    // SHOW pgfleet.lsn is what an application hands to another connection
    // (SET pgfleet.min_lsn) to read its own write there: sent right behind
    // the write, before the write's position was read, it must still
    // cover it.
    let _shared = REPLICAS.read().await;
    let c = cluster();
    let p = routing_proxy("size = 3", "10s", "lsn").await;
    connect(&p).await.batch_execute("CREATE TABLE IF NOT EXISTS lsn_pipe (v int)").await.unwrap();
    let insert_lsn = || pgfleet::topology::parse_lsn(&tokio::task::block_in_place(|| c.psql_on(c.primary, "app", "SELECT pg_current_wal_insert_lsn()"))).unwrap();
    // Sends `first` and SHOW pgfleet.lsn at once: the LSN shown.
    async fn pipelined_show_lsn(raw: &mut RawClient, first: &str) -> String {
        let mut out = bytes::BytesMut::new();
        pgfleet::wire::build::query(&mut out, first);
        pgfleet::wire::build::query(&mut out, "SHOW pgfleet.lsn");
        raw.stream.write_all(&out).await.unwrap();
        assert_eq!(crate::protocol::read_cycle(raw).await, (vec![], vec![]));
        let (rows, errors) = crate::protocol::read_cycle(raw).await;
        assert!(errors.is_empty(), "{errors:?}");
        rows[0].clone()
    }
    let before = insert_lsn();
    let mut raw = RawClient::login(&p, "app", "app").await;
    let shown = pipelined_show_lsn(&mut raw, "INSERT INTO lsn_pipe VALUES (1)").await;
    assert!(pgfleet::topology::parse_lsn(&shown).unwrap() > before, "{shown} does not cover the write");
    // Behind a COMMIT pipelined in a transaction whose write was answered.
    let mut out = bytes::BytesMut::new();
    pgfleet::wire::build::query(&mut out, "BEGIN; INSERT INTO lsn_pipe VALUES (2)");
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(crate::protocol::read_cycle(&mut raw).await, (vec![], vec![]));
    let before = insert_lsn();
    let shown = pipelined_show_lsn(&mut raw, "COMMIT").await;
    assert!(pgfleet::topology::parse_lsn(&shown).unwrap() > before, "{shown} does not cover the commit");
    // An unquoted LSN is refused, not taken for a RESET; a RESET forgets
    // the floor the client raised, not its own write's.
    let mut out = bytes::BytesMut::new();
    pgfleet::wire::build::query(&mut out, "SET pgfleet.min_lsn = 0/1");
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(crate::protocol::read_cycle(&mut raw).await.1, vec!["22023".to_string()]);
    let mut out = bytes::BytesMut::new();
    pgfleet::wire::build::query(&mut out, "SET pgfleet.min_lsn = 'FFFF/0'");
    pgfleet::wire::build::query(&mut out, "RESET pgfleet.min_lsn");
    pgfleet::wire::build::query(&mut out, "SHOW pgfleet.lsn");
    raw.stream.write_all(&out).await.unwrap();
    crate::protocol::read_cycle(&mut raw).await;
    crate::protocol::read_cycle(&mut raw).await;
    assert_eq!(crate::protocol::read_cycle(&mut raw).await, (vec![shown], vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_pipelined_behind_a_read_only_default_change_is_routed_by_the_new_value() {
    // A session that starts read-only by default turns that off and,
    // without waiting, writes in a transaction (libpq pipeline mode). The
    // BEGIN must be routed by the new default, not bound to a replica by
    // the old one.
    let _shared = REPLICAS.read().await;
    let p = routing_proxy("size = 3", "10s", "off").await;
    connect(&p).await.batch_execute("CREATE TABLE IF NOT EXISTS ro_default (v int)").await.unwrap();
    let mut startup = bytes::BytesMut::new();
    pgfleet::wire::startup::startup_message(
        &mut startup,
        &[("user", "app"), ("database", "app"), ("options", "-c default_transaction_read_only=on")],
    );
    let (mut raw, _) = RawClient::login_with(&p, &startup, "app").await;
    let mut out = bytes::BytesMut::new();
    for sql in ["SET default_transaction_read_only = off", "BEGIN", "INSERT INTO ro_default VALUES (1)", "COMMIT"] {
        pgfleet::wire::build::query(&mut out, sql);
    }
    raw.stream.write_all(&out).await.unwrap();
    for _ in 0..4 {
        let (_, errors) = crate::protocol::read_cycle(&mut raw).await;
        assert!(errors.is_empty(), "{errors:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_trust_and_no_passwords_the_monitor_runs_and_reads_use_replicas() {
    // No user has a password (auth.method = "trust", servers that trust
    // pgfleet: here the cluster trusts `postgres` over TCP). The monitor
    // used to need a password, so it never started and no read ever left
    // the primary.
    let _shared = REPLICAS.read().await;
    let c = cluster();
    let text = format!(
        "[listen]\naddr = \"127.0.0.1:0\"\n[auth]\nmethod = \"trust\"\n[[users]]\nname = \"postgres\"\n[[databases]]\nname = \"app\"\n[cluster]\nprimary = \"127.0.0.1:{}\"\n{}",
        c.primary,
        routing_extra("10s", "off")
    );
    let p = start(pgfleet::config::Config::parse(&text, "trust.toml").unwrap()).await;
    wait_replicas_usable(&p).await;
    let client = connect_with(&format!("host=127.0.0.1 port={} user=postgres dbname=app", p.addr.port())).await.unwrap();
    assert_eq!(port_of(&client, "SELECT inet_server_port()::text").await, c.replicas[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_waited_for_a_replica_taken_out_meanwhile_is_routed_again() {
    // r1's pool has one connection, held by a read-only transaction. A
    // read routed to r1 waits for it; meanwhile r1 is taken out (here:
    // marked down, as after a failed connect). Once the connection comes
    // back, the waiting read must not run on r1: routed again, the
    // default group's fallback is the primary.
    // (A query timeout shorter than the wait: the read's clock starts when
    // it gets its connection, not when it began waiting.)
    let _shared = REPLICAS.read().await;
    let c = cluster();
    let p = start(config("size = 1", &format!("{}\n[timeouts]\nquery = \"250ms\"", routing_extra("10s", "off")))).await;
    wait_replicas_usable(&p).await;
    let holder = connect(&p).await;
    holder.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(port_of(&holder, "SELECT inet_server_port()::text").await, c.replicas[0]);
    let reader = connect(&p).await;
    let waiting = tokio::spawn(async move { port_of(&reader, "SELECT inet_server_port()::text FROM pg_sleep(0.1)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the read waits for r1's only connection");
    // Kept down across the monitor's rounds while the test runs.
    let topo = p.app.topology();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let marker = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                topo.mark_down(0, "test: taken out");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    holder.batch_execute("COMMIT").await.unwrap();
    let port = tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    marker.await.unwrap();
    assert_eq!(port, c.primary, "routed again after the wait, not run on the replica taken out");
}
