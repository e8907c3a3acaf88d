//! The startup phase of a client connection: SSL/GSS negotiation (declined),
//! cancel requests, the StartupMessage, and client authentication
//! (SCRAM-SHA-256, md5, trust) against `[[users]]`. Nothing reaches a server
//! before authentication succeeded.

use crate::app::App;
use crate::config::AuthMethod;
use crate::wire::auth::{md5_check, md5_verifier, AuthFailure, ScramServer, ScramVerifier, Secret};
use crate::wire::startup::{parse_startup, StartupPacket};
use crate::wire::{self, build, sqlstate, WireError};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use crate::net::Stream;
use std::net::IpAddr;

pub const TOO_MANY_CLIENTS: &str = "sorry, too many clients already (listen.max_client_conn)";

/// Largest message accepted during authentication.
const MAX_AUTH_MSG: usize = 10_000;

#[derive(Debug)]
pub enum StartupError {
    /// The client went away; nothing to tell it.
    Gone,
    Fatal { code: &'static str, message: String },
}

impl From<WireError> for StartupError {
    fn from(e: WireError) -> Self {
        StartupError::Fatal { code: sqlstate::PROTOCOL_VIOLATION, message: format!("protocol violation: {e}") }
    }
}

impl From<std::io::Error> for StartupError {
    fn from(_: std::io::Error) -> Self {
        StartupError::Gone
    }
}

/// An authenticated client's identity and startup parameters.
pub struct Login {
    pub user: String,
    pub database: String,
    pub params: Vec<(String, String)>,
}

/// Answers SSLRequest/GSSENCRequest on a fresh connection: true when the
/// client asked for TLS and we agreed ('S'; the TLS handshake follows).
/// Anything else is left in `buf` for `handshake`.
pub async fn negotiate(tcp: &mut Stream, buf: &mut BytesMut, tls_available: bool) -> Result<bool, StartupError> {
    use crate::wire::startup::{GSSENC_REQUEST, SSL_REQUEST};
    use bytes::Buf;
    // Each request is answered once; a repeated one goes on to `handshake`,
    // which refuses it, as PostgreSQL does.
    let (mut ssl_done, mut gss_done) = (false, false);
    loop {
        while buf.len() < 8 {
            if tcp.read_buf(buf).await? == 0 {
                return Err(StartupError::Gone);
            }
        }
        let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let code = i32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        if len != 8 || !((code == SSL_REQUEST && !ssl_done) || (code == GSSENC_REQUEST && !gss_done)) {
            return Ok(false);
        }
        buf.advance(8);
        ssl_done |= code == SSL_REQUEST;
        gss_done |= code == GSSENC_REQUEST;
        if code == SSL_REQUEST && tls_available {
            if !buf.is_empty() {
                // Bytes sent before the TLS handshake would be trusted as if
                // they came through it (CVE-2021-23214): refuse.
                return Err(StartupError::Fatal {
                    code: sqlstate::PROTOCOL_VIOLATION,
                    message: "received unencrypted data after SSL request".into(),
                });
            }
            tcp.write_all(b"S").await?;
            return Ok(true);
        }
        tcp.write_all(b"N").await?;
    }
}

/// Runs the startup phase. `Ok(None)` for a handled CancelRequest.
/// `channel_binding`: tls-server-end-point data when the client uses TLS.
pub async fn handshake(
    app: &App,
    slot: &mut crate::app::ClientGuard,
    stream: &mut Stream,
    buf: &mut BytesMut,
    channel_binding: Option<&[u8]>,
    peer: IpAddr,
) -> Result<Option<Login>, StartupError> {
    let params = loop {
        match read_startup(stream, buf).await? {
            // SSL/GSS requests were already answered by `negotiate` (or came
            // inside TLS): as PostgreSQL, which takes each once, before the
            // startup packet. Other codes are protocols it does not speak.
            p @ (StartupPacket::SslRequest | StartupPacket::GssEncRequest | StartupPacket::Unsupported(_)) => {
                let code = match p {
                    StartupPacket::SslRequest => crate::wire::startup::SSL_REQUEST,
                    StartupPacket::GssEncRequest => crate::wire::startup::GSSENC_REQUEST,
                    StartupPacket::Unsupported(code) => code,
                    _ => unreachable!("matched above"),
                };
                return Err(StartupError::Fatal {
                    code: sqlstate::FEATURE_NOT_SUPPORTED,
                    message: format!("unsupported frontend protocol {}.{}: server supports 3.0 to 3.0", code >> 16, code & 0xffff),
                });
            }
            StartupPacket::Cancel { pid, secret } => {
                // In a task of its own: the startup deadline must not cut it
                // off between sending the cancel and the server acting on
                // it (its in-flight mark keeps the connection from being
                // reused meanwhile). ServerConn::cancel bounds it.
                let cancels = app.cancels.clone();
                let _ = tokio::spawn(async move { cancels.cancel(pid, secret).await }).await;
                return Ok(None);
            }
            StartupPacket::Startup {
                params,
                minor,
                protocol_options,
            } => {
                if minor > 0 || !protocol_options.is_empty() {
                    // A newer 3.x client (e.g. libpq 18 asking for 3.2):
                    // tell it to speak 3.0, as PostgreSQL does.
                    let mut out = BytesMut::new();
                    build::negotiate_protocol_version(&mut out, &protocol_options);
                    stream.write_all(&out).await?;
                }
                break params;
            }
        }
    };
    if !slot.claim_login() {
        return Err(StartupError::Fatal { code: sqlstate::TOO_MANY_CONNECTIONS, message: TOO_MANY_CLIENTS.into() });
    }
    if let Some(secs) = app.login_blocked(peer) {
        let message = too_many_failures(peer, secs);
        tracing::warn!("{message}");
        return Err(StartupError::Fatal { code: sqlstate::INVALID_AUTHORIZATION, message });
    }
    if !stream.is_tls() && !stream.is_unix() && app.config().listen.tls_mode() == crate::config::TlsMode::Require {
        return Err(StartupError::Fatal {
            code: sqlstate::INVALID_AUTHORIZATION,
            message: "pgfleet requires TLS (listen.tls_mode = \"require\"): connect with sslmode=require".into(),
        });
    }
    // The last of a repeated parameter counts, as on PostgreSQL.
    let get = |k: &str| params.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let user = get("user").filter(|u| !u.is_empty()).ok_or(StartupError::Fatal {
        code: sqlstate::INVALID_AUTHORIZATION,
        message: "no PostgreSQL user name specified in startup packet".into(),
    })?;
    if get("replication").is_some_and(|r| r != "false" && r != "0" && r != "off") {
        return Err(StartupError::Fatal {
            code: sqlstate::FEATURE_NOT_SUPPORTED,
            message: "replication connections are not supported through pgfleet".into(),
        });
    }
    let database = get("database").filter(|d| !d.is_empty()).unwrap_or_else(|| user.clone());
    authenticate(app, stream, buf, &user, &database, channel_binding, peer).await?;
    if crate::admin::is_admin_database(&database) {
        if !app.config().admin.users.contains(&user) {
            return Err(StartupError::Fatal {
                code: sqlstate::INVALID_AUTHORIZATION,
                message: format!("user \"{user}\" is not allowed to use the admin console (admin.users)"),
            });
        }
        return Ok(Some(Login { user, database, params }));
    }
    if app.config().database(&database).is_none() {
        return Err(StartupError::Fatal {
            code: sqlstate::INVALID_CATALOG_NAME,
            message: format!("database \"{database}\" does not exist"),
        });
    }
    Ok(Some(Login { user, database, params }))
}

async fn read_startup(stream: &mut Stream, buf: &mut BytesMut) -> Result<StartupPacket, StartupError> {
    loop {
        if let Some(p) = parse_startup(buf)? {
            return Ok(p);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(StartupError::Gone);
        }
    }
}

/// Reads one PasswordMessage-family ('p') message and returns its body.
async fn read_password(stream: &mut Stream, buf: &mut BytesMut) -> Result<Bytes, StartupError> {
    loop {
        if let Some((tag, msg)) = wire::split_message(buf, MAX_AUTH_MSG)? {
            if tag != b'p' {
                return Err(WireError::Malformed("expected a password message").into());
            }
            return Ok(msg.slice(5..));
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(StartupError::Gone);
        }
    }
}

/// Why a client address that failed to log in too often is refused (28000).
pub fn too_many_failures(peer: IpAddr, secs: u64) -> String {
    format!("too many failed login attempts from {peer}; try again in {secs} s (auth.max_failed_logins)")
}

/// Checks a client's proof with `check`, counted against the failed logins
/// of its address (App::login_attempt).
fn verify<T>(app: &App, peer: IpAddr, check: impl FnOnce() -> Result<T, StartupError>) -> Result<T, StartupError> {
    let attempt = app.login_attempt(peer).map_err(|secs| StartupError::Fatal {
        code: sqlstate::INVALID_AUTHORIZATION,
        message: too_many_failures(peer, secs),
    })?;
    let r = check();
    if r.is_ok() {
        attempt.succeeded();
    }
    r
}

/// A failed login of `peer` counted when dropped armed (see `authenticate`).
struct Charge<'a> {
    app: &'a App,
    peer: IpAddr,
    armed: bool,
}

