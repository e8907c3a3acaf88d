//! Drivers that prepare statements implicitly, through transaction mode
//! with a pool of 2: psycopg 3 (prepare_threshold=0), asyncpg and
//! node-postgres named queries. The drivers are installed on first use into
//! target/drivers (a venv and an npm prefix).

use crate::harness::*;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

fn drivers_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/drivers");
        std::fs::create_dir_all(&dir).unwrap();
        let py = dir.join("venv/bin/python");
        if !py.exists() {
            run(Command::new("python3").args(["-m", "venv"]).arg(dir.join("venv")));
        }
        let check = Command::new(&py).args(["-c", "import psycopg, asyncpg"]).output().unwrap();
        if !check.status.success() {
            run(Command::new(&py).args(["-m", "pip", "install", "-q", "psycopg[binary]>=3.1,<4", "asyncpg>=0.29"]));
        }
        if !dir.join("node/node_modules/pg").exists() {
            run(Command::new("npm").args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"]).arg(dir.join("node")).arg("pg@8"));
        }
        dir
    })
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers").join(name)
}

fn check(out: std::process::Output, what: &str) {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed:\n{text}");
    assert!(text.contains(&format!("{what} ok")), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_asyncpg_and_node_postgres_in_transaction_mode() {
    let dir = drivers_dir().clone();
    let p = proxy(2).await;
    let port = p.addr.port();
    let dsn = format!("host=127.0.0.1 port={port} user=app password=app dbname=app");
    let url = format!("postgresql://app:app@127.0.0.1:{port}/app");
    tokio::task::block_in_place(|| {
        let py = dir.join("venv/bin/python");
        check(Command::new(&py).arg(script("psycopg_test.py")).arg(&dsn).output().unwrap(), "psycopg");
        check(Command::new(&py).arg(script("asyncpg_test.py")).arg(&url).output().unwrap(), "asyncpg");
        check(
            Command::new("node").arg(script("node_pg_test.js")).arg(&url).env("NODE_PATH", dir.join("node/node_modules")).output().unwrap(),
            "node-postgres",
        );
    });
    assert!(p.app.pools()[0].stats().total <= 2);
    // The drivers' statements really went through pgfleet's statement sharing.
    assert!(p.app.stmts.len() >= 10, "only {} proxy statements", p.app.stmts.len());
}
