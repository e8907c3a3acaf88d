//! Session state a client builds with SQL in transaction mode: tracked
//! `SET`s, session-only features that pin the client to its server
//! connection (or are rejected, as configured), and DEALLOCATE/DISCARD ALL.
//!
//! How SETs are tracked: the classifier names the settings a statement may
//! change; when the transaction that ran it ends, one swallowed query reads
//! their values back (`current_setting(name, true)`) before the connection
//! is released. That is exact whatever happened in between (SET LOCAL,
//! ROLLBACK, errors, RESET ALL), and costs a round trip only for
//! transactions that changed settings. Reported parameters (TimeZone, ...)
//! need no probe: their ParameterStatus messages already update the client.

use super::{Session, REPORTED_SETTABLE};
use crate::config::SessionStateMode;
use crate::router::Analysis;
use crate::wire::{self, build, Reader};
use bytes::Bytes;

/// What the end-of-transaction probe asks for, in column order.
#[derive(Debug, Default)]
pub(super) struct Probe {
    names: Vec<String>,
    /// Re-read the proxy statements the connection has; Some(the
    /// connection's tick when the probe was sent): statements prepared after
    /// it (pipelined behind the probe) are kept.
    resync_prepared: Option<u64>,
    check_state: bool,
    /// Read-your-writes: the primary's WAL position after the write.
    pub(super) lsn: bool,
    /// The names of the connection's session settings (`opaque_settings`).
    session_names: bool,
    /// `names[guesses..]` are custom settings the code may have set: adopted
    /// only when set to something.
    guesses: usize,
    /// The startup settings it puts back after a RESET (`Session::resets`).
    resets: Vec<String>,
}

impl Probe {
    /// It reads back nothing of the client's session (settings, held
    /// state): only a write's position, or the connection's statements.
    pub(super) fn about_the_connection_only(&self) -> bool {
        self.names.is_empty() && !self.check_state && !self.session_names && self.resets.is_empty()
    }
}

/// Session state still held by the server connection, as one count.
/// Every name qualified: a client's `search_path` may put its own schema
/// before pg_catalog, and a `count` or `+` of its own must not make held
/// state look gone (the client would be unpinned with a lock held).
const HELD_STATE_SQL: &str = "((SELECT pg_catalog.count(*) FROM pg_catalog.pg_listening_channels()) \
     OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks \
         WHERE locktype OPERATOR(pg_catalog.=) 'advisory' AND pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()) \
     OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_cursors WHERE is_holdable) \
     OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql) \
     OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_class WHERE relnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()) \
     OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_proc WHERE pronamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()) \
     OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_type WHERE typnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()))::pg_catalog.text";

/// The settings the session itself set (SET, set_config), by name.
const SESSION_NAMES_SQL: &str = "(SELECT coalesce(pg_catalog.string_agg(name, ','), '') \
     FROM pg_catalog.pg_settings WHERE source OPERATOR(pg_catalog.=) 'session')";

const OUR_STATEMENTS_SQL: &str = "(SELECT coalesce(pg_catalog.string_agg(name, ','), '') \
     FROM pg_catalog.pg_prepared_statements WHERE name OPERATOR(pg_catalog.~~) '\\_pgf\\_%')";

/// Appends the names `list` does not have yet.
pub(super) fn add_names(list: &mut Vec<String>, names: impl IntoIterator<Item = String>) {
    for n in names {
        if !list.contains(&n) {
            list.push(n);
        }
    }
}

fn is_reported(name: &str) -> bool {
    REPORTED_SETTABLE.iter().any(|r| r.eq_ignore_ascii_case(name))
}

/// The probe column for a startup setting the transaction may have RESET:
/// its value, after putting the client's start value back if the RESET
/// took effect. A built-in setting was reset when its source is no longer
/// `session` (a SET after the RESET, or a rollback, leaves it `session`); a
/// custom one (not in pg_settings) when it is empty, its reset value on a
/// connection that did not start with it.
fn reset_to_start(name: &str, start: &str) -> String {
    let (n, v) = (build::quote_literal(name), build::quote_literal(start));
    let reset = if name.contains('.') {
        format!("coalesce(pg_catalog.current_setting({n}, true), '') = ''")
    } else {
        format!(
            "(SELECT s.source FROM pg_catalog.pg_settings s WHERE pg_catalog.lower(s.name) = pg_catalog.lower({n})) IS DISTINCT FROM 'session'"
        )
    };
    format!("CASE WHEN {reset} THEN pg_catalog.set_config({n}, {v}, false) ELSE pg_catalog.current_setting({n}, true) END")
}

