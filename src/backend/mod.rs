//! One connection to a PostgreSQL server: connect, authenticate as whatever
//! the server asks (SCRAM-SHA-256, md5, cleartext, trust), learn its session
//! parameters, and carry the state the pool must know about (the server's
//! current parameters and which proxy statements are prepared on it).

use crate::wire::{self, build, startup};
use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use crate::stats::{Connections, Listed, ServerInfo};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use crate::net::Stream;
use tokio::net::TcpStream;

/// Largest message accepted from a server during startup.
const MAX_SERVER_STARTUP_MSG: usize = 1 << 20;

/// How long data sent to a server may stay unacknowledged (TCP_USER_TIMEOUT).
const SERVER_TCP_USER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug)]
pub enum BackendError {
    Io(std::io::Error),
    Timeout,
    /// The server answered with an ErrorResponse (fields as sent).
    Server(Vec<(u8, String)>),
    /// The server asked for something pgfleet cannot do (or has no password for).
    Auth(String),
    Protocol(String),
    /// The server is a hot standby but writes were expected.
    Standby,
    /// No server is known to accept writes (failover in progress).
    NoPrimary(String),
    /// The client's database or user left the config (reload): the
    /// SQLSTATE and why.
    Removed(&'static str, String),
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendError::Io(e) => write!(f, "server I/O error: {e}"),
            BackendError::Timeout => write!(f, "server did not answer in time"),
            BackendError::Server(fields) => {
                let msg = fields.iter().find(|(c, _)| *c == b'M').map(|(_, m)| m.as_str());
                write!(f, "server error: {}", msg.unwrap_or("(no message)"))
            }
            BackendError::Auth(e) => write!(f, "server authentication: {e}"),
            BackendError::Protocol(e) => write!(f, "server protocol error: {e}"),
            BackendError::Standby => write!(f, "the server is in recovery (a standby), not a primary"),
            BackendError::NoPrimary(why) => write!(f, "no primary server available: {why}"),
            BackendError::Removed(_, why) => f.write_str(why),
        }
    }
}

impl std::error::Error for BackendError {}

impl From<std::io::Error> for BackendError {
    fn from(e: std::io::Error) -> Self {
        BackendError::Io(e)
    }
}

impl BackendError {
    /// The SQLSTATE the server answered with.
    fn server_code(&self) -> Option<&str> {
        match self {
            BackendError::Server(fields) => wire::error_field(fields, b'C'),
            _ => None,
        }
    }

    /// SQLSTATE to show a client for this failure.
    pub fn sqlstate(&self) -> String {
        match self {
            BackendError::Server(_) => self.server_code().unwrap_or(wire::sqlstate::CONNECTION_FAILURE).into(),
            BackendError::Standby | BackendError::NoPrimary(_) => wire::sqlstate::CANNOT_CONNECT_NOW.into(),
            BackendError::Removed(code, _) => (*code).into(),
            _ => wire::sqlstate::CONNECTION_FAILURE.into(),
        }
    }

    /// A login the server refused (wrong password, no such database or
    /// role, no permission, an authentication method pgfleet cannot do):
    /// the same login would be refused again, so the pool remembers it
    /// for `pool.server_login_retry` (a copy to answer clients with).
    pub fn login_refusal(&self) -> Option<BackendError> {
        let refused = self.server_code().is_some_and(|c| c.starts_with("28") || matches!(c, "3D000" | "42501"));
        match self {
            BackendError::Server(fields) if refused => Some(BackendError::Server(fields.clone())),
            BackendError::Auth(why) => Some(BackendError::Auth(why.clone())),
            _ => None,
        }
    }

    /// The server answered that it has no room for another connection
    /// (`max_connections` reached).
    pub fn is_server_full(&self) -> bool {
        self.server_code() == Some("53300")
    }

    /// The server is down, starting, stopping, busy or not (yet) a
    /// primary: worth waiting for, unlike a refused login.
    pub fn is_transient(&self) -> bool {
        match self {
            BackendError::Io(_) | BackendError::Timeout | BackendError::Standby | BackendError::NoPrimary(_) => true,
            BackendError::Server(_) => matches!(self.server_code(), Some("57P01" | "57P02" | "57P03" | "53300" | "08006" | "08001")),
            BackendError::Auth(_) | BackendError::Protocol(_) | BackendError::Removed(..) => false,
        }
    }
}