impl Charge<'_> {
    /// The exchange reached the proof check, which counted the failure.
    fn proof_checked<T>(&mut self, r: &Result<T, StartupError>) {
        if matches!(r, Err(StartupError::Fatal { code, .. }) if *code == sqlstate::INVALID_PASSWORD) {
            self.armed = false;
        }
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.app.record_failed_login(self.peer);
        }
    }
}

fn auth_failed(user: &str) -> StartupError {
    StartupError::Fatal {
        code: sqlstate::INVALID_PASSWORD,
        message: format!("password authentication failed for user \"{user}\""),
    }
}

async fn authenticate(
    app: &App,
    stream: &mut Stream,
    buf: &mut BytesMut,
    user: &str,
    database: &str,
    cb: Option<&[u8]>,
    peer: IpAddr,
) -> Result<(), StartupError> {
    let method = app.config().auth.method;
    let configured = app.config().user(user).is_some();
    // An auth_query lookup found no such user: the login counts as failed
    // even if the client leaves before sending a proof (logins with
    // made-up names, dropped after the challenge, would otherwise run
    // lookups on the primary without limit). Once, not again at the proof.
    let mut charge = Charge { app, peer, armed: false };
    let secret = match app.secret(user) {
        Some(s) => Some(s),
        // Not in [[users]]: auth_query, when configured.
        // A failed lookup is not a wrong password: no 28P01, and it does
        // not count towards the address's failed logins.
        // (The reason is in pgfleet's log, not told to an unauthenticated client.)
        None if !configured && method != AuthMethod::Trust => {
            let found = app.auth_query_secret(user, database).await;
            charge.armed = matches!(found, Ok(None)) && app.config().auth.auth_query.is_some();
            found.map_err(|_| StartupError::Fatal {
                code: sqlstate::CONNECTION_FAILURE,
                message: format!("could not look up user \"{user}\": auth.auth_query failed; try again later"),
            })?
        }
        None => None,
    };
    // auth_query users: keep what the login proves, to log in to servers.
    let dynamic = !configured;
    let mut proof = crate::backend::Passthrough::default();
    match (method, secret) {
        (AuthMethod::Trust, _) if configured => {}
        (AuthMethod::Trust, _) => return verify(app, peer, || Err(auth_failed(user))),
        (_, Some(Secret::Md5(v))) => {
            md5_exchange(app, peer, stream, buf, &v, user).await?;
            proof.md5 = Some(v);
        }
        (AuthMethod::Md5, Some(Secret::Plain { password, .. })) => {
            md5_exchange(app, peer, stream, buf, &md5_verifier(user, &password), user).await?;
            proof.password = Some(password);
        }
        (_, Some(Secret::Plain { scram, password })) => {
            scram_exchange(app, peer, stream, buf, &scram, user, cb).await?;
            proof.password = Some(password);
        }
        (_, Some(Secret::Scram(scram))) => {
            let client_key = scram_exchange(app, peer, stream, buf, &scram, user, cb).await?;
            proof.scram = Some((client_key, scram.server_key));
        }
        // Unknown user: run the exchange a configured user would get,
        // against a mock secret, so the answer does not reveal which user
        // names exist.
        // (With auth_query, whose users have SCRAM verifiers on PostgreSQL
        // 14 and later, SCRAM below, as PostgreSQL's own mock.)
        (AuthMethod::Md5, None) if app.config().auth.auth_query.is_none() => {
            let mock = md5_verifier(user, &format!("{:?}", app.mock_verifier(user).stored_key));
            let r = md5_exchange(app, peer, stream, buf, &mock, user).await;
            charge.proof_checked(&r);
            r?;
            return Err(auth_failed(user));
        }
        (_, None) => {
            let r = scram_exchange(app, peer, stream, buf, &app.mock_verifier(user), user, cb).await;
            charge.proof_checked(&r);
            r?;
            return Err(auth_failed(user));
        }
    }
    if dynamic {
        app.remember_login(user, proof);
    }
    let mut out = BytesMut::with_capacity(16);
    build::auth_ok(&mut out);
    stream.write_all(&out).await?;
    Ok(())
}

