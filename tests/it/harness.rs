//! Test harness: one real PostgreSQL cluster (primary + two streaming
//! replicas) per test binary, started on free ports in a temp dir as the
//! `postgres` OS user when running as root, and stopped by a watchdog when
//! the test process exits. pgfleet runs in-process on port 0.

use bytes::BytesMut;
use pgfleet::app::Running;
use pgfleet::config::Config;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Cluster {
    pub dir: PathBuf,
    pub bindir: PathBuf,
    pub primary: u16,
    pub replicas: Vec<u16>,
    /// A private cluster (one test's, stopped and removed when dropped).
    private: bool,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// The shared cluster: primary + 2 replicas, never changed in role.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| Cluster::start("shared", 2, false))
}

/// A cluster of the test's own, for tests that stop, kill or promote
/// servers; blocking (call from spawn_blocking in async tests).
#[allow(dead_code)]
pub fn private_cluster(tag: &str, replicas: usize) -> Cluster {
    Cluster::start(tag, replicas, true)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.private {
            return;
        }
        for name in self.names() {
            let _ = self.pg_ctl(&name, &["stop", "-m", "immediate"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("run id");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// A command run as the postgres OS user when we are root.
fn pg_cmd(prog: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(prog);
        c
    } else {
        Command::new(prog)
    }
}

fn check(out: Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Cluster {
    fn start(tag: &str, n: usize, private: bool) -> Cluster {
        let out = Command::new("pg_config").arg("--bindir").output().expect("pg_config (install postgresql)");
        let bindir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let dir = std::env::temp_dir().join(format!("pgfleet-it-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            check(Command::new("chown").args(["postgres:postgres"]).arg(&dir).output().unwrap(), "chown");
        }
        let c = Cluster { primary: free_port(), replicas: (0..n).map(|_| free_port()).collect(), bindir, dir, private };
        c.spawn_watchdog();
        c.init_primary();
        for (i, port) in c.replicas.iter().enumerate() {
            c.init_replica(i, *port);
        }
        c.wait_replicas_streaming();
        c
    }

    fn names(&self) -> Vec<String> {
        std::iter::once("primary".to_string()).chain((0..self.replicas.len()).map(|i| format!("replica{i}"))).collect()
    }

    pub fn data(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Stops the servers and removes the temp dir once this process is gone.
    fn spawn_watchdog(&self) {
        let pg_ctl = self.bindir.join("pg_ctl");
        let runas = if is_root() { "runuser -u postgres -- " } else { "" };
        let mut stops = String::new();
        for d in self.names() {
            stops.push_str(&format!(
                "{runas}{} stop -D {} -m immediate >/dev/null 2>&1; ",
                pg_ctl.display(),
                self.data(&d).display()
            ));
        }
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stops} rm -rf {dir}",
            pid = std::process::id(),
            dir = self.dir.display()
        );
        // Outlives this process on purpose: it stops the servers after us.
        #[allow(clippy::zombie_processes)]
        Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn watchdog");
    }

    pub fn pg_ctl_start(&self, name: &str) {
        let out = pg_cmd(&self.bindir.join("pg_ctl"))
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(self.data(name))
            .arg("-l")
            .arg(self.dir.join(format!("{name}.log")))
            .output()
            .unwrap();
        check(out, &format!("pg_ctl start {name}"));
    }

    #[allow(dead_code)]
    pub fn pg_ctl(&self, name: &str, args: &[&str]) -> Output {
        pg_cmd(&self.bindir.join("pg_ctl")).args(args).arg("-D").arg(self.data(name)).output().unwrap()
    }

    /// The test CA's certificate (it signed the servers' certificate, for
    /// 127.0.0.1 and localhost).
    #[allow(dead_code)]
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("tls").join("ca.crt")
    }

    fn init_primary(&self) {
        let tls = self.dir.join("tls");
        make_certs(&tls, "server");
        if is_root() {
            check(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&tls).output().unwrap(), "chown tls");
        }
        let data = self.data("primary");
        let out = pg_cmd(&self.bindir.join("initdb"))
            .args(["-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        check(out, "initdb");
        let conf = format!(
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = replica\nmax_wal_senders = 10\nhot_standby = on\nmax_connections = 400\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nshared_buffers = 64MB\n\
             wal_keep_size = '256MB'\nssl = on\nssl_cert_file = '{tls}/server.crt'\nssl_key_file = '{tls}/server.key'\n",
            self.primary,
            self.dir.display(),
            tls = tls.display()
        );
        append(&data.join("postgresql.conf"), &conf);
        let hba = "local all all trust\nhost all postgres 127.0.0.1/32 trust\n\
                   host replication all 127.0.0.1/32 trust\nhost all md5user 127.0.0.1/32 md5\nhost all all 127.0.0.1/32 scram-sha-256\n";
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        self.pg_ctl_start("primary");
        for sql in [
            "CREATE ROLE app LOGIN PASSWORD 'app'",
            "CREATE DATABASE app OWNER app",
            "SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD 'md5pw'",
            "GRANT CONNECT ON DATABASE app TO md5user",
            "CREATE ROLE bench LOGIN PASSWORD 'bench'",
            "CREATE DATABASE bench OWNER bench",
        ] {
            self.psql_admin(sql);
        }
    }

    fn init_replica(&self, i: usize, port: u16) {
        let name = format!("replica{i}");
        let data = self.data(&name);
        let out = pg_cmd(&self.bindir.join("pg_basebackup"))
            .args(["-h", "127.0.0.1", "-U", "postgres", "-X", "stream", "-R", "--checkpoint=fast", "-p"])
            .arg(self.primary.to_string())
            .arg("-D")
            .arg(&data)
            .output()
            .unwrap();
        check(out, "pg_basebackup");
        append(&data.join("postgresql.auto.conf"), &format!("port = {port}\n"));
        self.pg_ctl_start(&name);
    }

    fn wait_replicas_streaming(&self) {
        for _ in 0..200 {
            let n = self.psql_admin("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'");
            if n == self.replicas.len().to_string() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("replicas did not start streaming");
    }

    /// Runs SQL on the primary as the superuser (unix socket, trust).
    pub fn psql_admin(&self, sql: &str) -> String {
        self.psql_on(self.primary, "postgres", sql)
    }

    pub fn psql_on(&self, port: u16, db: &str, sql: &str) -> String {
        let out = Command::new(self.bindir.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-h"])
            .arg(&self.dir)
            .arg("-p")
            .arg(port.to_string())
            .arg("-d")
            .arg(db)
            .arg("-c")
            .arg(sql)
            .output()
            .unwrap();
        check(out.clone(), &format!("psql {sql}"));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn server_conns_where(&self, cond: &str) -> usize {
        self.psql_admin(&format!("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND {cond}"))
            .parse()
            .unwrap()
    }
}

/// A fresh CA in `dir` (ca.crt, ca.key) and a certificate it signed for
/// 127.0.0.1/localhost (`<name>.crt`, `<name>.key`), with openssl.
pub fn make_certs(dir: &Path, name: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
        check(out, &format!("openssl {args:?}"));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509", "-days", "3", "-keyout", "ca.key", "-out", "ca.crt", "-subj"];
    let subject = format!("/CN=pgfleet test CA {}", dir.file_name().unwrap().to_string_lossy());
    ca.push(&subject);
    ca.extend_from_slice(&ec);
    openssl(&ca);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n").unwrap();
    let (key, csr, crt) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"));
    let mut req = vec!["req", "-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"];
    req.extend_from_slice(&ec);
    openssl(&req);
    openssl(&["x509", "-req", "-in", &csr, "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "3", "-out", &crt, "-extfile", "ext.cnf"]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join(&key), std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// A pgfleet config for the test cluster; `extra` is appended TOML
/// (tables only) and `pool` replaces the [pool] table body.
pub fn config(pool: &str, extra: &str) -> Config {
    config_for(cluster(), pool, extra)
}

/// `config` for another cluster (a private one).
pub fn config_for(c: &Cluster, pool: &str, extra: &str) -> Config {
    let text = format!(
        r#"
[listen]
addr = "127.0.0.1:0"
max_message_size = "1MB"
[admin]
users = ["admin"]
[pool]
{pool}
[[users]]
name = "app"
password = "app"
[[users]]
name = "md5user"
password = "md5pw"
[[users]]
name = "bench"
password = "bench"
[[users]]
name = "admin"
password = "admin"
[[databases]]
name = "app"
[[databases]]
name = "bench"
[[databases]]
name = "alias"
dbname = "app"
[cluster]
primary = "127.0.0.1:{primary}"
{extra}
"#,
        primary = c.primary
    );
    Config::parse(&text, "test.toml").unwrap()
}

pub async fn start(cfg: Config) -> Running {
    let listener = pgfleet::app::bind_reuseport("127.0.0.1:0").unwrap();
    pgfleet::app::start(cfg, listener).unwrap()
}

pub async fn proxy(pool_size: usize) -> Running {
    start(config(&format!("size = {pool_size}"), "")).await
}

pub fn conn_str(p: &Running, user: &str, password: &str, db: &str) -> String {
    format!("host=127.0.0.1 port={} user={user} password={password} dbname={db}", p.addr.port())
}

pub async fn connect(p: &Running) -> tokio_postgres::Client {
    connect_with(&conn_str(p, "app", "app", "app")).await.unwrap()
}

pub async fn connect_with(s: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(s, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A client that speaks raw protocol bytes after a normal login.
pub struct RawClient {
    pub stream: TcpStream,
    pub buf: BytesMut,
}

impl RawClient {
    pub async fn login(p: &Running, user: &str, password: &str) -> RawClient {
        let mut out = BytesMut::new();
        pgfleet::wire::startup::startup_message(&mut out, &[("user", user), ("database", "app")]);
        Self::login_with(p, &out, password).await.0
    }

    /// Logs in with this startup packet; also returns every message the
    /// login got that was not part of the SCRAM exchange.
    pub async fn login_with(
        p: &Running,
        startup: &[u8],
        password: &str,
    ) -> (RawClient, Vec<(u8, bytes::Bytes)>) {
        Self::login_pipelining(p, startup, password, &[]).await
    }

    /// `login_with`, sending `after` in one write with the final SCRAM
    /// message, as a client pipelining its first statements.
    pub async fn login_pipelining(
        p: &Running,
        startup: &[u8],
        password: &str,
        after: &[u8],
    ) -> (RawClient, Vec<(u8, bytes::Bytes)>) {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        use postgres_protocol::message::frontend;
        let mut stream = TcpStream::connect(p.addr).await.unwrap();
        let mut out = BytesMut::new();
        let mut seen = Vec::new();
        stream.write_all(startup).await.unwrap();
        let mut rc = RawClient { stream, buf: BytesMut::new() };
        let mut scram = None;
        loop {
            let (tag, msg) = rc.next().await.expect("login message");
            match tag {
                b'R' => {
                    let code = i32::from_be_bytes(msg[5..9].try_into().unwrap());
                    let data = &msg[9..];
                    out.clear();
                    match code {
                        10 => {
                            let s = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                            frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out).unwrap();
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().unwrap();
                            s.update(data).unwrap();
                            frontend::sasl_response(s.message(), &mut out).unwrap();
                            out.extend_from_slice(after);
                        }
                        _ => {}
                    }
                    if !out.is_empty() {
                        rc.stream.write_all(&out).await.unwrap();
                    }
                }
                b'E' => panic!("login failed: {:?}", pgfleet::wire::error_fields(&msg)),
                b'Z' => return (rc, seen),
                _ => seen.push((tag, msg)),
            }
        }
    }

    /// Next whole server message; `None` at EOF.
    pub async fn next(&mut self) -> Option<(u8, bytes::Bytes)> {
        loop {
            if let Some(m) = pgfleet::wire::split_message(&mut self.buf, 1 << 30).unwrap() {
                return Some(m);
            }
            let n = tokio::time::timeout(Duration::from_secs(20), self.stream.read_buf(&mut self.buf))
                .await
                .expect("server answered in time")
                .ok()?;
            if n == 0 {
                return None;
            }
        }
    }

    /// Reads until an ErrorResponse and returns its SQLSTATE.
    pub async fn error_code(&mut self) -> Option<String> {
        while let Some((tag, msg)) = self.next().await {
            if tag == b'E' {
                return pgfleet::wire::error_fields(&msg).into_iter().find(|(c, _)| *c == b'C').map(|(_, v)| v);
            }
        }
        None
    }
}

/// Runs a client program (psql, pgbench) with PGPASSWORD set.
pub fn run_client(prog: &str, args: &[&str], password: &str) -> Output {
    let bin = cluster().bindir.join(prog);
    Command::new(bin).args(args).env("PGPASSWORD", password).output().unwrap()
}

pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_else(|| format!("no sqlstate: {e}"))
}

/// Tests that pause or stop replicas take this for writing; tests that
/// assert which replica served them take it for reading.
pub static REPLICAS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Cluster section for routing tests: r1 in default+chat, r2 in analytics.
pub fn routing_extra(default_max_lag: &str, ryw: &str) -> String {
    let c = cluster();
    format!(
        r#"lag_check_interval = "100ms"
[[cluster.replicas]]
name = "r1"
addr = "127.0.0.1:{r1}"
groups = ["default", "chat"]
[[cluster.replicas]]
name = "r2"
addr = "127.0.0.1:{r2}"
groups = ["analytics"]
[[cluster.groups]]
name = "default"
max_lag = "{default_max_lag}"
max_lag_bytes = "64MB"
fallback = ["primary"]
[[cluster.groups]]
name = "chat"
max_lag = "5s"
fallback = ["default", "primary"]
[[cluster.groups]]
name = "analytics"
max_lag = "30s"
fallback = ["error"]
[routing]
default_workload = "default"
read_your_writes = "{ryw}"
[[routing.rules]]
application_name = "metabase*"
workload = "analytics"
"#,
        r1 = c.replicas[0],
        r2 = c.replicas[1]
    )
}

/// A proxy in front of the primary and both replicas; waits until the
/// monitor has seen every replica usable.
pub async fn routing_proxy(pool: &str, default_max_lag: &str, ryw: &str) -> Running {
    let p = start(config(pool, &routing_extra(default_max_lag, ryw))).await;
    wait_replicas_usable(&p).await;
    p
}

pub async fn wait_replicas_usable(p: &Running) {
    for _ in 0..200 {
        let s = p.app.topology().snapshot();
        // Reads that call functions wait for the function catalog too.
        let catalog = p.app.catalogs.is_loaded("app") || p.app.config().routing.function_catalog_refresh.0.is_zero();
        if catalog && s.replicas.iter().all(|r| r.groups.iter().all(|(_, ok)| *ok)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("replicas never became usable: {:?}", p.app.topology().snapshot());
}

/// The port of the server that answered `sql` (which must return it as text).
pub async fn port_of(c: &tokio_postgres::Client, sql: &str) -> u16 {
    let rows = c.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

/// Runs `f` while sampling (every 100 ms) how many client backends of the
/// shared cluster match `cond`; returns `f`'s output and the peak.
#[allow(dead_code)]
pub async fn max_server_conns_during<T>(cond: &str, f: impl std::future::Future<Output = T>) -> (T, usize) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let max = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, max, cond) = (stop.clone(), max.clone(), cond.to_string());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                max.fetch_max(cluster().server_conns_where(&cond), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let out = f.await;
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    (out, max.load(Ordering::Relaxed))
}

/// Waits (up to 10 s) until the shared cluster runs a statement containing
/// `marker` (e.g. a comment in it): a cancel sent before that has nothing
/// to cancel yet.
pub async fn wait_running(marker: &str) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%{marker}%' AND pid <> pg_backend_pid()"
    );
    for _ in 0..200 {
        if tokio::task::block_in_place(|| cluster().psql_admin(&sql)) != "0" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no running statement contains {marker:?}");
}

/// A TCP forwarder to `port`: another address for the same server. Counts
/// the connections it carried.
pub async fn forwarder(port: u16) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fwd = l.local_addr().unwrap().port();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = count.clone();
    tokio::spawn(async move {
        while let Ok((mut a, _)) = l.accept().await {
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                if let Ok(mut b) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
        }
    });
    (fwd, count)
}

/// A TCP forwarder to `port` that passes no byte, either way, while the
/// flag is set: a blackholed server (connections open, nothing answers).
/// Bytes held while frozen pass once it is cleared.
#[allow(dead_code)]
pub async fn freezing_forwarder(port: u16) -> (u16, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fwd = l.local_addr().unwrap().port();
    let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = frozen.clone();
    tokio::spawn(async move {
        while let Ok((a, _)) = l.accept().await {
            let flag = flag.clone();
            tokio::spawn(async move {
                let Ok(b) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return };
                let ((ar, aw), (br, bw)) = (a.into_split(), b.into_split());
                tokio::join!(pump(ar, bw, &flag), pump(br, aw, &flag));
            });
        }
    });
    (fwd, frozen)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: &std::sync::atomic::AtomicBool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A TCP forwarder to `port` that can be switched off (`send(true)`): its
/// connections are cut and new ones closed at once, as a server that went
/// down; `send(false)` brings it back.
#[allow(dead_code)]
pub async fn switch_forwarder(port: u16) -> (u16, tokio::sync::watch::Sender<bool>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fwd = l.local_addr().unwrap().port();
    let (down_tx, down) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut a, _)) = l.accept().await {
            let mut down = down.clone();
            if *down.borrow_and_update() {
                continue; // dropped: closed at once
            }
            tokio::spawn(async move {
                let Ok(mut b) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                    _ = down.wait_for(|d| *d) => {}
                }
            });
        }
    });
    (fwd, down_tx)
}