/// Where and as whom to connect.
#[derive(Clone)]
pub struct ConnectSpec {
    pub addr: String,
    pub user: String,
    pub database: String,
    pub password: Option<String>,
    pub connect_timeout: Duration,
    /// Refuse a server that reports `in_hot_standby = on` (writes go here).
    pub require_primary: bool,
    /// `cluster.server_tls_mode` (None: plaintext).
    pub tls: Option<Arc<crate::tls::ClientTls>>,
    /// `pool.max_connects_per_second` of this server (shared by its pools).
    pub pacer: Option<Arc<crate::limits::TokenBucket>>,
    /// auth_query users: what their last login proved (no password known).
    pub passthrough: Option<Arc<std::sync::RwLock<Passthrough>>>,
}

/// How to log in to a server as a user pgfleet has no password for, from
/// what the user's own login revealed.
#[derive(Clone, Default)]
pub struct Passthrough {
    /// (ClientKey, ServerKey) of the user's SCRAM verifier.
    pub scram: Option<([u8; 32], [u8; 32])>,
    /// The user's md5 verifier.
    pub md5: Option<String>,
    /// A plaintext password (auth_query returned one).
    pub password: Option<String>,
}

/// SCRAM towards a server: from the password, or from the keys.
enum ScramClient {
    Password(ScramSha256),
    Keys(wire::auth::ScramKeyClient),
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub struct ServerConn {
    pub id: u64,
    /// The pool's target epoch when opened (a failover moves the target).
    pub epoch: u64,
    /// A cancel for the client that used it may still land: never reuse.
    pub cancel_pending: bool,
    pub stream: Stream,
    pub peer: SocketAddr,
    pub backend_pid: i32,
    pub backend_secret: i32,
    /// The server session's current parameter values as far as pgfleet
    /// knows: everything reported by ParameterStatus plus what pgfleet set.
    pub params: HashMap<String, String>,
    /// Non-reported parameters pgfleet set for a client (to RESET for others).
    pub custom: HashSet<String>,
    /// Fingerprint of the client settings this connection carries (0 = unknown).
    pub settings_fp: u64,
    /// Proxy statement id -> last-use tick, for the LRU cache.
    pub prepared: HashMap<u64, u64>,
    pub tick: u64,
    pub created: Instant,
    pub idle_since: Instant,
    /// SHOW SERVERS entry, removed when the connection is dropped.
    pub info: Option<Arc<ServerInfo>>,
    listed: Option<Listed>,
    /// The connection's span (pool, addr, id, backend pid) for its lifecycle logs.
    pub span: tracing::Span,
}

impl ServerConn {
    /// Connects and authenticates within `spec.connect_timeout`.
    pub async fn connect(spec: &ConnectSpec) -> Result<ServerConn, BackendError> {
        tokio::time::timeout(spec.connect_timeout, Self::connect_inner(spec))
            .await
            .map_err(|_| BackendError::Timeout)?
    }

