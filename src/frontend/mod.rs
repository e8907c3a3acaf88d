//! Client side: the accept loop, per-client admission (`max_client_conn`,
//! startup timeout), startup/authentication, and the hand-off to the relay.

pub mod cancel;
pub mod lockout;
pub mod startup;

use crate::app::App;
use crate::relay::{ClientId, Session, Settings, REPORTED_SETTABLE};
use crate::router::route::Target;
use crate::stats::{ClientInfo, Listed};
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8};
use crate::wire::{build, sqlstate, startup::parse_options};
use bytes::BytesMut;
use startup::{Login, StartupError};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixListener};
use tracing::Instrument;

/// Where clients connect: the TCP listener, or the Unix-domain socket
/// (`listen.unix_socket_dir`; `local` is the TCP listener's address).
pub enum Listener {
    Tcp(TcpListener),
    Unix { listener: UnixListener, local: SocketAddr },
}

impl Listener {
    /// The next client and its address. Unix clients have none: theirs is
    /// the unspecified address (shown as "unix"; exempt from the
    /// failed-login limit, which is per address).
    async fn accept(&self) -> std::io::Result<(crate::net::Stream, SocketAddr)> {
        match self {
            Listener::Tcp(l) => l.accept().await.map(|(s, peer)| (crate::net::Stream::Tcp(s), peer)),
            Listener::Unix { listener, local } => listener.accept().await.map(|(s, _)| {
                let peer = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), local.port());
                (crate::net::Stream::Unix { inner: s, local: *local }, peer)
            }),
        }
    }
}

/// A client's address in logs: `ip:port`, or "unix".
struct Peer(SocketAddr);

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.ip().is_unspecified() {
            f.write_str("unix")
        } else {
            self.0.fmt(f)
        }
    }
}

/// Accepts clients until shutdown is signalled.
pub async fn accept_loop(app: Arc<App>, listener: Listener) {
    let mut shutdown = app.shutdown_signal();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let app = app.clone();
                    let span = tracing::info_span!("client", peer = %Peer(peer), user = tracing::field::Empty, database = tracing::field::Empty, workload = tracing::field::Empty);
                    tokio::spawn(handle_client(app, stream, peer).instrument(span));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
    tracing::info!("stopped accepting new clients");
}

async fn fatal(stream: &mut (impl tokio::io::AsyncWrite + Unpin), code: &str, message: &str) {
    let mut out = BytesMut::new();
    build::error_response(&mut out, "FATAL", code, message);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), stream.write_all(&out)).await;
}

async fn handle_client(app: Arc<App>, mut stream: crate::net::Stream, peer: SocketAddr) {
    if let crate::net::Stream::Tcp(tcp) = &stream {
        let _ = tcp.set_nodelay(true);
        let l = &app.config().listen;
        if let Some(idle) = l.tcp_keepalive.enabled() {
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(l.tcp_keepalive_interval.0)
                .with_retries(l.tcp_keepalive_count);
            let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive);
        }
    }
    // max_client_conn and the failed-login lockout are checked once the
    // startup packet is read (`startup::handshake`): a CancelRequest is
    // exempt from both, as on PostgreSQL. This only bounds how many
    // connections may be in their startup phase beyond the limit.
    let Some(mut guard) = app.admit_client() else {
        fatal(&mut stream, sqlstate::TOO_MANY_CONNECTIONS, startup::TOO_MANY_CLIENTS).await;
        return;
    };
    // Startup, password and SASL messages are small: one allocation.
    let mut buf = BytesMut::with_capacity(256);
    // "0s" is off, as for every timeout (durations are capped at a year).
    let limit = app.config().timeouts.startup.enabled().unwrap_or(std::time::Duration::from_secs(365 * 86_400));
    let deadline = tokio::time::Instant::now() + limit;
    // TLS over TCP only (libpq never asks for it on a Unix socket).
    let tls = app.tls().filter(|_| !stream.is_unix());
    let wants_tls = match tokio::time::timeout_at(deadline, startup::negotiate(&mut stream, &mut buf, tls.is_some())).await {
        Err(_) => {
            fatal(&mut stream, sqlstate::PROTOCOL_VIOLATION, "startup did not complete in time (timeouts.startup)").await;
            return;
        }
        Ok(Ok(w)) => w,
        Ok(Err(StartupError::Gone)) => return,
        Ok(Err(StartupError::Fatal { code, message })) => {
            fatal(&mut stream, code, &message).await;
            return;
        }
    };
    let (mut stream, end_point) = match (wants_tls, tls, stream) {
        (true, Some(tls), crate::net::Stream::Tcp(tcp)) => {
            let local = tcp.local_addr().unwrap_or(peer);
            match tokio::time::timeout_at(deadline, tls.acceptor.accept(tcp)).await {
                Ok(Ok(session)) => match crate::net::Stream::tunnel(session, local) {
                    Ok(s) => (s, Some(tls.end_point.clone())),
                    Err(_) => return,
                },
                Ok(Err(e)) => {
                    tracing::info!(error = %e, "client TLS handshake failed");
                    return;
                }
                Err(_) => return,
            }
        }
        (_, _, stream) => (stream, None),
    };
    // Boxed: the startup state machine is large and only lives during login;
    // inline, it would stay part of every idle client's task.
    let handshake = startup::handshake(&app, &mut guard, &mut stream, &mut buf, end_point.as_deref(), peer.ip());
    let login = match tokio::time::timeout_at(deadline, Box::pin(handshake)).await {
        Err(_) => {
            fatal(&mut stream, sqlstate::PROTOCOL_VIOLATION, "startup did not complete in time (timeouts.startup)").await;
            return;
        }
        Ok(Ok(Some(login))) => login,
        Ok(Ok(None)) | Ok(Err(StartupError::Gone)) => return,
        Ok(Err(StartupError::Fatal { code, message })) => {
            tracing::info!(sqlstate = code, error = %message, "client login refused");
            fatal(&mut stream, code, &message).await;
            return;
        }
    };
    tracing::Span::current().record("user", login.user.as_str()).record("database", login.database.as_str());
    tracing::info!("client logged in");
    if crate::admin::is_admin_database(&login.database) {
        Box::pin(crate::admin::serve(app, stream, login, buf)).await;
        return;
    }
    // The session runs in a task of its own, sized for the relay only: this
    // task's login state (TLS, SCRAM, ...) is freed instead of being carried
    // by every idle client.
    if let Some(session) = Box::pin(prepare(app, stream, buf, login, peer, guard)).await {
        // Not instrumented: the session carries the span (see Session::span).
        tokio::spawn(session);
    }
}

