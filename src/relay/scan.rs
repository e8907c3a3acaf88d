//! Server -> client direction: walk the server's bytes message by message,
//! forward them (streaming large messages without buffering them whole),
//! and keep the expected-response queue, transaction status, parameters and
//! prepared-statement cache in step with what the server did.

use super::expect::{Kind, Pending};
use super::retry::WhileRecording;
use super::{Session, SessionError, MAX_SERVER_MSG};
use crate::backend::consume;
use crate::wire;
use std::sync::Arc;

/// What pgfleet needs to know about one server message before forwarding it.
enum Seen {
    Ready(u8),
    Param(String, String),
    Error(Vec<(u8, String)>),
    Other,
}

impl Session {
    /// Processes as many server bytes as are available.
    pub(super) fn scan_server(&mut self) -> Result<(), SessionError> {
        let before = self.cout.len();
        let r = self.scan_messages();
        let after = self.cout.len();
        self.count_sent(after.saturating_sub(before));
        r
    }

    fn scan_messages(&mut self) -> Result<(), SessionError> {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(self.sin.len());
                if n == 0 {
                    return Ok(());
                }
                self.cout.extend_from_slice(&self.sin[..n]);
                consume(&mut self.sin, n);
                self.skip -= n;
                continue;
            }
            self.emit_synth();
            let h = match wire::peek_header(&self.sin, MAX_SERVER_MSG)
                .map_err(|e| SessionError::ServerLost(format!("bad server message: {e}")))?
            {
                Some(h) => h,
                None => return Ok(()),
            };
            let swallowing = matches!(self.expect.front(), Some(Pending::Swallow(_)));
            let recording = self.recording();
            let whole = swallowing || matches!(h.tag, b'Z' | b'S' | b'E') || (recording && h.tag == b'N');
            if whole && self.sin.len() < h.total {
                return Ok(());
            }
            match self.while_recording(h.tag, &self.sin[..h.total.min(self.sin.len())]) {
                WhileRecording::Forward => {}
                WhileRecording::Drop => {
                    consume(&mut self.sin, h.total);
                    continue;
                }
                WhileRecording::Lost(why) => return Err(SessionError::ServerLost(why)),
            }
            let seen = match h.tag {
                b'Z' if h.total == 6 => Seen::Ready(self.sin[5]),
                b'Z' => return Err(SessionError::ServerLost("bad server message: ReadyForQuery of the wrong length".into())),
                b'S' => match wire::parse_parameter_status(&self.sin[..h.total]) {
                    Ok((k, v)) => Seen::Param(k.to_string(), v.to_string()),
                    Err(_) => Seen::Other,
                },
                b'E' => Seen::Error(wire::error_fields(&self.sin[..h.total])),
                _ => Seen::Other,
            };
            let forward = self.observe(h.tag, seen);
            if forward && !matches!(h.tag, b'S' | b'N') {
                self.answered();
            }
            if !forward {
                consume(&mut self.sin, h.total);
            } else if self.recording() && matches!(h.tag, b'S' | b'N') && self.sin.len() >= h.total {
                self.held.extend_from_slice(&self.sin[..h.total]);
                consume(&mut self.sin, h.total);
            } else if whole || self.sin.len() >= h.total {
                // All here: copied now (only a partial message is streamed).
                self.cout.extend_from_slice(&self.sin[..h.total]);
                consume(&mut self.sin, h.total);
            } else {
                self.skip = h.total;
            }
        }
    }

    /// Updates session state for one server message; returns whether the
    /// client should see it.
    fn observe(&mut self, tag: u8, seen: Seen) -> bool {
        let head = self.expect.front();
        let hidden_query = head == Some(Pending::Swallow(Kind::Query));
        match seen {
            Seen::Param(name, value) => {
                self.on_parameter(name, value);
                true
            }
            Seen::Error(fields) => {
                // An error ends COPY IN mode: the server now discards
                // messages up to the client's next Sync, which it answers
                // (so that Sync is accounted as any other).
                self.copy_in = false;
                self.copy_in_ext = false;
                self.on_error(head, fields)
            }
            Seen::Ready(status) => {
                self.copy_in = false;
                self.copy_in_ext = false;
                self.status = status;
                // Idle (in transaction, or at all) counts from here: a
                // long statement is the client being served, not idle.
                self.last_client_activity = self.now;
                let (ended, skipped) = self.expect.complete_cycle();
                self.skipped(skipped);
                if matches!(ended, Some(Pending::Fwd(_))) {
                    self.replay_state = super::Replay::Off; // the unit is over
                    self.count_cycle_end(status);
                }
                // Once nothing sent after the DDL is pending (a unit queued
                // behind it may be the one that runs it).
                if status == b'I' && self.catalog_ddl && self.expect.is_empty() {
                    self.catalog_ddl = false;
                    self.app.functions_changed(&self.database);
                }
                if matches!(ended, Some(Pending::Swallow(Kind::Query))) {
                    self.probe = None;
                }
                !matches!(ended, Some(Pending::Swallow(_)))
            }
            Seen::Other => {
                match tag {
                    b'G' => self.copy_in = true,
                    b'C' => self.copy_in = false,
                    _ => {}
                }
                if tag == b'G' && head == Some(Pending::Fwd(Kind::Execute)) {
                    self.expect.drop_queued_syncs();
                    self.copy_in_ext = true;
                    self.in_batch = true;
                }
                if tag == b'D' && hidden_query && self.probing() {
                    let len = i32::from_be_bytes([self.sin[1], self.sin[2], self.sin[3], self.sin[4]]) as usize;
                    let row = self.sin[..1 + len].to_vec();
                    self.on_probe_row(&row);
                }
                let forward = match head {
                    // A NotificationResponse is the client's whatever query
                    // it arrives during (PostgreSQL sends it at the end of
                    // any transaction, our hidden probes included); notices
                    // are the client's unless our own query caused them.
                    Some(Pending::Swallow(_)) => tag == b'A' || (tag == b'N' && !hidden_query),
                    _ => true,
                };
                if tag == b'C' && head == Some(Pending::Fwd(Kind::Query)) {
                    self.statement_done(); // one of a Query's statements
                }
                if let Some(Pending::Fwd(k) | Pending::Swallow(k)) = head {
                    if k.completed_by(tag) {
                        self.expect.pop();
                        if k == Kind::Execute {
                            self.statement_done();
                        }
                        if let (Some(Pending::Swallow(_)), Kind::Parse(Some(id)) | Kind::Close(Some(id))) = (head, k) {
                            self.settle(id);
                        }
                        if let Kind::Parse(Some(id)) = k {
                            self.mark_validated(id);
                            if matches!(head, Some(Pending::Fwd(_))) {
                                self.parsing.pop_front(); // the client's name now exists
                            }
                        }
                    }
                }
                forward
            }
        }
    }

    fn mark_validated(&self, id: u64) {
        if let Some(stmt) = self.stmts.values().find(|s| s.id == id) {
            stmt.validated.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// ParameterStatus: the server's value changed (a client SET, or pgfleet
    /// bringing the connection in line). The client's view follows it.
    fn on_parameter(&mut self, name: String, value: String) {
        if name.eq_ignore_ascii_case("standard_conforming_strings") {
            self.backslash_strings = value.eq_ignore_ascii_case("off");
        }
        if name.eq_ignore_ascii_case("client_encoding") {
            self.two_byte_backslash = super::state::backslash_trail_encoding(&value);
        }
        if let Some(server) = self.server.as_mut() {
            server.params.insert(name.clone(), value.clone());
        }
        if let Some(i) = self.settings.iter().position(|(n, _)| *n == name) {
            if self.settings[i].1 != value {
                // Copy on write: the list may be shared with other clients.
                Arc::make_mut(&mut self.settings)[i].1 = value;
                self.settings_changed();
            }
        }
        // The server now carries exactly this client's settings.
        if let Some(server) = self.server.as_mut() {
            server.settings_fp = self.settings_fp;
        }
    }

    fn on_error(&mut self, head: Option<Pending>, fields: Vec<(u8, String)>) -> bool {
        if let Some(code) = wire::error_field(&fields, b'C') {
            if !matches!(head, Some(Pending::Swallow(Kind::Query) | Pending::Abort)) {
                self.app.metrics.errors.with_label_values(&[code]).inc();
            }
        }
        match head {
            Some(Pending::Swallow(Kind::Query)) => {
                let msg = fields.iter().find(|(c, _)| *c == b'M').map(|(_, m)| m.as_str());
                tracing::warn!(parent: &self.span, error = msg.unwrap_or(""), "a hidden state check failed on the server");
                if let Some(probe) = self.probe.take() {
                    self.probe_failed(probe);
                }
                false
            }
            Some(Pending::Abort) => {
                self.skip_to_sync();
                false
            }
            Some(Pending::Fwd(k) | Pending::Swallow(k)) if k.is_extended() => {
                if let Kind::Bind(Some(id)) | Kind::Describe(Some(id)) = k {
                    if stale_plan(&fields) {
                        self.retire_statement(id);
                    }
                }
                self.skip_to_sync();
                true
            }
            _ => true,
        }
    }

    /// The server's plan of shared statement `id` no longer fits its
    /// tables: DDL changed its result type, and PostgreSQL answers every
    /// Bind of it with 0A000 until it is prepared anew. The client's own
    /// name keeps failing, as on PostgreSQL (its driver may have cached
    /// the old result description), but the text is forgotten, so a
    /// client that prepares it again, as drivers do after this error, gets
    /// a new statement that each connection plans afresh instead of the
    /// same stale plan.
    fn retire_statement(&mut self, id: u64) {
        if let Some(stmt) = self.stmts.values().find(|s| s.id == id) {
            tracing::info!(parent: &self.span, statement = %String::from_utf8_lossy(&stmt.server_name), "cached plan must not change result type: the statement is prepared anew at its next Parse");
            self.app.stmts.retire(stmt);
        }
    }

    /// The server skips to the next Sync after an error: so does the queue.
    /// With that Sync not sent yet, so do the client's messages that come
    /// before it: the server would ignore them, and pgfleet must not answer
    /// any itself (a ParseComplete for SQL the connection has, 42P05, a
    /// virtual statement) where PostgreSQL sends nothing.
    fn skip_to_sync(&mut self) {
        let skipped = self.expect.skip_to_sync();
        self.skipped(skipped);
        if self.expect.is_empty() {
            self.discard_to_sync = true;
        }
    }

    /// Messages the server skipped: what they would have created does not exist.
    fn skipped(&mut self, skipped: super::expect::Skipped) {
        // The same statement evicted and prepared among the skipped ones
        // (a small cache): whether it is there depends on which of them ran
        // before. Not guessed: re-read from the server at the end of the
        // transaction.
        if skipped.not_prepared.iter().any(|id| skipped.not_closed.contains(id)) {
            self.resync_prepared = true;
        }
        for id in skipped.not_prepared.iter().chain(&skipped.not_closed) {
            self.settle(*id);
        }
        if let Some(server) = self.server.as_mut() {
            for id in skipped.not_prepared {
                server.prepared.remove(&id);
            }
            // An eviction the server skipped: the statement is still there
            // (its name taken). Back in the cache as the least recently
            // used, so the next Parse evicts it again.
            for id in skipped.not_closed {
                server.prepared.insert(id, 0);
            }
        }
        self.undo_names(skipped.client_parses, skipped.client_closes);
    }

    /// The client's oldest `parses` unanswered named Parses and `closes`
    /// Closes did not happen after all (the server skipped them after an
    /// error, or a read retry sends them again). Undone newest first, so a
    /// name parsed then closed among them is gone, and one closed then
    /// parsed again is back as it was, as on PostgreSQL; a name a later
    /// Parse took keeps that one.
    pub(super) fn undo_names(&mut self, parses: usize, closes: usize) {
        enum Undo {
            Parse(bytes::Bytes, Option<u64>),
            Close(bytes::Bytes, super::Closed),
        }
        let mut undo = Vec::with_capacity(parses + closes);
        for (name, id, _, seq) in self.parsing.drain(..parses.min(self.parsing.len())) {
            undo.push((seq, Undo::Parse(name, id)));
        }
        for (name, closed, seq) in self.closing.drain(..closes.min(self.closing.len())) {
            undo.push((seq, Undo::Close(name, closed)));
        }
        undo.sort_unstable_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        for (_, u) in undo {
            match u {
                // The name does not exist (unless a later Parse took it).
                Undo::Parse(name, Some(id)) => {
                    if self.stmts.get(&name).is_some_and(|s| s.id == id) {
                        self.stmts.remove(&name);
                    }
                }
                Undo::Parse(name, None) => {
                    self.virtuals.remove(&name);
                }
                // The name is back (unless a later Parse took it).
                Undo::Close(name, super::Closed::Statement(s)) => {
                    self.stmts.entry(name).or_insert(s);
                }
                Undo::Close(name, super::Closed::Virtual(v)) => {
                    self.virtuals.entry(name).or_insert(v);
                }
                Undo::Close(_, super::Closed::Nothing) => {}
            }
        }
    }
}

/// PostgreSQL's "cached plan must not change result type" (0A000 from
/// RevalidateCachedQuery; the routine name is not translated, the message
/// may be).
fn stale_plan(fields: &[(u8, String)]) -> bool {
    let field = |c: u8| wire::error_field(fields, c);
    field(b'C') == Some("0A000")
        && (field(b'R') == Some("RevalidateCachedQuery") || field(b'M').is_some_and(|m| m.contains("cached plan must not change result type")))
}