    async fn connect_inner(spec: &ConnectSpec) -> Result<ServerConn, BackendError> {
        let tcp = TcpStream::connect(&spec.addr).await?;
        tcp.set_nodelay(true)?;
        // A server host that vanishes without a reset (power loss, a
        // partition) is noticed in about a minute, not the kernel's
        // retransmission timeout.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(std::time::Duration::from_secs(30))
            .with_interval(std::time::Duration::from_secs(10))
            .with_retries(3);
        let sock = socket2::SockRef::from(&tcp);
        sock.set_tcp_keepalive(&keepalive)?;
        // Keepalive probes stop while sent data is unacknowledged: a query
        // sent to a host that is gone would wait out the kernel's
        // retransmissions (about 15 minutes). Unacknowledged for this long,
        // the connection is given up.
        sock.set_tcp_user_timeout(Some(SERVER_TCP_USER_TIMEOUT))?;
        let peer = tcp.peer_addr()?;
        // Over TLS: the server certificate's tls-server-end-point hash, for
        // SCRAM channel binding (as libpq's default channel_binding=prefer).
        let (mut stream, end_point) = match &spec.tls {
            Some(tls) => Self::start_tls(tcp, tls, &spec.addr).await?,
            None => (Stream::Tcp(tcp), None),
        };
        let mut buf = BytesMut::with_capacity(512);
        startup::startup_message(
            &mut buf,
            &[("user", &spec.user), ("database", &spec.database)],
        );
        stream.write_all(&buf).await?;
        buf.clear();
        let mut conn = ServerConn {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            stream,
            peer,
            backend_pid: 0,
            backend_secret: 0,
            params: HashMap::new(),
            custom: HashSet::new(),
            settings_fp: 0,
            prepared: HashMap::new(),
            tick: 0,
            created: Instant::now(),
            idle_since: Instant::now(),
            info: None,
            listed: None,
            span: tracing::Span::none(),
            epoch: 0,
            cancel_pending: false,
        };
        let mut scram: Option<ScramClient> = None;
        // One authentication method per login: a server that asks for a
        // password (cleartext, md5) after a SCRAM exchange began or ended
        // gets nothing (a downgrade to learn the password or an md5 hash).
        let mut method_answered = false;
        loop {
            let msg = conn.read_message(&mut buf).await?;
            let mut r = wire::Reader::new(wire::body(&msg));
            match msg[0] {
                b'R' => {
                    let code = r.i32().map_err(|e| BackendError::Protocol(e.to_string()))?;
                    if matches!(code, 3 | 5 | 10) {
                        if method_answered {
                            return Err(BackendError::Auth(format!("the server asked for authentication again (request {code}) after a method was answered: refused")));
                        }
                        method_answered = true;
                    }
                    let mut out = BytesMut::new();
                    conn.answer_auth(code, r.rest(), spec, end_point.as_deref(), &mut scram, &mut out)?;
                    if !out.is_empty() {
                        conn.stream.write_all(&out).await?;
                    }
                }
                b'S' => {
                    let (k, v) = wire::parse_parameter_status(&msg)
                        .map_err(|e| BackendError::Protocol(e.to_string()))?;
                    conn.params.insert(k.to_string(), v.to_string());
                }
                b'K' => {
                    conn.backend_pid = r.i32().unwrap_or(0);
                    conn.backend_secret = r.i32().unwrap_or(0);
                }
                b'E' => return Err(BackendError::Server(wire::error_fields(&msg))),
                b'N' => {}
                b'Z' => {
                    if spec.require_primary && conn.params.get("in_hot_standby").is_some_and(|v| v == "on") {
                        return Err(BackendError::Standby);
                    }
                    return Ok(conn);
                }
                t => {
                    return Err(BackendError::Protocol(format!(
                        "unexpected message {:?} during startup",
                        t as char
                    )))
                }
            }
        }
    }

    fn answer_auth(
        &self,
        code: i32,
        data: &[u8],
        spec: &ConnectSpec,
        end_point: Option<&[u8]>,
        scram: &mut Option<ScramClient>,
        out: &mut BytesMut,
    ) -> Result<(), BackendError> {
        let pass = spec.passthrough.as_ref().map(|p| p.read().unwrap().clone()).unwrap_or_default();
        let known_password = spec.password.clone().or(pass.password.clone());
        let password = || {
            known_password.as_deref().ok_or_else(|| {
                BackendError::Auth(format!(
                    "the server wants a password for user {:?}; set users.server_password or a plaintext users.password",
                    spec.user
                ))
            })
        };
        let proto = |e: std::io::Error| BackendError::Protocol(e.to_string());
        match code {
            // A SCRAM exchange must end with the server's verified signature
            // (code 12 clears `scram`): an "ok" before that comes from a
            // server that never proved it knows the password (as libpq).
            0 if scram.is_some() => {
                return Err(BackendError::Auth(
                    "the server ended SCRAM authentication without its final message (server signature not verified)".into(),
                ))
            }
            0 => {}
            3 => frontend::password_message(password()?.as_bytes(), out).map_err(proto)?,
            5 => {
                let salt: [u8; 4] = data
                    .get(..4)
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(|| BackendError::Protocol("short md5 salt".into()))?;
                let hash = match (&known_password, &pass.md5) {
                    (None, Some(verifier)) => wire::auth::md5_response_from_verifier(verifier, salt),
                    _ => postgres_protocol::authentication::md5_hash(spec.user.as_bytes(), password()?.as_bytes(), salt),
                };
                frontend::password_message(hash.as_bytes(), out).map_err(proto)?;
            }
            10 => {
                let offers = |m: &str| data.split(|b| *b == 0).any(|o| o == m.as_bytes());
                // Bound to the TLS channel when the server offers it: a
                // relay in the middle (possible under server_tls_mode =
                // require, which does not check the certificate) cannot
                // complete the exchange. Over TLS without the offer, "y"
                // (could bind, was not offered) as libpq sends: a server
                // that did offer it, its offer stripped by such a relay,
                // then refuses the login. (Pass-through logins stay unbound.)
                let plus = offers("SCRAM-SHA-256-PLUS");
                let (s, bound) = match (&known_password, pass.scram) {
                    (None, Some((client_key, server_key))) => (ScramClient::Keys(wire::auth::ScramKeyClient::new(client_key, server_key)), false),
                    _ => {
                        let (binding, bound) = channel_binding(end_point, plus);
                        (ScramClient::Password(ScramSha256::new(password()?.as_bytes(), binding)), bound)
                    }
                };
                let mechanism = if bound { "SCRAM-SHA-256-PLUS" } else { "SCRAM-SHA-256" };
                if !offers(mechanism) {
                    return Err(BackendError::Auth("server offers no supported SASL mechanism".into()));
                }
                let first = match &s {
                    ScramClient::Password(p) => p.message(),
                    ScramClient::Keys(k) => k.message(),
                };
                frontend::sasl_initial_response(mechanism, first, out).map_err(proto)?;
                *scram = Some(s);
            }
            11 => {
                let s = scram.as_mut().ok_or_else(|| BackendError::Protocol("SASL continue without start".into()))?;
                let next = match s {
                    ScramClient::Password(p) => {
                        p.update(data).map_err(|e| BackendError::Auth(e.to_string()))?;
                        p.message()
                    }
                    ScramClient::Keys(k) => {
                        k.update(data).map_err(BackendError::Auth)?;
                        k.message()
                    }
                };
                frontend::sasl_response(next, out).map_err(proto)?;
            }
            12 => {
                let s = scram.as_mut().ok_or_else(|| BackendError::Protocol("SASL final without start".into()))?;
                match s {
                    ScramClient::Password(p) => p.finish(data).map_err(|e| BackendError::Auth(format!("server signature: {e}")))?,
                    ScramClient::Keys(k) => k.finish(data).map_err(|e| BackendError::Auth(format!("server signature: {e}")))?,
                }
                *scram = None;
            }
            other => {
                return Err(BackendError::Auth(format!("unsupported authentication request {other}")))
            }
        }
        Ok(())
    }

