//! TLS: towards clients (psql with sslmode=require / verify-full against a
//! CA generated here, plaintext refused under "require", certificates
//! reloaded, SCRAM with a stored verifier and channel binding) and towards
//! the servers (`cluster.server_tls_mode`).

use crate::harness::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn psql(p: &pgfleet::app::Running, conninfo: &str, sql: &str) -> (bool, String) {
    let url = format!("host=127.0.0.1 port={} user=app dbname=app {conninfo}", p.addr.port());
    let out = Command::new(cluster().bindir.join("psql"))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", &url, "-c", sql])
        .env("PGPASSWORD", "app")
        .env("PGSSLCERT", "/nonexistent")
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn tls_config(dir: &Path, mode: &str) -> pgfleet::config::Config {
    let mut cfg = config("size = 2", "");
    cfg.listen.tls_cert = Some(dir.join("server.crt").display().to_string());
    cfg.listen.tls_key = Some(dir.join("server.key").display().to_string());
    cfg.listen.tls_mode = Some(match mode {
        "require" => pgfleet::config::TlsMode::Require,
        _ => pgfleet::config::TlsMode::Prefer,
    });
    // The client-facing secret is a stored SCRAM verifier (no plaintext);
    // the server password is given separately.
    let app = cfg.users.iter_mut().find(|u| u.name == "app").unwrap();
    app.password = Some(postgres_protocol::password::scram_sha_256(b"app"));
    app.server_password = Some("app".into());
    cfg
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pgfleet-tls-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tls_require_verify_full_channel_binding_and_reload() {
    let dir = temp_dir("client");
    make_certs(&dir, "server");
    let cfg = tls_config(&dir, "require");
    assert!(cfg.users.iter().any(|u| u.name == "app" && u.password.as_deref().is_some_and(|p| p.starts_with("SCRAM-SHA-256$"))), "test setup");
    let p = start(cfg.clone()).await;
    let ca = dir.join("ca.crt").display().to_string();
    tokio::task::block_in_place(|| {
        // sslmode=require, and verify-full against our CA with SCRAM-SHA-256-PLUS.
        let (ok, out) = psql(&p, "sslmode=require", "SELECT 1");
        assert!(ok && out.trim() == "1", "{out}");
        let (ok, out) = psql(&p, &format!("sslmode=verify-full sslrootcert={ca} channel_binding=require"), "\\conninfo");
        assert!(ok, "{out}");
        assert!(out.contains("SSL connection"), "{out}");
        // Plaintext is refused with 28000.
        let (ok, out) = psql(&p, "sslmode=disable", "SELECT 1");
        assert!(!ok && out.contains("requires TLS"), "{out}");
        // A wrong password over TLS is still refused.
        let url = format!("host=127.0.0.1 port={} user=app dbname=app sslmode=require", p.addr.port());
        let out = Command::new(cluster().bindir.join("psql")).args(["-X", "-d", &url, "-c", "SELECT 1"]).env("PGPASSWORD", "nope").output().unwrap();
        assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("password authentication failed"));
    });
    // Rotate the certificate (a new CA), reload: new connections see it.
    let rotated = temp_dir("rotated");
    make_certs(&rotated, "server");
    std::fs::copy(rotated.join("server.crt"), dir.join("server.crt")).unwrap();
    std::fs::copy(rotated.join("server.key"), dir.join("server.key")).unwrap();
    let notes = p.app.apply(cfg);
    assert!(notes.is_empty(), "{notes:?}");
    let new_ca = rotated.join("ca.crt").display().to_string();
    tokio::task::block_in_place(|| {
        let (ok, out) = psql(&p, &format!("sslmode=verify-full sslrootcert={new_ca}"), "SELECT 2");
        assert!(ok && out.trim() == "2", "{out}");
        let (ok, out) = psql(&p, &format!("sslmode=verify-full sslrootcert={ca}"), "SELECT 3");
        assert!(!ok && out.contains("certificate verify failed"), "the old CA no longer matches: {out}");
    });
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&rotated);
}

fn ssl_request() -> Vec<u8> {
    [8u32.to_be_bytes(), 80877103u32.to_be_bytes()].concat()
}