async fn md5_exchange(app: &App, peer: IpAddr, stream: &mut Stream, buf: &mut BytesMut, verifier: &str, user: &str) -> Result<(), StartupError> {
    let salt: [u8; 4] = rand::random();
    let mut out = BytesMut::with_capacity(16);
    build::auth_md5(&mut out, salt);
    stream.write_all(&out).await?;
    let body = read_password(stream, buf).await?;
    let response = wire::Reader::new(&body).cstr()?;
    verify(app, peer, || if md5_check(verifier, salt, response) { Ok(()) } else { Err(auth_failed(user)) })
}

async fn scram_exchange(
    app: &App,
    peer: IpAddr,
    stream: &mut Stream,
    buf: &mut BytesMut,
    verifier: &ScramVerifier,
    user: &str,
    cb: Option<&[u8]>,
) -> Result<[u8; 32], StartupError> {
    // Room for the SASL, SASLContinue and SASLFinal messages.
    let mut out = BytesMut::with_capacity(256);
    // With TLS, channel binding is offered first (as PostgreSQL does).
    let offered: &[&str] = if cb.is_some() { &["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"] } else { &["SCRAM-SHA-256"] };
    build::auth_sasl(&mut out, offered);
    stream.write_all(&out).await?;
    let body = read_password(stream, buf).await?;
    let mut r = wire::Reader::new(&body);
    let mechanism = r.cstr()?;
    let len = r.i32()?;
    let plus = match mechanism {
        b"SCRAM-SHA-256" => false,
        b"SCRAM-SHA-256-PLUS" if cb.is_some() => true,
        _ => {
            return Err(StartupError::Fatal {
                code: sqlstate::PROTOCOL_VIOLATION,
                message: "SASL authentication mechanism not offered by pgfleet".into(),
            })
        }
    };
    if len < 0 || len as usize != r.remaining() {
        return Err(WireError::Malformed("bad SASLInitialResponse").into());
    }
    let scram_err = |e: AuthFailure| match e {
        AuthFailure::WrongPassword => auth_failed(user),
        AuthFailure::Protocol(m) => StartupError::Fatal {
            code: sqlstate::PROTOCOL_VIOLATION,
            message: format!("invalid SCRAM exchange: {m}"),
        },
    };
    let binding = crate::wire::auth::Binding { plus, offered: cb.is_some(), data: cb.unwrap_or_default() };
    let (state, server_first) = ScramServer::start(verifier, r.rest(), binding).map_err(scram_err)?;
    out.clear();
    build::auth_sasl_continue(&mut out, server_first.as_bytes());
    stream.write_all(&out).await?;
    let client_final = read_password(stream, buf).await?;
    let (server_final, client_key) = verify(app, peer, || state.finish_with_key(&client_final).map_err(scram_err))?;
    out.clear();
    build::auth_sasl_final(&mut out, server_final.as_bytes());
    stream.write_all(&out).await?;
    Ok(client_key)
}
