//! Pure PostgreSQL v3 wire codec: framing, startup packets, message builders,
//! SQLSTATEs and password verifiers. No tokio and no I/O: bytes in, messages
//! out. Every decoder checks lengths before allocating and treats "not enough
//! bytes yet" as `Ok(None)`, never as an error.

pub mod auth;
pub mod build;
pub mod startup;

use bytes::{Buf, Bytes, BytesMut};

/// SQLSTATE codes pgfleet itself emits.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const CONNECTION_EXCEPTION: &str = "08000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const QUERY_CANCELED: &str = "57014";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const INTERNAL_ERROR: &str = "XX000";
    pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
    pub const UNDEFINED_PREPARED_STATEMENT: &str = "26000";
    pub const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
    pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    pub const UNDEFINED_OBJECT: &str = "42704";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const CONFIG_FILE_ERROR: &str = "F0000";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const CHARACTER_NOT_IN_REPERTOIRE: &str = "22021";
    pub const LOCK_NOT_AVAILABLE: &str = "55P03";
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
}

/// Why a byte stream could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// A length field below the minimum the protocol allows.
    BadLength(i64),
    /// A message longer than the configured limit.
    TooLarge { len: usize, max: usize },
    /// A message whose body does not have the shape its type requires.
    Malformed(&'static str),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::BadLength(l) => write!(f, "invalid message length {l}"),
            WireError::TooLarge { len, max } => {
                write!(f, "message of {len} bytes exceeds the limit of {max} bytes")
            }
            WireError::Malformed(what) => write!(f, "malformed message: {what}"),
        }
    }
}

impl std::error::Error for WireError {}

/// Header of a regular (typed) message found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// Whole message size in bytes, including tag and length field.
    pub total: usize,
}

/// Reads the header of the typed message at the start of `buf`.
/// `Ok(None)` when fewer than 5 bytes are buffered.
pub fn peek_header(buf: &[u8], max: usize) -> Result<Option<Header>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(WireError::BadLength(len as i64));
    }
    let len = len as usize;
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    Ok(Some(Header { tag: buf[0], total: len + 1 }))
}

/// Splits one complete typed message (tag + length + body) off the front of
/// `buf`. `Ok(None)` until the whole message is buffered.
pub fn split_message(buf: &mut BytesMut, max: usize) -> Result<Option<(u8, Bytes)>, WireError> {
    match peek_header(buf, max)? {
        Some(h) if buf.len() >= h.total => Ok(Some((h.tag, buf.split_to(h.total).freeze()))),
        _ => Ok(None),
    }
}

/// Body of a whole message (skips tag and length).
pub fn body(msg: &[u8]) -> &[u8] {
    &msg[5..]
}

/// Cursor over a message body with checked reads.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// A NUL-terminated string (without the NUL).
    pub fn cstr(&mut self) -> Result<&'a [u8], WireError> {
        let end = memchr0(self.buf).ok_or(WireError::Malformed("unterminated string"))?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    pub fn cstr_utf8(&mut self) -> Result<&'a str, WireError> {
        std::str::from_utf8(self.cstr()?).map_err(|_| WireError::Malformed("invalid UTF-8"))
    }

    pub fn u8(&mut self) -> Result<u8, WireError> {
        if self.buf.is_empty() {
            return Err(WireError::Malformed("truncated message"));
        }
        let v = self.buf[0];
        self.buf = &self.buf[1..];
        Ok(v)
    }

    pub fn i16(&mut self) -> Result<i16, WireError> {
        if self.buf.len() < 2 {
            return Err(WireError::Malformed("truncated message"));
        }
        let mut b = self.buf;
        let v = b.get_i16();
        self.buf = b;
        Ok(v)
    }

    pub fn i32(&mut self) -> Result<i32, WireError> {
        if self.buf.len() < 4 {
            return Err(WireError::Malformed("truncated message"));
        }
        let mut b = self.buf;
        let v = b.get_i32();
        self.buf = b;
        Ok(v)
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Malformed("truncated message"));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

/// Position of the first NUL: `CStr`'s search goes a word at a time (a
/// byte loop was a visible share of every Parse).
pub fn memchr0(buf: &[u8]) -> Option<usize> {
    std::ffi::CStr::from_bytes_until_nul(buf).ok().map(|c| c.to_bytes().len())
}

/// Parse ('P') without validating what follows the name: (name, rest).
/// For the looks at a Parse before the one that forwards it (which uses
/// `parse_parse` and so rejects a malformed message).
pub fn parse_parse_name(msg: &[u8]) -> Result<(&[u8], &[u8]), WireError> {
    let mut r = Reader::new(body(msg));
    let name = r.cstr()?;
    Ok((name, r.rest()))
}

/// Parse ('P'): statement name, then the rest (query text + parameter types),
/// which identifies the statement's content.
pub fn parse_parse(msg: &[u8]) -> Result<(&[u8], &[u8]), WireError> {
    let (name, rest) = parse_parse_name(msg)?;
    // Validate the rest: query string, then i16 count and that many i32s.
    let mut v = Reader::new(rest);
    v.cstr()?;
    let n = v.i16()?;
    if n < 0 || v.remaining() != n as usize * 4 {
        return Err(WireError::Malformed("bad parameter type count in Parse"));
    }
    Ok((name, rest))
}

/// Bind ('B'): (portal, statement, offset of the bytes after the statement name).
pub fn parse_bind(msg: &[u8]) -> Result<(&[u8], &[u8], usize), WireError> {
    let b = body(msg);
    let mut r = Reader::new(b);
    let portal = r.cstr()?;
    let stmt = r.cstr()?;
    let off = 5 + b.len() - r.remaining();
    Ok((portal, stmt, off))
}

/// Describe ('D') and Close ('C'): kind byte ('S' or 'P') and name.
pub fn parse_target(msg: &[u8]) -> Result<(u8, &[u8]), WireError> {
    let mut r = Reader::new(body(msg));
    let kind = r.u8()?;
    if kind != b'S' && kind != b'P' {
        return Err(WireError::Malformed("Describe/Close target must be 'S' or 'P'"));
    }
    let name = r.cstr()?;
    Ok((kind, name))
}

/// Fields of an ErrorResponse or NoticeResponse body: (code, value) pairs.
pub fn error_fields(msg: &[u8]) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut r = Reader::new(body(msg));
    while let Ok(code) = r.u8() {
        if code == 0 {
            break;
        }
        match r.cstr() {
            Ok(v) => out.push((code, String::from_utf8_lossy(v).into_owned())),
            Err(_) => break,
        }
    }
    out
}

/// The value of field `code` (b'C' SQLSTATE, b'M' message, ...) among
/// `error_fields`.
pub fn error_field(fields: &[(u8, String)], code: u8) -> Option<&str> {
    fields.iter().find(|(c, _)| *c == code).map(|(_, v)| v.as_str())
}

/// ParameterStatus ('S') body: name and value.
pub fn parse_parameter_status(msg: &[u8]) -> Result<(&str, &str), WireError> {
    let mut r = Reader::new(body(msg));
    Ok((r.cstr_utf8()?, r.cstr_utf8()?))
}

#[cfg(test)]
mod tests;