/// A statement that raises 0A000 on the server, replacing one pgfleet rejects:
/// the server then fails the transaction exactly as the client expects.
pub fn rejection_sql(reason: &str) -> String {
    let msg = format!("{reason} is not supported in transaction pooling mode");
    let hint = "pgfleet would have to pin this client to one server connection; set pool.session_state = \"pin\" or use pool.mode = \"session\"";
    format!(
        "DO $pgfleet$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = {}, HINT = {}; END$pgfleet$",
        build::quote_literal(&msg),
        build::quote_literal(hint)
    )
}

impl Session {
    /// Records what a statement does to session state. Returns the SQL to
    /// send instead when the statement is rejected.
    pub(super) fn note_effects(&mut self, a: &Analysis) -> Option<String> {
        if a.local_search_path || a.reset_all || a.set_names.iter().any(|n| n == "search_path") {
            self.search_path_unsettled = true;
        }
        if let Some(reason) = a.pin {
            if self.cfg.pool.session_state == SessionStateMode::Reject {
                return Some(rejection_sql(reason));
            }
            self.pin(reason);
            self.pin_sticky |= a.sticky_pin;
            // Verify at transaction end that state is really held (a
            // pg_try_advisory_lock that got nothing must not pin).
            self.may_release = true;
        }
        for n in &a.set_names {
            if !is_reported(n) && !self.dirty.contains(n) {
                self.dirty.push(n.clone());
            }
        }
        if a.reset_all {
            for (n, _) in self.settings.iter() {
                if !is_reported(n) && !self.dirty.contains(n) {
                    self.dirty.push(n.clone());
                }
            }
        }
        // A RESET of a setting the client started with goes back to its
        // start value on PostgreSQL, not to the server connection's.
        if !self.startup.is_empty() && (a.reset_all || !a.reset_names.is_empty()) {
            let reset = self.startup.iter().filter(|(n, _)| a.reset_all || a.reset_names.iter().any(|r| r.eq_ignore_ascii_case(n)));
            add_names(&mut self.resets, reset.map(|(n, _)| n.clone()));
        }
        self.may_release |= a.may_release;
        // Unless it is going to fail: in a failed transaction (25P02), or
        // DISCARD ALL in a transaction block (25001).
        let fails = a.statements == 1
            && (self.in_failed_transaction() || (self.status == b'T' && self.expect.is_empty() && a.reset_all));
        // Whatever happens, re-read what the connection still has (a
        // DEALLOCATE of one of pgfleet's own statements by name, too).
        if a.dealloc_all || a.deallocate.as_deref().is_some_and(|n| n.as_bytes().starts_with(super::stmts::PREFIX)) {
            self.resync_prepared = true;
        }
        if a.dealloc_all && !fails {
            // Every prepared statement of the session is gone, the client's
            // protocol-level ones included; the probe re-reads what is left.
            if let Some(server) = self.server.as_mut() {
                server.prepared.clear();
            }
            self.stmts.clear();
            self.virtuals.clear();
            self.virtual_portals.clear();
        }
        None
    }

