//! Untyped packets a client sends before the typed message stream starts:
//! StartupMessage, SSLRequest, GSSENCRequest and CancelRequest.

use super::{Reader, WireError};
use bytes::BytesMut;

pub const PROTOCOL_3_0: i32 = 196_608;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;
/// PostgreSQL's own limit for a startup packet.
pub const MAX_STARTUP_PACKET: usize = 10_000;
pub const MAX_STARTUP_PARAMS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// `minor`: the protocol minor version asked for (3.x); `protocol_options`:
    /// `_pq_.*` parameters (protocol extensions, none of which pgfleet
    /// supports). Either calls for NegotiateProtocolVersion; the session
    /// then goes on in 3.0, as with PostgreSQL.
    Startup {
        params: Vec<(String, String)>,
        minor: u16,
        protocol_options: Vec<String>,
    },
    SslRequest,
    GssEncRequest,
    /// Another protocol version (2.0, 4.x, a request code PostgreSQL does
    /// not have): answered with 0A000, as PostgreSQL does.
    Unsupported(i32),
    Cancel {
        pid: i32,
        secret: i32,
    },
}

impl StartupPacket {
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            StartupPacket::Startup { params, .. } => {
                params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
            }
            _ => None,
        }
    }
}

/// Decodes one startup-phase packet from the front of `buf`.
pub fn parse_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(WireError::BadLength(len as i64));
    }
    let len = len as usize;
    if len > MAX_STARTUP_PACKET {
        return Err(WireError::TooLarge { len, max: MAX_STARTUP_PACKET });
    }
    if buf.len() < len {
        return Ok(None);
    }
    let packet = buf.split_to(len);
    let mut r = Reader::new(&packet[4..]);
    let code = r.i32()?;
    match code {
        SSL_REQUEST if len == 8 => Ok(Some(StartupPacket::SslRequest)),
        GSSENC_REQUEST if len == 8 => Ok(Some(StartupPacket::GssEncRequest)),
        CANCEL_REQUEST if len == 16 => {
            let pid = r.i32()?;
            let secret = r.i32()?;
            Ok(Some(StartupPacket::Cancel { pid, secret }))
        }
        _ if code >> 16 == 3 => {
            let (params, options) = parse_params(&mut r)?.into_iter().partition::<Vec<_>, _>(|(k, _)| !k.starts_with("_pq_."));
            let protocol_options = options.into_iter().map(|(k, _)| k).collect();
            Ok(Some(StartupPacket::Startup { params, minor: (code & 0xffff) as u16, protocol_options }))
        }
        _ => Ok(Some(StartupPacket::Unsupported(code))),
    }
}

fn parse_params(r: &mut Reader<'_>) -> Result<Vec<(String, String)>, WireError> {
    let mut params = Vec::new();
    loop {
        let name = r.cstr_utf8()?;
        if name.is_empty() {
            break;
        }
        let value = r.cstr_utf8()?;
        if params.len() >= MAX_STARTUP_PARAMS {
            return Err(WireError::Malformed("too many startup parameters"));
        }
        params.push((name.to_string(), value.to_string()));
    }
    if r.remaining() != 0 {
        return Err(WireError::Malformed("trailing bytes after startup parameters"));
    }
    Ok(params)
}

/// Encodes a StartupMessage (used towards servers and in tests).
pub fn startup_message(buf: &mut BytesMut, params: &[(&str, &str)]) {
    let at = buf.len();
    buf.extend_from_slice(&[0, 0, 0, 0]);
    buf.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
    for (k, v) in params {
        buf.extend_from_slice(k.as_bytes());
        buf.extend_from_slice(&[0]);
        buf.extend_from_slice(v.as_bytes());
        buf.extend_from_slice(&[0]);
    }
    buf.extend_from_slice(&[0]);
    let len = i32::try_from(buf.len() - at).expect("startup packet too large");
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Encodes a CancelRequest.
pub fn cancel_request(pid: i32, secret: i32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&16i32.to_be_bytes());
    out[4..8].copy_from_slice(&CANCEL_REQUEST.to_be_bytes());
    out[8..12].copy_from_slice(&pid.to_be_bytes());
    out[12..].copy_from_slice(&secret.to_be_bytes());
    out
}

/// Splits `options` ("-c a=b -c c=d", "--a=b") into (name, value) settings.
/// Backslash escapes a space as in libpq.
pub fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next()
        } else if let Some(rest) = w.strip_prefix("-c") {
            Some(rest.to_string())
        } else {
            w.strip_prefix("--").map(str::to_string)
        };
        if let Some(s) = setting {
            if let Some((k, v)) = s.split_once('=') {
                out.push((k.replace('-', "_"), v.to_string()));
            }
        }
    }
    out
}
