//! Encoders for the messages pgfleet writes itself. Each appends one whole
//! message to a buffer; lengths are back-patched with checked conversions.

use bytes::{BufMut, BytesMut};

/// Starts a typed message; returns the offset of its length field.
fn begin(buf: &mut BytesMut, tag: u8) -> usize {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    at
}

fn finish(buf: &mut BytesMut, at: usize) {
    let len = i32::try_from(buf.len() - at).expect("message larger than 2 GiB");
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn cstr(buf: &mut BytesMut, s: &[u8]) {
    buf.put_slice(s);
    buf.put_u8(0);
}

/// ErrorResponse ('E') or NoticeResponse ('N') with severity, code and message.
pub fn error_response(buf: &mut BytesMut, severity: &str, code: &str, message: &str) {
    notice_like(buf, b'E', severity, code, message, None);
}

pub fn error_with_detail(buf: &mut BytesMut, code: &str, message: &str, detail: &str) {
    notice_like(buf, b'E', "ERROR", code, message, Some(detail));
}

pub fn notice_response(buf: &mut BytesMut, code: &str, message: &str) {
    notice_like(buf, b'N', "NOTICE", code, message, None);
}

fn notice_like(
    buf: &mut BytesMut,
    tag: u8,
    severity: &str,
    code: &str,
    message: &str,
    detail: Option<&str>,
) {
    let at = begin(buf, tag);
    buf.put_u8(b'S');
    cstr(buf, severity.as_bytes());
    buf.put_u8(b'V');
    cstr(buf, severity.as_bytes());
    buf.put_u8(b'C');
    cstr(buf, code.as_bytes());
    buf.put_u8(b'M');
    cstr(buf, message.as_bytes());
    if let Some(d) = detail {
        buf.put_u8(b'D');
        cstr(buf, d.as_bytes());
    }
    buf.put_u8(0);
    finish(buf, at);
}

/// An ErrorResponse built from raw (code, value) fields, e.g. one a server sent.
pub fn error_from_fields(buf: &mut BytesMut, fields: &[(u8, String)]) {
    let at = begin(buf, b'E');
    for (code, value) in fields {
        buf.put_u8(*code);
        cstr(buf, value.as_bytes());
    }
    buf.put_u8(0);
    finish(buf, at);
}

pub fn auth_ok(buf: &mut BytesMut) {
    auth_code(buf, 0, &[]);
}

pub fn auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    auth_code(buf, 5, &salt);
}

pub fn auth_cleartext(buf: &mut BytesMut) {
    auth_code(buf, 3, &[]);
}

pub fn auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    let at = begin(buf, b'R');
    buf.put_i32(10);
    for m in mechanisms {
        cstr(buf, m.as_bytes());
    }
    buf.put_u8(0);
    finish(buf, at);
}

pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    auth_code(buf, 11, data);
}

pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    auth_code(buf, 12, data);
}

fn auth_code(buf: &mut BytesMut, code: i32, data: &[u8]) {
    let at = begin(buf, b'R');
    buf.put_i32(code);
    buf.put_slice(data);
    finish(buf, at);
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    let at = begin(buf, b'S');
    cstr(buf, name.as_bytes());
    cstr(buf, value.as_bytes());
    finish(buf, at);
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    let at = begin(buf, b'K');
    buf.put_i32(pid);
    buf.put_i32(secret);
    finish(buf, at);
}

/// NegotiateProtocolVersion: the newest version pgfleet speaks (3.0) and
/// the protocol options (`_pq_.*`) it does not know.
pub fn negotiate_protocol_version(buf: &mut BytesMut, options: &[String]) {
    let at = begin(buf, b'v');
    buf.put_i32(super::startup::PROTOCOL_3_0);
    buf.put_i32(options.len() as i32);
    for o in options {
        buf.put_slice(o.as_bytes());
        buf.put_u8(0);
    }
    finish(buf, at);
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    let at = begin(buf, b'Z');
    buf.put_u8(status);
    finish(buf, at);
}

pub fn parse_complete(buf: &mut BytesMut) {
    let at = begin(buf, b'1');
    finish(buf, at);
}