/// Finishes the login (server parameters, BackendKeyData, ReadyForQuery)
/// and returns the session's future; None when the client cannot be served.
async fn prepare(
    app: Arc<App>,
    mut stream: crate::net::Stream,
    leftover: BytesMut,
    login: Login,
    peer: SocketAddr,
    guard: crate::app::ClientGuard,
) -> Option<impl std::future::Future<Output = ()> + Send> {
    let workload = match resolve_workload(&app, &login) {
        Ok(w) => w,
        Err(message) => {
            fatal(&mut stream, sqlstate::UNDEFINED_OBJECT, &message).await;
            return None;
        }
    };
    let params = match app.pool(&login.database, &login.user, Target::Primary, &app.topology()) {
        Ok(pool) => Box::pin(pool.startup_params()).await,
        Err(e) => Err(e),
    };
    let server_params = match params {
        Ok(p) => p,
        Err(e) => {
            use crate::pool::PoolError;
            // Removed by a reload during this login: say so.
            let e = match e {
                PoolError::Retired => app.removed(&login.database, &login.user).map_or(e, PoolError::Connect),
                e => e,
            };
            let code = match &e {
                PoolError::Connect(b) => b.sqlstate(),
                PoolError::Retired => sqlstate::CONNECTION_FAILURE.to_string(),
                PoolError::Timeout { .. } => sqlstate::TOO_MANY_CONNECTIONS.to_string(),
            };
            fatal(&mut stream, &code, &e.to_string()).await;
            return None;
        }
    };
    // Interned: clients of one application mostly share one settings list.
    let settings = app.intern_settings(client_settings(&server_params, &login.params));
    let key = app.cancels.register();
    // Sized for the usual dozen ParameterStatus messages (no regrowth).
    let mut out = BytesMut::with_capacity(1024);
    for (name, value) in server_params.iter() {
        let value = settings.iter().find(|(n, _)| n == name).map(|(_, v)| v).unwrap_or(value);
        build::parameter_status(&mut out, name, value);
    }
    build::backend_key_data(&mut out, key.pid, key.secret);
    build::ready_for_query(&mut out, b'I');
    tracing::Span::current().record("workload", workload.as_deref().unwrap_or(""));
    let info = Arc::new(ClientInfo {
        id: app.conns.next_client_id(),
        user: login.user.clone(),
        database: login.database.clone(),
        addr: peer,
        local: stream.local_addr().unwrap_or(peer),
        connect_time_us: crate::stats::now_us(),
        application_name: login.params.iter().rev().find(|(k, _)| k == "application_name").map(|(_, v)| v.clone()).unwrap_or_default(),
        state: AtomicU8::new(crate::stats::CLIENT_IDLE),
        request_time_us: AtomicU64::new(0),
        wait_since_us: AtomicU64::new(0),
        link: AtomicU64::new(0),
        remote_pid: AtomicI32::new(0),
        signal: Default::default(),
    });
    // Listed before the client hears it is logged in: SHOW CLIENTS and
    // SHOW POOLS right after its connect completes count it.
    let listed = Listed::client(&app.conns, info.clone());
    if stream.write_all(&out).await.is_err() {
        return None;
    }
    let id = ClientId { user: login.user, database: login.database, workload, info };
    // What the client asked for at startup: where RESET takes a setting back to.
    let startup = app.intern_settings(client_settings(&[], &login.params));
    let mut session = Box::new(Session::new(app, id, stream, leftover, settings, startup, key.slot.clone()));
    Some(async move {
        session.run().await;
        // Unregistered when the session ends, in this order.
        drop(key);
        drop(listed);
        drop(guard);
    })
}