    /// SSLRequest, then TLS if the server agrees (required unless "prefer").
    async fn start_tls(mut tcp: TcpStream, tls: &crate::tls::ClientTls, addr: &str) -> Result<(Stream, Option<Vec<u8>>), BackendError> {
        use crate::config::ServerTlsMode;
        tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {
                let name = crate::tls::ClientTls::server_name(addr).map_err(BackendError::Auth)?;
                let local = tcp.local_addr()?;
                let session = tls
                    .connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| match e.kind() {
                        // A certificate or protocol failure (rustls's errors
                        // come as InvalidData): refused, like a login.
                        std::io::ErrorKind::InvalidData => BackendError::Auth(format!("TLS handshake with the server failed: {e}")),
                        // The connection broke (a server restarting): worth
                        // waiting for, like any connect that breaks.
                        _ => BackendError::Io(e),
                    })?;
                let end_point = crate::tls::server_end_point(session.get_ref().1);
                Ok((Stream::tunnel(session, local)?, end_point))
            }
            b'N' if tls.mode == ServerTlsMode::Prefer => Ok((Stream::Tcp(tcp), None)),
            b'N' => Err(BackendError::Auth("the server does not accept TLS (cluster.server_tls_mode)".into())),
            _ => Err(BackendError::Protocol("unexpected answer to SSLRequest".into())),
        }
    }

    /// Reads one whole message (used outside the relay's data path).
    async fn read_message(&mut self, buf: &mut BytesMut) -> Result<bytes::Bytes, BackendError> {
        loop {
            match wire::split_message(buf, MAX_SERVER_STARTUP_MSG) {
                Ok(Some((_, msg))) => return Ok(msg),
                Ok(None) => {}
                Err(e) => return Err(BackendError::Protocol(e.to_string())),
            }
            if self.stream.read_buf(buf).await? == 0 {
                return Err(BackendError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Lists the connection in SHOW SERVERS.
    pub fn register(&mut self, conns: &Arc<Connections>, key: &crate::pool::PoolKey) {
        let info = Arc::new(ServerInfo {
            id: self.id,
            user: key.user.clone(),
            database: key.database.clone(),
            backend: key.backend.clone(),
            addr: self.peer,
            local: self.stream.local_addr().unwrap_or(self.peer),
            connect_time_us: crate::stats::now_us(),
            backend_pid: self.backend_pid,
            state: AtomicU8::new(crate::stats::SERVER_IDLE),
            request_time_us: AtomicU64::new(0),
            link: AtomicU64::new(0),
        });
        self.listed = Some(Listed::server(conns, info.clone()));
        self.info = Some(info);
    }

    /// Runs a simple query whose results nobody needs (ROLLBACK, DISCARD ALL)
    /// and waits for ReadyForQuery; fails unless the server ends up idle.
    pub async fn run_silently(&mut self, sql: &str, limit: Duration) -> Result<(), BackendError> {
        let fut = async {
            let mut buf = BytesMut::new();
            build::query(&mut buf, sql);
            self.stream.write_all(&buf).await?;
            buf.clear();
            let mut error = None;
            loop {
                let msg = self.read_message(&mut buf).await?;
                match msg[0] {
                    b'E' => error = Some(wire::error_fields(&msg)),
                    b'S' => match wire::parse_parameter_status(&msg) {
                        Ok((k, v)) => {
                            self.params.insert(k.to_string(), v.to_string());
                        }
                        // A value in a client encoding that is not UTF-8:
                        // unknown from now on (not the previous value).
                        Err(_) => {
                            let body = wire::body(&msg);
                            let name = body.split(|b| *b == 0).next().and_then(|n| std::str::from_utf8(n).ok());
                            if let Some(name) = name {
                                self.params.remove(name);
                            }
                        }
                    },
                    b'Z' => {
                        if let Some(e) = error {
                            return Err(BackendError::Server(e));
                        }
                        if msg.get(5) != Some(&b'I') {
                            return Err(BackendError::Protocol("server not idle after reset".into()));
                        }
                        return Ok(());
                    }
                    _ => {}
                }
            }
        };
        tokio::time::timeout(limit, fut).await.map_err(|_| BackendError::Timeout)?
    }

    /// True when the idle connection has neither been closed by the server
    /// nor sent anything unsolicited (an idle server has nothing to say).
    pub fn looks_healthy(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Best-effort polite goodbye; the socket closes when dropped.
    pub fn terminate(self, why: &str) {
        tracing::info!(parent: &self.span, reason = why, "server connection closed");
        let mut buf = BytesMut::new();
        build::terminate(&mut buf);
        let _ = self.stream.try_write(&buf);
    }

    /// Sends a CancelRequest for this connection's backend. Ok(true) once
    /// the server closed the socket (it has acted on the request), Ok(false)
    /// when it had not within a few seconds: the cancel may still land.
    pub async fn cancel(peer: SocketAddr, pid: i32, secret: i32) -> std::io::Result<bool> {
        let s = Self::send_cancel(peer, pid, secret).await?;
        Ok(Self::cancel_acknowledged(s).await)
    }

    /// The first half of `cancel`: the request is on its way.
    pub async fn send_cancel(peer: SocketAddr, pid: i32, secret: i32) -> std::io::Result<TcpStream> {
        // Bounded: a server that does not answer (down, unreachable) must
        // not keep the request, and what waits on it, around for minutes.
        let send = async {
            let mut s = TcpStream::connect(peer).await?;
            s.write_all(&startup::cancel_request(pid, secret)).await?;
            Ok::<_, std::io::Error>(s)
        };
        tokio::time::timeout(Duration::from_secs(5), send)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "cancel request: no connection in 5 s"))?
    }

    /// The second half of `cancel`: the server closes the socket when it
    /// has acted on the request; waited for up to 5 s.
    pub async fn cancel_acknowledged(mut s: TcpStream) -> bool {
        let mut sink = [0u8; 16];
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut sink)).await.is_ok()
    }

    pub fn mark_prepared(&mut self, id: u64) {
        self.tick += 1;
        self.prepared.insert(id, self.tick);
    }

    /// Touches a statement in the LRU; returns whether it is prepared here.
    pub fn touch_prepared(&mut self, id: u64) -> bool {
        self.tick += 1;
        match self.prepared.get_mut(&id) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// The least recently used statement, if the cache is at `limit`.
    pub fn lru_victim(&self, limit: usize) -> Option<u64> {
        if limit == 0 || self.prepared.len() < limit {
            return None;
        }
        self.prepared.iter().min_by_key(|(_, t)| **t).map(|(id, _)| *id)
    }
}

/// Drops `n` bytes from the front of a buffer, reclaiming it when empty.
pub fn consume(buf: &mut BytesMut, n: usize) {
    if n >= buf.len() {
        buf.clear();
    } else {
        buf.advance(n);
    }
}

/// How pgfleet's own SCRAM login binds to the channel, and whether it
/// uses SCRAM-SHA-256-PLUS: bound over TLS when the server offers it; over
/// TLS without the offer "y" (could bind, was not offered), as libpq.
fn channel_binding(end_point: Option<&[u8]>, plus_offered: bool) -> (ChannelBinding, bool) {
    match end_point {
        Some(h) if plus_offered => (ChannelBinding::tls_server_end_point(h.to_vec()), true),
        Some(_) => (ChannelBinding::unrequested(), false),
        None => (ChannelBinding::unsupported(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn over_tls_a_missing_plus_offer_is_answered_with_y() {
        let gs2 = |end_point: Option<&[u8]>, plus| {
            let (binding, bound) = channel_binding(end_point, plus);
            let first = ScramSha256::new(b"pw", binding).message().to_vec();
            (String::from_utf8_lossy(&first[..3]).to_string(), bound)
        };
        assert_eq!(gs2(Some(b"hash"), true), ("p=t".to_string(), true));
        // A relay that strips the -PLUS offer: "y", which the real server
        // (that offered it) refuses.
        assert_eq!(gs2(Some(b"hash"), false), ("y,,".to_string(), false));
        assert_eq!(gs2(None, true), ("n,,".to_string(), false));
    }

    /// A scripted server: after the client's first SASL message it says
    /// "ok" without the SCRAM final message (a server that does not know
    /// the password). pgfleet must refuse it, as libpq does.
    #[tokio::test]
    async fn a_server_skipping_the_scram_signature_is_refused() {
        let (listener, addr) = listen().await;
        tokio::spawn(async move {
            let mut s = start_scram(&listener).await;
            s.write_all(&auth_request(0)).await.unwrap(); // "ok"
            let _ = s.read(&mut [0u8; 1024]).await;
        });
        match ServerConn::connect(&test_spec(addr)).await {
            Err(BackendError::Auth(why)) => {
                assert!(why.contains("server signature not verified"), "{why}")
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a server that never proved the password was accepted"),
        }
    }

    /// A scripted server that starts SCRAM, then asks for the password in
    /// cleartext (a downgrade): pgfleet must not send it.
    #[tokio::test]
    async fn a_server_asking_for_the_password_after_scram_began_gets_nothing() {
        let (listener, addr) = listen().await;
        let server = tokio::spawn(async move {
            let mut s = start_scram(&listener).await;
            s.write_all(&auth_request(3)).await.unwrap(); // cleartext password
            let mut got = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut got)).await;
            got
        });
        match ServerConn::connect(&test_spec(addr)).await {
            Err(BackendError::Auth(why)) => assert!(why.contains("asked for authentication again"), "{why}"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("connected"),
        }
        let sent = server.await.unwrap();
        assert!(!sent.windows(6).any(|w| w == b"secret"), "the password went out in cleartext");
    }

    async fn listen() -> (tokio::net::TcpListener, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        (listener, addr)
    }

    /// A scripted server: accepts pgfleet, reads its StartupMessage, offers
    /// SCRAM-SHA-256 and reads the SASLInitialResponse.
    async fn start_scram(listener: &tokio::net::TcpListener) -> tokio::net::TcpStream {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 1024];
        let _ = s.read(&mut buf).await; // StartupMessage
        let mut out = BytesMut::new();
        out.extend_from_slice(b"R");
        out.extend_from_slice(&23i32.to_be_bytes());
        out.extend_from_slice(&10i32.to_be_bytes());
        out.extend_from_slice(b"SCRAM-SHA-256\0\0");
        s.write_all(&out).await.unwrap();
        let _ = s.read(&mut buf).await; // SASLInitialResponse
        s
    }

    /// An Authentication message with no data (0 ok, 3 cleartext, 5 md5...).
    fn auth_request(code: i32) -> Vec<u8> {
        [b"R".as_slice(), &8i32.to_be_bytes(), &code.to_be_bytes()].concat()
    }

    fn test_spec(addr: String) -> ConnectSpec {
        ConnectSpec {
            addr,
            user: "app".into(),
            database: "app".into(),
            password: Some("secret".into()),
            connect_timeout: Duration::from_secs(5),
            require_primary: false,
            tls: None,
            pacer: None,
            passthrough: None,
        }
    }
}