    pub(super) fn pin(&mut self, reason: &'static str) {
        if self.pinned.is_none() {
            tracing::info!(parent: &self.span, reason, "client pinned to its server connection");
            self.app.pinned_clients.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.pinned = Some(reason);
    }

    pub(super) fn unpin(&mut self) {
        self.pin_sticky = false;
        if self.pinned.take().is_some() {
            self.app.pinned_clients.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(parent: &self.span, "client unpinned");
        }
    }

    /// The swallowed query to run before releasing, if one is needed.
    pub(super) fn probe_sql(&mut self) -> Option<String> {
        let resets = std::mem::take(&mut self.resets);
        add_names(&mut self.dirty, resets.iter().cloned());
        // Whether session state is held: to unpin a client whose state may
        // be gone, and to pin one after code pgfleet cannot see into (DO,
        // CALL, the application's functions) that may have created some.
        let check_state = (self.pinned.is_some() && self.may_release && !self.pin_sticky) || (self.pinned.is_none() && self.opaque_settings);
        let lsn = std::mem::take(&mut self.wrote)
            && self.cfg.routing.read_your_writes == crate::config::ReadYourWrites::Lsn;
        let session_names = std::mem::take(&mut self.opaque_settings);
        let mut guesses = self.dirty.len();
        if session_names {
            // Re-read the client's own (they may have changed); the list
            // names the other built-in ones. Custom settings are not
            // listed: read those the code names (DO blocks, the
            // application's functions).
            for (n, _) in self.settings.iter() {
                if !is_reported(n) && !self.dirty.contains(n) {
                    self.dirty.push(n.clone());
                }
            }
            guesses = self.dirty.len();
            let mut candidates = std::mem::take(&mut self.opaque_names);
            // pg_settings does not list these two (GUC_NO_SHOW_ALL): a
            // SET ROLE in a DO block or a function would stay on the
            // connection for the next client, with this one's privileges.
            candidates.extend(["role".to_string(), "session_authorization".to_string()]);
            match self.app.catalogs.setting_names(&self.database) {
                Some(names) => candidates.extend(names.iter().cloned()),
                None => self.discard_conn = true,
            }
            add_names(&mut self.dirty, candidates);
        }
        if self.dirty.is_empty() && !self.resync_prepared && !check_state && !lsn && !session_names {
            return None;
        }
        let mut cols: Vec<String> = self
            .dirty
            .iter()
            // A start value comes back where a RESET may have run: one of
            // the client's, or one in code pgfleet cannot see into (a DO
            // block, a function), as on PostgreSQL.
            .map(|n| match (resets.contains(n) || (session_names && !is_reported(n))).then(|| self.startup.iter().find(|(s, _)| s == n)).flatten() {
                Some((_, start)) => reset_to_start(n, start),
                None => format!("pg_catalog.current_setting({}, true)", build::quote_literal(n)),
            })
            .collect();
        if self.resync_prepared {
            cols.push(OUR_STATEMENTS_SQL.into());
        }
        if check_state {
            cols.push(HELD_STATE_SQL.into());
        }
        if lsn {
            // Where the commit was inserted: with synchronous_commit off it
            // returns before its WAL is written (pg_current_wal_lsn). With
            // the page sizes, to read it as a record end (`wal_end`).
            cols.push(
                "pg_catalog.pg_current_wal_insert_lsn()::text || ' ' || pg_catalog.current_setting('wal_block_size') || ' ' || \
                 pg_catalog.pg_size_bytes(pg_catalog.current_setting('wal_segment_size'))::text"
                    .into(),
            );
        }
        if session_names {
            cols.push(SESSION_NAMES_SQL.into());
        }
        let resync_prepared = self.resync_prepared.then(|| self.server.as_ref().map_or(0, |s| s.tick));
        self.probe = Some(Probe { names: std::mem::take(&mut self.dirty), resync_prepared, check_state, lsn, session_names, guesses, resets });
        self.resync_prepared = false;
        self.may_release = false;
        Some(format!("SELECT {}", cols.join(", ")))
    }

    /// The probe failed on the server (a cancel that arrived late, the
    /// client's own statement_timeout): what it was to learn is asked
    /// again before the connection is released; a second failure closes
    /// the connection instead of returning it with state nobody knows of.
    pub(super) fn probe_failed(&mut self, probe: Probe) {
        self.probe_failures += 1;
        if self.probe_failures > 1 {
            tracing::warn!(parent: &self.span, "the state check failed twice: the server connection is closed, not reused");
            self.probe_failures = 0;
            self.discard_conn = true;
            if probe.lsn {
                self.floor_unknown_since = Some(std::time::Instant::now());
            }
            return;
        }
        let mut names = probe.names;
        // Custom settings opaque code may have set (pg_settings does not
        // list them: they are named again for the next try).
        add_names(&mut self.opaque_names, names.split_off(probe.guesses.min(names.len())));
        add_names(&mut self.dirty, names);
        add_names(&mut self.resets, probe.resets);
        self.resync_prepared |= probe.resync_prepared.is_some();
        self.wrote |= probe.lsn;
        self.opaque_settings |= probe.session_names;
        // A pinned client's state is checked again.
        self.may_release |= probe.check_state && self.pinned.is_some();
    }

    /// The probe's DataRow: adopt the values it reports.
    pub(super) fn on_probe_row(&mut self, msg: &[u8]) {
        let Some(probe) = self.probe.take() else { return };
        self.probe_failures = 0;
        let Some(values) = data_row(msg) else { return };
        let mut it = values.into_iter();
        for (i, name) in probe.names.into_iter().enumerate() {
            let value = it.next().flatten();
            if i >= probe.guesses && !self.settings.iter().any(|(n, _)| *n == name) {
                let login_own = match name.as_str() {
                    "role" => value.as_deref() == Some("none"),
                    "session_authorization" => value.as_deref() == Some(self.user.as_str()),
                    _ => false,
                };
                if login_own {
                    continue; // nothing to carry or reset
                }
                if value.as_deref().map_or(true, str::is_empty) {
                    // Not set (or set empty) by the code: nothing to carry.
                    // The connection's value is reset for the next client.
                    if let (Some(server), Some(v)) = (self.server.as_mut(), value) {
                        server.params.insert(name.clone(), v);
                        server.custom.insert(name);
                    }
                    continue;
                }
            }
            self.adopt_setting(name, value);
        }
        if let Some(since) = probe.resync_prepared {
            let list = it.next().flatten().unwrap_or_default();
            if let Some(server) = self.server.as_mut() {
                // Prepared after the probe was sent: the probe could not see them.
                server.prepared.retain(|_, tick| *tick > since);
                for id in list.split(',').filter_map(super::stmts::server_id) {
                    server.mark_prepared(id);
                }
            }
        }
        // Nothing held when the probe ran; but a statement sent after it
        // (a new lock, LISTEN, ...: `may_release` set again) may have taken
        // some, and the next probe decides.
        if probe.check_state {
            match (self.pinned.is_some(), it.next().flatten().as_deref()) {
                (true, Some("0")) if !self.may_release => self.unpin(),
                (false, Some(n)) if n != "0" => {
                    self.pin("session state created by a function, procedure or DO block (a temporary object, an advisory lock, LISTEN, a cursor, a prepared statement)");
                    self.may_release = true;
                }
                _ => {}
            }
        }
        if probe.lsn {
            if let Some(lsn) = it.next().flatten().as_deref().and_then(crate::topology::wal_end) {
                self.floor = Some(self.floor.unwrap_or(0).max(lsn));
            }
        }
        if probe.session_names {
            // Set out of pgfleet's sight (the client's own were re-read
            // above; reported ones come as ParameterStatus): read them next,
            // before the connection is released.
            let list = it.next().flatten().unwrap_or_default();
            for name in list.split(',').filter(|n| !n.is_empty()) {
                let known = |n: &String| n.eq_ignore_ascii_case(name);
                if !is_reported(name) && !self.settings.iter().any(|(n, _)| known(n)) && !self.dirty.iter().any(known) {
                    tracing::debug!(parent: &self.span, setting = name, "a setting changed out of sight follows the client");
                    self.dirty.push(name.to_string());
                }
            }
        }
    }

    /// The server now has `value` for `name`: it is the client's setting,
    /// and the connection must be reset for other clients.
    fn adopt_setting(&mut self, name: String, value: Option<String>) {
        if let Some(server) = self.server.as_mut() {
            match &value {
                Some(v) => {
                    server.params.insert(name.clone(), v.clone());
                    server.custom.insert(name.clone());
                }
                None => {
                    server.params.remove(&name);
                    server.custom.remove(&name);
                }
            }
        }
        let slot = self.settings.iter().position(|(n, _)| *n == name);
        match (slot, value) {
            // Moved last: settings are replayed in the order the client
            // last set them (a role after the authorization that resets it).
            (Some(i), Some(v)) if self.settings[i].1 != v => {
                let list = std::sync::Arc::make_mut(&mut self.settings);
                let (name, _) = list.remove(i);
                list.push((name, v));
            }
            (Some(_), Some(_)) => {}
            (None, Some(v)) => std::sync::Arc::make_mut(&mut self.settings).push((name, v)),
            (Some(i), None) => {
                std::sync::Arc::make_mut(&mut self.settings).remove(i);
            }
            (None, None) => {}
        }
        self.settings_changed();
        if let Some(server) = self.server.as_mut() {
            server.settings_fp = self.settings_fp;
        }
    }

    /// Whether the probe is what the server is answering now.
    pub(super) fn probing(&self) -> bool {
        self.probe.is_some()
    }
}

/// Text values of a DataRow.
fn data_row(msg: &[u8]) -> Option<Vec<Option<String>>> {
    let mut r = Reader::new(&msg[5..]);
    let n = r.i16().ok()?;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = r.i32().ok()?;
        if len < 0 {
            out.push(None);
        } else {
            out.push(Some(String::from_utf8_lossy(r.bytes(len as usize).ok()?).into_owned()));
        }
    }
    Some(out)
}

