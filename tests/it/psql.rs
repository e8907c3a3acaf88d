//! psql through pgfleet, including \copy in both directions.

use crate::harness::*;

fn psql(p: &pgfleet::app::Running, args: &[&str]) -> String {
    let dsn = format!("host=127.0.0.1 port={} user=app dbname=app", p.addr.port());
    let mut all = vec!["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", &dsn];
    all.extend_from_slice(args);
    let out = run_client("psql", &all, "app");
    assert!(out.status.success(), "psql {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_queries_and_copy_both_ways() {
    let p = proxy(2).await;
    tokio::task::block_in_place(|| {
        assert_eq!(psql(&p, &["-c", "SELECT 40 + 2"]), "42");
        psql(&p, &["-c", "DROP TABLE IF EXISTS copy_t", "-c", "CREATE TABLE copy_t (id int, name text)"]);
        let dir = std::env::temp_dir().join(format!("pgfleet-copy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("in.csv");
        let rows: String = (0..5000).map(|i| format!("{i},name {i}\n")).collect();
        std::fs::write(&input, &rows).unwrap();
        psql(&p, &["-c", &format!("\\copy copy_t FROM '{}' WITH (FORMAT csv)", input.display())]);
        assert_eq!(psql(&p, &["-c", "SELECT count(*), sum(id) FROM copy_t"]), "5000|12497500");
        let output = dir.join("out.csv");
        psql(&p, &["-c", &format!("\\copy (SELECT * FROM copy_t ORDER BY id) TO '{}' WITH (FORMAT csv)", output.display())]);
        assert_eq!(std::fs::read_to_string(&output).unwrap(), rows);
        // A failing COPY leaves the session usable.
        std::fs::write(&input, "1,a\nnot-a-number,b\n").unwrap();
        let dsn = format!("host=127.0.0.1 port={} user=app dbname=app", p.addr.port());
        let copy_cmd = format!("\\copy copy_t FROM '{}' WITH (FORMAT csv)", input.display());
        let out = run_client("psql", &["-X", "-A", "-t", "-d", &dsn, "-c", &copy_cmd, "-c", "SELECT count(*) FROM copy_t"], "app");
        assert!(String::from_utf8_lossy(&out.stderr).contains("invalid input syntax"));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5000");
        std::fs::remove_dir_all(&dir).unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_connect_over_the_unix_socket() {
    let dir = std::env::temp_dir().join(format!("pgfleet-unix-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    make_certs(&dir, "server");
    let mut cfg = config("size = 2", "");
    cfg.listen.unix_socket_dir = Some(dir.display().to_string());
    cfg.listen.unix_socket_mode = "0770".into();
    // TLS required on TCP; a Unix socket is local and exempt, as with PgBouncer.
    cfg.listen.tls_cert = Some(dir.join("server.crt").display().to_string());
    cfg.listen.tls_key = Some(dir.join("server.key").display().to_string());
    cfg.listen.tls_mode = Some(pgfleet::config::TlsMode::Require);
    // A stale socket file (a crashed pgfleet's, on the port pgfleet will
    // use) is replaced.
    let port = free_port();
    let stale = std::os::unix::net::UnixListener::bind(dir.join(format!(".s.PGSQL.{port}"))).unwrap();
    drop(stale);
    let listener = pgfleet::app::bind_reuseport(&format!("127.0.0.1:{port}")).unwrap();
    let p = pgfleet::app::start(cfg.clone(), listener).unwrap();
    let path = p.unix_socket.clone().unwrap();
    assert_eq!(path, dir.join(format!(".s.PGSQL.{}", p.addr.port())));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o770);
    let port = p.addr.port().to_string();
    let socket_dsn = format!("host={} port={port} user=app dbname=app", dir.display());
    tokio::task::block_in_place(|| {
        let out = run_client("psql", &["-X", "-A", "-t", "-d", &socket_dsn, "-c", "SELECT 'via unix'"], "app");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "via unix", "{}", String::from_utf8_lossy(&out.stderr));
        let out = run_client("psql", &["-X", "-A", "-t", "-d", &format!("host=127.0.0.1 port={port} user=app dbname=app sslmode=disable"), "-c", "SELECT 1"], "app");
        assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("requires TLS"));
        // Wrong password over the socket: 28P01 as over TCP.
        let out = run_client("psql", &["-X", "-A", "-t", "-d", &socket_dsn, "-c", "SELECT 1"], "wrong");
        assert!(String::from_utf8_lossy(&out.stderr).contains("password authentication failed"), "{}", String::from_utf8_lossy(&out.stderr));
    });
    // tokio-postgres over the socket, listed as "unix" in SHOW CLIENTS.
    let (c, conn) = tokio_postgres::connect(&format!("{socket_dsn} password=app"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    assert_eq!(c.query_one("SELECT 40 + 2", &[]).await.unwrap().get::<_, i32>(0), 42);
    let admin = connect_with(&format!("host={} port={port} user=admin password=admin dbname=pgfleet", dir.display())).await.unwrap();
    let rows = admin.simple_query("SHOW CLIENTS").await.unwrap();
    let addrs: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get("addr").unwrap_or("").to_string()),
            _ => None,
        })
        .collect();
    assert!(addrs.iter().any(|a| a == "unix"), "{addrs:?}");
    drop(admin);
    drop(c);
    // Stopping removes the socket file.
    p.shutdown(std::time::Duration::from_secs(2)).await;
    for _ in 0..100 {
        if !path.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!path.exists(), "socket file removed at shutdown");
    let _ = std::fs::remove_dir_all(&dir);
}
