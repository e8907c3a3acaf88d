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
use tokio::net::TcpStream;

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

/// Runs the startup phase. `Ok(None)` for a handled CancelRequest.
pub async fn handshake(app: &App, stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Option<Login>, StartupError> {
    let params = loop {
        match read_startup(stream, buf).await? {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => stream.write_all(b"N").await?,
            StartupPacket::Cancel { pid, secret } => {
                app.cancels.cancel(pid, secret).await;
                return Ok(None);
            }
            StartupPacket::Startup { params } => break params,
        }
    };
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
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
    authenticate(app, stream, buf, &user).await?;
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

async fn read_startup(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<StartupPacket, StartupError> {
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
async fn read_password(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Bytes, StartupError> {
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

fn auth_failed(user: &str) -> StartupError {
    StartupError::Fatal {
        code: sqlstate::INVALID_PASSWORD,
        message: format!("password authentication failed for user \"{user}\""),
    }
}

async fn authenticate(app: &App, stream: &mut TcpStream, buf: &mut BytesMut, user: &str) -> Result<(), StartupError> {
    let method = app.config().auth.method;
    let secret = app.secret(user);
    match (method, secret) {
        (AuthMethod::Trust, Some(_)) | (AuthMethod::Trust, None) if app.config().user(user).is_some() => {}
        (AuthMethod::Trust, _) => return Err(auth_failed(user)),
        (_, Some(Secret::Md5(v))) => md5_exchange(stream, buf, &v, user).await?,
        (AuthMethod::Md5, Some(Secret::Plain { password, .. })) => {
            md5_exchange(stream, buf, &md5_verifier(user, &password), user).await?
        }
        (_, Some(Secret::Plain { scram, .. })) | (_, Some(Secret::Scram(scram))) => {
            scram_exchange(stream, buf, &scram, user).await?
        }
        // Unknown user: run the exchange against a dummy verifier so the
        // answer does not reveal which user names exist.
        (_, None) => {
            scram_exchange(stream, buf, &app.dummy_verifier, user).await?;
            return Err(auth_failed(user));
        }
    }
    let mut out = BytesMut::new();
    build::auth_ok(&mut out);
    stream.write_all(&out).await?;
    Ok(())
}

async fn md5_exchange(stream: &mut TcpStream, buf: &mut BytesMut, verifier: &str, user: &str) -> Result<(), StartupError> {
    let salt: [u8; 4] = rand::random();
    let mut out = BytesMut::new();
    build::auth_md5(&mut out, salt);
    stream.write_all(&out).await?;
    let body = read_password(stream, buf).await?;
    let response = wire::Reader::new(&body).cstr()?;
    if md5_check(verifier, salt, response) {
        Ok(())
    } else {
        Err(auth_failed(user))
    }
}

async fn scram_exchange(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    verifier: &ScramVerifier,
    user: &str,
) -> Result<(), StartupError> {
    let mut out = BytesMut::new();
    build::auth_sasl(&mut out, &["SCRAM-SHA-256"]);
    stream.write_all(&out).await?;
    let body = read_password(stream, buf).await?;
    let mut r = wire::Reader::new(&body);
    let mechanism = r.cstr()?;
    let len = r.i32()?;
    if mechanism != b"SCRAM-SHA-256" || len < 0 || len as usize != r.remaining() {
        return Err(WireError::Malformed("bad SASLInitialResponse").into());
    }
    let scram_err = |e: AuthFailure| match e {
        AuthFailure::WrongPassword => auth_failed(user),
        AuthFailure::Protocol(m) => StartupError::Fatal {
            code: sqlstate::PROTOCOL_VIOLATION,
            message: format!("invalid SCRAM exchange: {m}"),
        },
    };
    let (state, server_first) = ScramServer::start(verifier, r.rest()).map_err(scram_err)?;
    out.clear();
    build::auth_sasl_continue(&mut out, server_first.as_bytes());
    stream.write_all(&out).await?;
    let client_final = read_password(stream, buf).await?;
    let server_final = state.finish(&client_final).map_err(scram_err)?;
    out.clear();
    build::auth_sasl_final(&mut out, server_final.as_bytes());
    stream.write_all(&out).await?;
    Ok(())
}