/// The client's workload group, strongest source first: the startup option
/// `pgfleet.workload`, `[[routing.rules]]` (first match), the user's
/// `workload`, `routing.default_workload`. `None` when no groups exist.
fn resolve_workload(app: &App, login: &Login) -> Result<Option<String>, String> {
    let topo = app.topology();
    if topo.groups.is_empty() {
        return Ok(None);
    }
    let cfg = app.config();
    let mut from_startup = None;
    for (k, v) in &login.params {
        if k == "options" {
            for (name, value) in parse_options(v) {
                if name.eq_ignore_ascii_case("pgfleet.workload") {
                    from_startup = Some(value);
                }
            }
        } else if k.eq_ignore_ascii_case("pgfleet.workload") {
            from_startup = Some(v.clone());
        }
    }
    let app_name = login.params.iter().rev().find(|(k, _)| k == "application_name").map(|(_, v)| v.as_str()).unwrap_or("");
    let by_rule = cfg.routing.rules.iter().find(|r| {
        r.application_name.as_deref().is_none_or(|g| glob_match(g, app_name))
            && r.user.as_deref().is_none_or(|u| u == login.user)
            && r.database.as_deref().is_none_or(|d| d == login.database)
    });
    let name = from_startup
        .or_else(|| by_rule.map(|r| r.workload.clone()))
        .or_else(|| cfg.user(&login.user).and_then(|u| u.workload.clone()))
        .unwrap_or_else(|| cfg.routing.default_workload.clone());
    topo.group(&name)
        .map(|_| Some(name.clone()))
        .ok_or_else(|| format!("workload \"{name}\" does not exist (no [[cluster.groups]] entry of that name)"))
}

/// `*` and `?` globs, as in `application_name = "metabase*"`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Settings PostgreSQL accepts only at backend start (PGC_BACKEND and
/// PGC_SU_BACKEND).
const START_ONLY: &[&str] =
    &["log_connections", "log_disconnections", "ignore_system_indexes", "post_auth_delay", "jit_debugging_support", "jit_profiling_support"];

/// The session settings a client wants on every server connection: each
/// reported parameter (the client's startup value or the server default),
/// then any other startup parameters and `options=-c name=value` settings.
pub fn client_settings(server: &[(String, String)], startup: &[(String, String)]) -> Settings {
    let mut requested: Vec<(String, String)> = Vec::new();
    for (k, v) in startup {
        match k.as_str() {
            "user" | "database" | "replication" => {}
            "options" => requested.extend(parse_options(v)),
            _ => requested.push((k.clone(), v.clone())),
        }
    }
    requested.retain(|(k, _)| {
        // Only settable when a backend starts (PostgreSQL's "cannot be set
        // after connection start", 55P02): the server connections have theirs.
        let start_only = START_ONLY.iter().any(|s| s.eq_ignore_ascii_case(k));
        if start_only {
            tracing::info!(setting = %k, "startup setting ignored: it only applies when a server connection starts");
        }
        !start_only && !k.to_ascii_lowercase().starts_with("pgfleet.")
    });
    let mut settings: Settings = Vec::new();
    for name in REPORTED_SETTABLE {
        let value = requested
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .or_else(|| server.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()));
        if let Some(v) = value {
            settings.push((name.to_string(), v));
        }
    }
    for (k, v) in requested {
        let canonical = k.to_ascii_lowercase();
        if REPORTED_SETTABLE.iter().any(|r| r.eq_ignore_ascii_case(&canonical)) {
            continue;
        }
        match settings.iter_mut().find(|(n, _)| *n == canonical) {
            Some(slot) => slot.1 = v,
            None => settings.push((canonical, v)),
        }
    }
    settings
}

#[cfg(test)]
mod tests {
    #[test]
    fn startup_settings_pgfleet_cannot_replay_are_left_out() {
        let startup = [
            ("user".to_string(), "app".to_string()),
            ("options".to_string(), "-c log_connections=on -c statement_timeout=5s -c pgfleet.workload=chat".to_string()),
            ("application_name".to_string(), "web".to_string()),
        ];
        let s = super::client_settings(&[("TimeZone".into(), "UTC".into())], &startup);
        assert_eq!(
            s,
            vec![
                ("application_name".to_string(), "web".to_string()),
                ("TimeZone".to_string(), "UTC".to_string()),
                ("statement_timeout".to_string(), "5s".to_string()),
            ]
        );
    }

    #[test]
    fn globs() {
        use super::glob_match;
        assert!(glob_match("metabase*", "metabase-prod"));
        assert!(glob_match("metabase*", "metabase"));
        assert!(!glob_match("metabase*", "my-metabase"));
        assert!(glob_match("*base?", "metabase1"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a?c", "ac"));
    }
}