pub fn close_complete(buf: &mut BytesMut) {
    let at = begin(buf, b'3');
    finish(buf, at);
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    let at = begin(buf, b'C');
    cstr(buf, tag.as_bytes());
    finish(buf, at);
}

/// RowDescription with text columns (used by virtual answers such as SHOW).
pub fn row_description(buf: &mut BytesMut, columns: &[&str]) {
    let at = begin(buf, b'T');
    buf.put_i16(i16::try_from(columns.len()).expect("too many columns"));
    for c in columns {
        cstr(buf, c.as_bytes());
        buf.put_i32(0); // table oid
        buf.put_i16(0); // column number
        buf.put_i32(25); // text
        buf.put_i16(-1);
        buf.put_i32(-1);
        buf.put_i16(0); // text format
    }
    finish(buf, at);
}

pub fn data_row(buf: &mut BytesMut, values: &[Option<&str>]) {
    let at = begin(buf, b'D');
    buf.put_i16(i16::try_from(values.len()).expect("too many columns"));
    for v in values {
        match v {
            Some(s) => {
                buf.put_i32(i32::try_from(s.len()).expect("value too large"));
                buf.put_slice(s.as_bytes());
            }
            None => buf.put_i32(-1),
        }
    }
    finish(buf, at);
}

// ---- frontend messages pgfleet sends to servers ----

pub fn query(buf: &mut BytesMut, sql: &str) {
    let at = begin(buf, b'Q');
    cstr(buf, sql.as_bytes());
    finish(buf, at);
}

/// Parse with a given statement name and the original content (query text +
/// parameter types, exactly as the client sent them).
pub fn parse(buf: &mut BytesMut, name: &[u8], content: &[u8]) {
    let at = begin(buf, b'P');
    cstr(buf, name);
    buf.put_slice(content);
    finish(buf, at);
}

/// Describe or Close of a statement/portal.
pub fn target(buf: &mut BytesMut, tag: u8, kind: u8, name: &[u8]) {
    let at = begin(buf, tag);
    buf.put_u8(kind);
    cstr(buf, name);
    finish(buf, at);
}

/// Bind with the statement name replaced; `tail` is everything after the
/// original statement name.
pub fn bind(buf: &mut BytesMut, portal: &[u8], stmt: &[u8], tail: &[u8]) {
    let at = begin(buf, b'B');
    cstr(buf, portal);
    cstr(buf, stmt);
    buf.put_slice(tail);
    finish(buf, at);
}

pub fn sync(buf: &mut BytesMut) {
    let at = begin(buf, b'S');
    finish(buf, at);
}

pub fn terminate(buf: &mut BytesMut) {
    let at = begin(buf, b'X');
    finish(buf, at);
}

/// Quotes a string as a SQL literal ('' doubling). As PostgreSQL's
/// quote_literal, a value with a backslash becomes an E'' string: the same
/// value whatever standard_conforming_strings the connection has (a client
/// may have turned it off).
pub fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    if s.contains('\\') {
        out.push('E');
    }
    out.push('\'');
    for c in s.chars() {
        if c == '\'' || c == '\\' {
            out.push(c);
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// Quotes an identifier ("" doubling).
pub fn quote_ident(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

pub fn bind_complete(buf: &mut BytesMut) {
    let at = begin(buf, b'2');
    finish(buf, at);
}

pub fn no_data(buf: &mut BytesMut) {
    let at = begin(buf, b'n');
    finish(buf, at);
}

/// ParameterDescription with no parameters.
pub fn no_parameters(buf: &mut BytesMut) {
    let at = begin(buf, b't');
    buf.put_i16(0);
    finish(buf, at);
}

/// RowDescription with given type OIDs (values are still sent as text).
pub fn row_description_typed(buf: &mut BytesMut, columns: &[(&str, u32)]) {
    let at = begin(buf, b'T');
    buf.put_i16(i16::try_from(columns.len()).expect("too many columns"));
    for (name, oid) in columns {
        cstr(buf, name.as_bytes());
        buf.put_i32(0);
        buf.put_i16(0);
        buf.put_u32(*oid);
        buf.put_i16(match oid {
            23 => 4,
            20 => 8,
            _ => -1,
        });
        buf.put_i32(-1);
        buf.put_i16(0);
    }
    finish(buf, at);
}