/// SQL text up to its NUL terminator: a Query body, or a Parse content
/// (query string, then parameter types). Clients may use any
/// client_encoding, so the text is not required to be UTF-8: classification
/// only needs the ASCII structure (borrowed, no copy, when it is UTF-8).
pub(super) fn sql_text(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    // Up to the first NUL (as PostgreSQL reads it); both the search and
    // `from_utf8` go a word at a time (the lossy conversion, only for
    // invalid text, goes byte by byte).
    let text = &bytes[..wire::memchr0(bytes).unwrap_or(bytes.len())];
    match std::str::from_utf8(text) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(text),
    }
}

/// Client encodings whose two-byte characters may end in 0x5C, the byte
/// of a backslash (PostgreSQL's names and aliases).
pub(super) fn backslash_trail_encoding(name: &str) -> bool {
    ["SJIS", "SHIFT_JIS_2004", "BIG5", "GBK", "GB18030", "JOHAB", "WIN932", "WIN936", "WIN950", "MSKANJI", "SHIFTJIS", "CP932", "CP936", "CP950"]
        .iter()
        .any(|e| name.trim().eq_ignore_ascii_case(e))
}

/// A non-ASCII byte right before a backslash, in the text up to its NUL.
pub(super) fn ambiguous_backslash(bytes: &[u8]) -> bool {
    let raw = &bytes[..wire::memchr0(bytes).unwrap_or(bytes.len())];
    raw.windows(2).any(|w| w[0] >= 0x80 && w[1] == b'\\')
}

