//! The admin console: the virtual database `pgfleet` (alias `pgbouncer`)
//! for users in `admin.users`, over the simple query protocol. SHOW output
//! follows PgBouncer's column names, order and types (so pgbouncer_exporter
//! and dashboards work unchanged); SHOW REPLICAS / GROUPS / WORKLOADS are
//! pgfleet's own. Commands: RELOAD, PAUSE [db], RESUME [db], KILL db, SHUTDOWN.

pub mod http;
mod show;

use crate::app::App;
use crate::frontend::startup::Login;
use crate::wire::{self, build, sqlstate};
use bytes::BytesMut;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use crate::net::Stream;

pub fn is_admin_database(db: &str) -> bool {
    db == "pgfleet" || db == "pgbouncer"
}

/// Type OIDs used in RowDescriptions (values are text, as PgBouncer sends).
pub(crate) const TEXT: u32 = 25;
pub(crate) const INT4: u32 = 23;
pub(crate) const NUMERIC: u32 = 1700;

/// A result set being built.
pub(crate) struct Table {
    pub cols: Vec<(&'static str, u32)>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl Table {
    pub fn new(cols: &[(&'static str, u32)]) -> Table {
        Table { cols: cols.to_vec(), rows: Vec::new() }
    }

    pub fn row(&mut self, values: Vec<Option<String>>) {
        debug_assert_eq!(values.len(), self.cols.len());
        self.rows.push(values);
    }

    fn write(&self, out: &mut BytesMut, tag: &str) {
        build::row_description_typed(out, &self.cols);
        for r in &self.rows {
            let vals: Vec<Option<&str>> = r.iter().map(|v| v.as_deref()).collect();
            build::data_row(out, &vals);
        }
        build::command_complete(out, tag);
    }
}

/// Serves one admin console session until the client leaves.
/// `buf` holds what the client sent after its login (pipelined commands).
pub async fn serve(app: Arc<App>, mut stream: Stream, login: Login, mut buf: BytesMut) {
    let mut out = BytesMut::new();
    for (k, v) in [
        ("server_version", "15.0"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ] {
        build::parameter_status(&mut out, k, v);
    }
    build::backend_key_data(&mut out, rand::random::<i32>() & 0x7fff_ffff, rand::random());
    build::ready_for_query(&mut out, b'I');
    if stream.write_all(&out).await.is_err() {
        return;
    }
    tracing::info!(user = %login.user, "admin console session");
    let mut shutdown = app.shutdown_signal();
    loop {
        // A console open during shutdown (or the one that sent SHUTDOWN)
        // is closed like any idle client, not waited for.
        let next = tokio::select! {
            m = read_message(&mut stream, &mut buf) => m,
            _ = shutdown.wait_for(|s| *s) => None,
        };
        let (tag, msg) = match next {
            Some(m) => m,
            None if *shutdown.borrow() => {
                out.clear();
                build::error_response(&mut out, "FATAL", sqlstate::ADMIN_SHUTDOWN, "pgfleet is shutting down");
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await;
                return;
            }
            None => return,
        };
        out.clear();
        // A reload may have taken the console away from this user.
        let cfg = app.config();
        if tag != b'X' && (!cfg.admin.users.contains(&login.user) || cfg.user(&login.user).is_none()) {
            let m = format!("user \"{}\" may no longer use the admin console (configuration reloaded)", login.user);
            build::error_response(&mut out, "FATAL", sqlstate::INVALID_AUTHORIZATION, &m);
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await;
            return;
        }
        drop(cfg);
        match tag {
            b'X' => return,
            b'Q' => {
                let Ok(sql) = wire::Reader::new(wire::body(&msg)).cstr_utf8().map(str::to_string) else {
                    build::error_response(&mut out, "ERROR", sqlstate::CHARACTER_NOT_IN_REPERTOIRE, "invalid byte sequence for encoding \"UTF8\"");
                    build::ready_for_query(&mut out, b'I');
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                    continue;
                };
                for cmd in sql.split(';').map(str::trim).filter(|c| !c.is_empty()) {
                    if let Err((code, m)) = run(&app, cmd, &mut out).await {
                        build::error_response(&mut out, "ERROR", code, &m);
                        break;
                    }
                }
                if sql.trim().trim_matches(';').is_empty() {
                    out.extend_from_slice(b"I\0\0\0\x04"); // EmptyQueryResponse
                }
                build::ready_for_query(&mut out, b'I');
            }
            _ => {
                build::error_response(&mut out, "FATAL", sqlstate::PROTOCOL_VIOLATION, "the admin console supports only the simple query protocol");
                let _ = stream.write_all(&out).await;
                return;
            }
        }
        if stream.write_all(&out).await.is_err() {
            return;
        }
    }
}

async fn read_message(stream: &mut Stream, buf: &mut BytesMut) -> Option<(u8, bytes::Bytes)> {
    loop {
        match wire::split_message(buf, 1 << 20) {
            Ok(Some(m)) => return Some(m),
            Ok(None) => {}
            Err(_) => return None,
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

type CmdResult = Result<(), (&'static str, String)>;

async fn run(app: &Arc<App>, cmd: &str, out: &mut BytesMut) -> CmdResult {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let arg = words.get(1).map(|s| s.trim_matches('"'));
    let command = upper.first().map(String::as_str);
    // A database named must be one pgfleet has (3D000, as PgBouncer).
    if let (Some("PAUSE" | "RESUME" | "KILL"), Some(db)) = (command, arg) {
        known_database(app, db)?;
    }
    match command {
        Some("SHOW") => {
            let what = upper.get(1).map(String::as_str).unwrap_or("");
            let table = show::table(app, what).ok_or((sqlstate::SYNTAX_ERROR, format!("unknown SHOW item: {}", words.get(1).unwrap_or(&""))))?;
            table.write(out, "SHOW");
        }
        Some("RELOAD") => {
            let notes = app.reload().map_err(|e| (sqlstate::CONFIG_FILE_ERROR, e))?;
            for n in notes {
                build::notice_response(out, "01000", &n);
            }
            build::command_complete(out, "RELOAD");
        }
        Some("PAUSE") => {
            app.pause(arg);
            let busy = wait_idle(app, arg).await;
            if busy > 0 {
                // Still paused: new transactions keep waiting.
                return Err((
                    sqlstate::LOCK_NOT_AVAILABLE,
                    format!("PAUSE timed out: {busy} server connection(s) still in use after {} s (pinned clients, session mode, long transactions); the database stays paused: PAUSE again to keep waiting, or RESUME", PAUSE_WAIT.as_secs()),
                ));
            }
            build::command_complete(out, "PAUSE");
        }
        Some("RESUME") => {
            app.resume(arg).map_err(|e| (sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE, e))?;
            build::command_complete(out, "RESUME");
        }
        Some("KILL") => {
            let db = arg.ok_or((sqlstate::SYNTAX_ERROR, "KILL needs a database name".to_string()))?;
            kill(app, db);
            build::command_complete(out, "KILL");
        }
        Some("SHUTDOWN") => {
            tracing::warn!("SHUTDOWN from the admin console");
            app.begin_shutdown();
            build::command_complete(out, "SHUTDOWN");
        }
        Some("SET") => build::command_complete(out, "SET"),
        _ => return Err((sqlstate::SYNTAX_ERROR, format!("unknown admin command: {cmd}"))),
    }
    Ok(())
}

/// How long PAUSE waits for the database's server connections to go idle.
const PAUSE_WAIT: Duration = Duration::from_secs(30);

/// A database the admin commands can name: a `[[databases]]` entry.
fn known_database(app: &App, db: &str) -> CmdResult {
    match app.config().database(db) {
        Some(_) => Ok(()),
        None => Err((sqlstate::INVALID_CATALOG_NAME, format!("no such database: {db}"))),
    }
}

/// Waits (up to PAUSE_WAIT, or until shutdown) until no server connection
/// of the database is in use; returns how many still are.
async fn wait_idle(app: &App, db: Option<&str>) -> usize {
    let deadline = tokio::time::Instant::now() + PAUSE_WAIT;
    let shutdown = app.shutdown_signal();
    loop {
        let busy: usize = app
            .pools()
            .iter()
            .filter(|p| db.is_none_or(|d| p.key.database == d))
            .map(|p| {
                let s = p.stats();
                s.total - s.idle
            })
            .sum();
        if busy == 0 || tokio::time::Instant::now() >= deadline || *shutdown.borrow() {
            return busy;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// KILL: drop every client and idle server connection of a database, and
/// pause it, as PgBouncer does: clients that come back wait for RESUME
/// (the maintenance a KILL makes room for is not raced by reconnects).
fn kill(app: &App, db: &str) {
    app.pause(Some(db));
    let clients: Vec<_> = app.conns.clients.lock().unwrap().values().filter(|c| c.database == db).cloned().collect();
    for c in clients {
        c.signal.raise(crate::stats::KILL);
    }
    for p in app.pools().iter().filter(|p| p.key.database == db) {
        p.close_all("KILL from the admin console");
    }
}