/// A TLS session with pgfleet (SSLRequest, 'S', handshake) and the client's
/// local port.
async fn tls_session(p: &pgfleet::app::Running) -> (tokio_rustls::client::TlsStream<tokio::net::TcpStream>, u16) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    tcp.write_all(&ssl_request()).await.unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S");
    let tls = pgfleet::tls::ClientTls::new(pgfleet::config::ServerTlsMode::Require, None).unwrap().unwrap();
    let name = pgfleet::tls::ClientTls::server_name("127.0.0.1:0").unwrap();
    (tls.connector.connect(name, tcp).await.unwrap(), port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ssl_request_inside_tls_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = temp_dir("twice");
    make_certs(&dir, "server");
    let p = start(tls_config(&dir, "require")).await;
    let (mut s, _) = tls_session(&p).await;
    // Inside TLS, asking for TLS again is a protocol error, not an 'N'.
    s.write_all(&ssl_request()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut got)).await.expect("closed in time");
    assert_eq!(got.first(), Some(&b'E'), "{got:?}");
    let fields = pgfleet::wire::error_fields(&got);
    assert!(fields.iter().any(|(k, v)| *k == b'C' && v == "0A000"), "{fields:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tls_prefer_allows_both() {
    let dir = temp_dir("prefer");
    make_certs(&dir, "server");
    let p = start(tls_config(&dir, "prefer")).await;
    tokio::task::block_in_place(|| {
        let (ok, out) = psql(&p, "sslmode=disable", "SELECT 1");
        assert!(ok && out.trim() == "1", "{out}");
        let (ok, out) = psql(&p, "sslmode=require", "\\conninfo");
        assert!(ok && out.contains("SSL connection"), "{out}");
    });
    // tokio-postgres without TLS (plain SCRAM against the stored verifier).
    let c = connect(&p).await;
    c.simple_query("SELECT 1").await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

async fn server_ssl(p: &pgfleet::app::Running) -> String {
    let c = connect(p).await;
    let rows = c.simple_query("SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()").await.unwrap();
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_verify_full_require_and_a_wrong_ca() {
    let c = cluster();
    let mut cfg = config("size = 2", "");
    cfg.cluster.server_tls_mode = pgfleet::config::ServerTlsMode::VerifyFull;
    cfg.cluster.server_tls_ca = Some(c.ca_cert().display().to_string());
    let p = start(cfg).await;
    assert_eq!(server_ssl(&p).await, "true");

    // The monitor's connections use TLS too.
    let mut cfg = config("size = 2", &routing_extra("10s", "off"));
    cfg.cluster.server_tls_mode = pgfleet::config::ServerTlsMode::VerifyFull;
    cfg.cluster.server_tls_ca = Some(c.ca_cert().display().to_string());
    cfg.cluster.health_user = Some("md5user".into()); // only this test's monitor
    let p = start(cfg).await;
    wait_replicas_usable(&p).await;
    let ssl = tokio::task::block_in_place(|| {
        c.psql_admin(
            "SELECT string_agg(s.ssl::text, ',') FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = 'pgfleet-monitor' AND a.usename = 'md5user'",
        )
    });
    assert_eq!(ssl, "true", "the monitor's connection to the primary uses TLS");
    drop(p);

    let mut cfg = config("size = 2", "");
    cfg.cluster.server_tls_mode = pgfleet::config::ServerTlsMode::Require;
    let p = start(cfg).await;
    // Over TLS pgfleet logs in with SCRAM-SHA-256-PLUS (channel binding to
    // the server's certificate): the server checks the binding, so a wrong
    // one would fail this login.
    assert_eq!(server_ssl(&p).await, "true");

    let p = start(config("size = 2", "")).await;
    assert_eq!(server_ssl(&p).await, "false", "disable (the default) stays plaintext");

    // verify-full against a CA that did not sign the server's certificate.
    let other = temp_dir("otherca");
    make_certs(&other, "x");
    let mut cfg = config("size = 2", "");
    cfg.cluster.server_tls_mode = pgfleet::config::ServerTlsMode::VerifyFull;
    cfg.cluster.server_tls_ca = Some(other.join("ca.crt").display().to_string());
    let p = start(cfg).await;
    let e = connect_with(&conn_str(&p, "app", "app", "app")).await.unwrap_err();
    assert!(format!("{e:?}").contains("TLS handshake"), "{e:?}");
    let _ = std::fs::remove_dir_all(&other);
}

/// Whether this process still holds the socket of the TCP connection
/// between local port `local` and remote port `remote` (/proc/net/tcp:
/// a socket no descriptor refers to shows inode 0, or is gone).
fn socket_held(local: u16, remote: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).unwrap();
        port(f[1]) == local && port(f[2]) == remote && f[9] != "0"
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_pgfleet_closed_is_released_though_the_client_stays() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = temp_dir("linger");
    make_certs(&dir, "server");
    let p = start(tls_config(&dir, "require")).await;
    let (mut s, client_port) = tls_session(&p).await;
    // A startup packet pgfleet refuses (too long), then silence: the client
    // neither reads on nor closes.
    s.write_all(&20000u32.to_be_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut got)).await.expect("answered in time");
    assert!(pgfleet::wire::error_fields(&got).iter().any(|(k, v)| *k == b'C' && v == "08P01"), "{got:?}");
    let port = p.addr.port();
    let mut released = false;
    for _ in 0..100 {
        if !socket_held(port, client_port) {
            released = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(released, "pgfleet still holds the socket of a connection it refused");
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}