/// Classifies SQL text as the client sent it (`sql_text`). In a client
/// encoding whose two-byte characters may end in 0x5C (SJIS, BIG5, GBK,
/// GB18030, JOHAB: `two_byte`), a non-ASCII byte right before a backslash
/// may be such a character: PostgreSQL, which converts before it reads the
/// SQL, sees a character there, pgfleet a backslash that may escape a quote
/// (`E'...'`, `standard_conforming_strings = off`) and hide what follows.
/// Such text runs on the primary and keeps the client on its connection.
pub(super) fn classify_text(bytes: &[u8], write_functions: &[String], backslash_strings: bool, two_byte: bool) -> crate::router::Analysis {
    let mut a = crate::router::classify_as(&sql_text(bytes), write_functions, backslash_strings);
    if two_byte && ambiguous_backslash(bytes) {
        a.class = crate::router::Class::Write;
        a.opaque = true;
        a.pin = a.pin.or(Some("text in an encoding whose characters may end in a backslash"));
        a.sticky_pin = true;
    }
    a
}

/// Parse content with the query text replaced, parameter types kept.
pub(super) fn replace_sql(content: &[u8], sql: &str) -> Bytes {
    let end = wire::memchr0(content).unwrap_or(content.len());
    let mut v = Vec::with_capacity(sql.len() + content.len() - end);
    v.extend_from_slice(sql.as_bytes());
    v.extend_from_slice(&content[end..]);
    Bytes::from(v)
}

#[cfg(test)]
mod tests {
    use super::sql_text;

    #[test]
    fn sql_text_reads_up_to_the_first_nul() {
        assert_eq!(sql_text(b"SELECT 1\0"), "SELECT 1");
        assert_eq!(sql_text(b"SELECT 1\0; DROP TABLE t\0"), "SELECT 1");
        assert_eq!(sql_text(b"SELECT 1"), "SELECT 1");
        assert_eq!(sql_text(b"SELECT '\xc3\xa9'\0"), "SELECT 'é'");
        // Invalid UTF-8 is replaced, not trusted.
        assert_eq!(sql_text(b"SELECT '\xff'\0"), "SELECT '\u{fffd}'");
    }

    #[test]
    fn a_two_byte_character_ending_in_a_backslash_is_not_trusted() {
        use crate::router::Class;
        // SJIS "ソ" is 83 5C: PostgreSQL reads one character and then the
        // closing quote, so this is a SELECT and a DELETE.
        let sjis = b"SELECT E'\x83\x5c' AS a; DELETE FROM t WHERE x = 'b'\0";
        let a = super::classify_text(sjis, &[], false, true);
        assert_eq!(a.class, Class::Write);
        assert!(a.sticky_pin && a.opaque);
        // SJIS "ﾃソ" (C3 83 5C) is valid UTF-8 too ("Ã\\"): the encoding
        // decides, not the bytes.
        let valid_utf8 = b"SELECT E'\xc3\x83\x5c'; SET search_path TO x; SELECT '\0";
        assert!(std::str::from_utf8(&valid_utf8[..valid_utf8.len() - 1]).is_ok());
        assert!(super::classify_text(valid_utf8, &[], false, true).sticky_pin);
        // A single-byte encoding (LATIN1 'C:\\Jos\xe9\\x'): no ambiguity.
        let latin1 = super::classify_text(b"SELECT 'C:\\Jos\xe9\\x'\0", &[], false, false);
        assert_eq!((latin1.class, latin1.sticky_pin), (Class::Read, false));
        assert!(super::backslash_trail_encoding("sjis") && super::backslash_trail_encoding("GB18030"));
        assert!(!super::backslash_trail_encoding("UTF8") && !super::backslash_trail_encoding("LATIN1"));
    }
}
