//! Operating pgfleet: hot reload under load, invalid reloads, SIGTERM
//! draining and restarts without refusing connections (SO_REUSEPORT), all
//! against the real binary where signals are involved.

use crate::harness::*;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn config_text(listen: &str, pool_size: usize, replicas: &str) -> String {
    let c = cluster();
    format!(
        r#"[listen]
addr = "{listen}"
[admin]
users = ["admin"]
[pool]
size = {pool_size}
[timeouts]
shutdown_grace = "15s"
[[users]]
name = "app"
password = "app"
[[users]]
name = "admin"
password = "admin"
[[databases]]
name = "app"
[cluster]
primary = "127.0.0.1:{primary}"
{replicas}
"#,
        primary = c.primary
    )
}

fn replicas_a() -> String {
    format!(
        "lag_check_interval = \"100ms\"\n[[cluster.replicas]]\nname = \"r1\"\naddr = \"127.0.0.1:{}\"\ngroups = [\"default\"]\n\
         [[cluster.groups]]\nname = \"default\"\n[[cluster.groups]]\nname = \"analytics\"\nfallback = [\"primary\"]\n\
         [[routing.rules]]\napplication_name = \"reporting*\"\nworkload = \"default\"\n",
        cluster().replicas[0]
    )
}

fn replicas_b() -> String {
    format!(
        "lag_check_interval = \"100ms\"\n[[cluster.replicas]]\nname = \"r1\"\naddr = \"127.0.0.1:{}\"\ngroups = [\"default\"]\n\
         [[cluster.replicas]]\nname = \"r2\"\naddr = \"127.0.0.1:{}\"\ngroups = [\"analytics\"]\n\
         [[cluster.groups]]\nname = \"default\"\n[[cluster.groups]]\nname = \"analytics\"\nfallback = [\"primary\"]\n\
         [[routing.rules]]\napplication_name = \"reporting*\"\nworkload = \"analytics\"\n",
        cluster().replicas[0],
        cluster().replicas[1]
    )
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pgfleet-ops-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_without_client_errors() {
    let _shared = REPLICAS.read().await;
    let c = cluster();
    let path = temp_file("reload.toml", &config_text("127.0.0.1:0", 5, &replicas_a()));
    let p = start(pgfleet::config::Config::load(&path).unwrap()).await;
    *p.app.config_path.lock().unwrap() = Some(path.clone());
    wait_replicas_usable(&p).await;
    connect(&p).await.batch_execute("CREATE TABLE IF NOT EXISTS reload_t (x int)").await.unwrap();
    let errors = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (s, errors, done) = (conn_str(&p, "app", "app", "app"), errors.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = connect_with(&s).await.unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            while tokio::time::Instant::now() < deadline {
                let r = async {
                    let tx = client.transaction().await?;
                    tx.execute("INSERT INTO reload_t VALUES ($1)", &[&i]).await?;
                    tx.commit().await?;
                    client.query_one("SELECT count(*) FROM pg_class", &[]).await.map(|_| ())
                }
                .await;
                match r {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("client error: {e}");
                        errors.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Shrink the pool, add a replica, change a rule; applied by the admin RELOAD.
    std::fs::write(&path, config_text("127.0.0.1:0", 2, &replicas_b())).unwrap();
    let admin = connect_with(&conn_str(&p, "admin", "admin", "pgfleet")).await.unwrap();
    admin.simple_query("RELOAD").await.unwrap();
    // The primary pools shrink while the load goes on (excess connections
    // close as they come back, though clients are waiting for them).
    let primary_totals = || {
        p.app
            .pools()
            .iter()
            .filter(|pl| pl.key.backend == "primary")
            .map(|pl| pl.stats().total)
            .collect::<Vec<_>>()
    };
    let shrink_began = std::time::Instant::now();
    while primary_totals().iter().any(|t| *t > 2)
        && shrink_began.elapsed() < Duration::from_millis(1500)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        primary_totals().iter().all(|t| *t <= 2),
        "not shrunk under load: {:?}",
        primary_totals()
    );
    assert!(
        tasks.iter().any(|t| !t.is_finished()),
        "the load was still running"
    );
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(errors.load(Ordering::Relaxed), 0, "client errors during reload");
    assert!(done.load(Ordering::Relaxed) > 100);
    assert_eq!(p.app.config().pool.size, 2);
    assert_eq!(p.app.topology().replicas.len(), 2);
    // The pool shrinks as connections come back.
    for _ in 0..100 {
        if p.app.pools().iter().filter(|pl| pl.key.backend == "primary").all(|pl| pl.stats().total <= 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(p.app.pools().iter().all(|pl| pl.stats().total <= 2), "{:?}", p.app.pools().iter().map(|pl| pl.stats()).collect::<Vec<_>>());
    // The new rule and the new replica serve new clients.
    wait_replicas_usable(&p).await;
    let reporting = connect_with(&format!("{} application_name=reporting-nightly", conn_str(&p, "app", "app", "app"))).await.unwrap();
    assert_eq!(port_of(&reporting, "SELECT inet_server_port()::text").await, c.replicas[1]);
    // An invalid file changes nothing and says why.
    std::fs::write(&path, "[pool]\nsize = 0\nbogus = 1\n").unwrap();
    let e = admin.simple_query("RELOAD").await.unwrap_err();
    let db = e.as_db_error().unwrap();
    assert_eq!(db.code().code(), "F0000");
    assert!(db.message().contains("bogus"), "{}", db.message());
    assert_eq!(p.app.config().pool.size, 2);
    assert_eq!(port_of(&reporting, "SELECT inet_server_port()::text").await, c.replicas[1]);
}

fn spawn_pgfleet(config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_pgfleet"))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn wait_listening(port: u16) {
    for _ in 0..200 {
        if connect_with(&format!("host=127.0.0.1 port={port} user=app password=app dbname=app")).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("pgfleet did not start on {port}");
}

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success());
}

async fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(std::time::Instant::now() < deadline, "pgfleet did not exit in {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_open_transactions_commit() {
    let port = free_port();
    let path = temp_file("sigterm.toml", &config_text(&format!("127.0.0.1:{port}"), 3, ""));
    let mut child = spawn_pgfleet(&path);
    wait_listening(port).await;
    let s = format!("host=127.0.0.1 port={port} user=app password=app dbname=app");
    let mut client = connect_with(&s).await.unwrap();
    client.batch_execute("DROP TABLE IF EXISTS sigterm_t; CREATE TABLE sigterm_t (x int)").await.unwrap();
    let tx = client.transaction().await.unwrap();
    tx.execute("INSERT INTO sigterm_t VALUES (1)", &[]).await.unwrap();
    signal(&child, "-TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(connect_with(&s).await.is_err(), "no new clients while draining");
    tx.execute("INSERT INTO sigterm_t VALUES (2)", &[]).await.unwrap();
    tx.commit().await.unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(10)).await;
    assert!(status.success());
    assert_eq!(cluster().psql_on(cluster().primary, "app", "SELECT count(*) FROM sigterm_t"), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_on_the_same_port_refuses_nobody() {
    let port = free_port();
    let path = temp_file("reuseport.toml", &config_text(&format!("127.0.0.1:{port}"), 3, ""));
    let mut old = spawn_pgfleet(&path);
    wait_listening(port).await;
    let failures = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let load = {
        let (failures, ok) = (failures.clone(), ok.clone());
        tokio::spawn(async move {
            for _ in 0..150 {
                let s = format!("host=127.0.0.1 port={port} user=app password=app dbname=app");
                match connect_with(&s).await {
                    Ok(c) => match c.simple_query("SELECT 1").await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("query failed: {e}");
                            failures.fetch_add(1, Ordering::Relaxed)
                        }
                    },
                    Err(e) => {
                        eprintln!("connect failed: {e}");
                        failures.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut new = spawn_pgfleet(&path);
    tokio::time::sleep(Duration::from_millis(700)).await;
    signal(&old, "-TERM");
    assert!(wait_exit(&mut old, Duration::from_secs(10)).await.success());
    load.await.unwrap();
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert_eq!(ok.load(Ordering::Relaxed), 150);
    signal(&new, "-INT");
    assert!(wait_exit(&mut new, Duration::from_secs(5)).await.success());
}

/// Structured logs: an event from inside a client's session (pinning, at
/// `info`) carries the client's context (its span: peer, user, database),
/// though the session task is not instrumented on every poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_events_carry_the_client_context_in_json_logs() {
    let port = free_port();
    let text = format!("{}[log]\nlevel = \"info\"\nformat = \"json\"\n", config_text(&format!("127.0.0.1:{port}"), 2, ""));
    let path = temp_file("json-logs.toml", &text);
    let log = path.with_extension("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgfleet"))
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port).await;
    let s = format!("host=127.0.0.1 port={port} user=app password=app dbname=app");
    let client = connect_with(&s).await.unwrap();
    client.simple_query("SELECT pg_advisory_lock(4343)::text").await.unwrap();
    client.simple_query("SELECT pg_advisory_unlock(4343)::text").await.unwrap();
    drop(client);
    signal(&child, "-TERM");
    assert!(wait_exit(&mut child, Duration::from_secs(10)).await.success());
    let out = std::fs::read_to_string(&log).unwrap();
    let line = out
        .lines()
        .find(|l| l.contains("client pinned to its server connection"))
        .unwrap_or_else(|| panic!("no pinning event in:\n{out}"));
    for field in ["\"user\":\"app\"", "\"database\":\"app\"", "\"peer\":\"127.0.0.1:", "\"name\":\"client\""] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
    assert!(!out.contains("password=app") && !out.contains("\"app\",\"password\""), "no secrets in logs");
}
