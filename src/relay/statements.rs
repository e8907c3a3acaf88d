//! Client statements in transaction mode: named Parse/Bind/Describe/Close
//! are rewritten to the shared proxy statements and prepared lazily on the
//! bound server connection (LRU, evicted with Close); what pgfleet answers
//! without a server (Parse/Close/Sync with nothing bound, DEALLOCATE).

use super::*;
use crate::router::TxControl;
use crate::wire::sqlstate;

const ABORTED: &str = "current transaction is aborted, commands ignored until end of transaction block";

impl Session {
    pub(super) fn intern(&self, content: &[u8]) -> Arc<Stmt> {
        let extra = &self.cfg.routing.write_functions;
        let (off, two_byte) = (self.backslash_strings, self.two_byte_backslash);
        let private;
        // Changed in this transaction, or text whose reading depends on the
        // client's encoding: this session's own statement.
        let search_path = if self.search_path_unsettled || (two_byte && state::ambiguous_backslash(content)) {
            private = format!("\0session {}", self.info.id);
            private.as_str()
        } else {
            self.settings.iter().find(|(n, _)| n == "search_path").map_or("", |(_, v)| v.as_str())
        };
        self.app.stmts.intern(&self.database, search_path, content, off, |c| state::classify_text(c, extra, off, two_byte))
    }

    pub(super) fn on_parse(&mut self, msg: &[u8], known: Option<Analysis>) -> Result<(), SessionError> {
        let (name, content) = wire::parse_parse(msg)?;
        self.in_batch = true;
        // Session mode: the client owns its connection, so its statement
        // names go through unchanged (its DEALLOCATE and DISCARD ALL then
        // mean what they say), as with PgBouncer.
        if !self.tracks_state() {
            self.send(msg, Some(Kind::Parse(None)));
            return Ok(());
        }
        let a = known.unwrap_or_else(|| self.analyze(content));
        self.note_write(a.class, a.catalog_ddl);
        // Rewritten when pgfleet rejects what it does (session_state = "reject").
        let rewritten = self.note_effects(&a).map(|sql| state::replace_sql(content, &sql));
        if name.is_empty() {
            let sent = match rewritten {
                Some(c) => {
                    let mut b = BytesMut::new();
                    build::parse(&mut b, name, &c);
                    b.freeze()
                }
                // Kept as a copy (a slice would pin the client's read
                // buffer); the same Parse again, as drivers repeat it, is
                // not copied again.
                None => match &self.unnamed {
                    Some((b, _)) if b[..] == msg[..] => b.clone(),
                    _ => Bytes::copy_from_slice(msg),
                },
            };
            self.send(&sent, Some(Kind::Parse(None)));
            self.unnamed = Some((sent, a));
            self.unnamed_here = true;
            return Ok(());
        }
        let stmt = self.intern(rewritten.as_deref().unwrap_or(content));
        let here = self.server.as_mut().expect("bound").touch_prepared(stmt.id) && self.settled(stmt.id);
        if here && self.in_failed_transaction() && a.tx != TxControl::End {
            // Answered here it would succeed, where PostgreSQL refuses it in
            // a failed transaction and creates no name.
            self.fail_locally(sqlstate::IN_FAILED_SQL_TRANSACTION, ABORTED);
            return Ok(());
        }
        let name = Bytes::copy_from_slice(name);
        self.stmts.insert(name.clone(), stmt.clone());
        self.name_seq += 1;
        self.parsing.push_back((name, Some(stmt.id), self.syncs_sent, self.name_seq));
        if here {
            self.expect.push(Pending::Synth(Synth::ParseComplete));
        } else {
            self.prepare_on_server(&stmt, false);
        }
        Ok(())
    }

    /// Whether a named Parse must fail with 42P05: the client has the name.
    /// A Parse of it still unanswered from an earlier batch may yet fail:
    /// not counted. One in this batch is: if it fails, the server skips
    /// this one anyway (and the 42P05 with it).
    pub(super) fn statement_exists(&self, name: &[u8]) -> bool {
        !name.is_empty()
            && (self.stmts.contains_key(name) || self.virtuals.contains_key(name))
            && !self.parsing.iter().any(|(n, _, batch, _)| n == name && *batch != self.syncs_sent)
    }

    pub(super) fn duplicate_statement(&mut self, name: &[u8]) {
        let message = format!("prepared statement \"{}\" already exists", String::from_utf8_lossy(name));
        self.fail_locally(sqlstate::DUPLICATE_PREPARED_STATEMENT, &message);
    }

    /// An extended-protocol message fails with pgfleet's own error, as it
    /// would on PostgreSQL: the error in its place in the answers, and the
    /// rest of the batch skipped up to Sync (by the bound server, made to
    /// fail too; without one, here).
    pub(super) fn fail_locally(&mut self, code: &str, message: &str) {
        self.app.metrics.errors.with_label_values(&[code]).inc();
        let mut e = BytesMut::new();
        build::error_response(&mut e, "ERROR", code, message);
        if self.server.is_some() {
            self.expect.push_payload(e.freeze());
            self.fail_server_transaction(false);
        } else {
            self.cout.extend_from_slice(&e);
        }
        // The rest of the batch is not looked at either: nothing in it may
        // be answered by pgfleet or take effect (a virtual SET) where the
        // server would skip it.
        self.discard_to_sync = true;
    }

    /// Whether this batch can count on what the bound connection has of
    /// statement `id`: not while pgfleet's own Parse or Close of it in an
    /// earlier batch is unanswered (an error there made the server skip it,
    /// or not).
    fn settled(&self, id: u64) -> bool {
        !self.unsettled.iter().any(|(i, batch)| *i == id && *batch != self.syncs_sent)
    }

    /// pgfleet's own Parse or Close of `id` was answered or skipped.
    pub(super) fn settle(&mut self, id: u64) {
        if let Some(i) = self.unsettled.iter().position(|(x, _)| *x == id) {
            self.unsettled.remove(i);
        }
    }

    /// Sends Parse for a proxy statement, evicting the LRU one if full.
    pub(super) fn prepare_on_server(&mut self, stmt: &Stmt, swallow: bool) {
        let limit = self.cfg.pool.prepared_statements_cache;
        let settled = self.settled(stmt.id);
        let batch = self.syncs_sent;
        // Only what may be skipped is unsettled: with nothing of its batch
        // before it still unanswered, no error can make the server skip it
        // (and a pipeline that keeps batches in flight does not prepare
        // again in each one).
        let risky = self.expect.batch_pending();
        let server = self.server.as_mut().expect("bound");
        if !settled {
            server.prepared.remove(&stmt.id);
        }
        if let Some(victim) = server.lru_victim(limit) {
            server.prepared.remove(&victim);
            build::target(&mut self.sout, b'C', b'S', &stmts::server_name(victim));
            self.expect
                .push(Pending::Swallow(Kind::Close(Some(victim))));
            if risky {
                self.unsettled.push((victim, batch));
            }
        }
        if !settled {
            // Whether an earlier batch left it there or not: closed first
            // (closing a statement that does not exist is no error), so the
            // Parse cannot fail with 42P05 either way.
            build::target(&mut self.sout, b'C', b'S', &stmt.server_name);
            self.expect.push(Pending::Swallow(Kind::Close(Some(stmt.id))));
            if risky {
                self.unsettled.push((stmt.id, batch));
            }
        }
        if swallow && risky {
            self.unsettled.push((stmt.id, batch));
        }
        server.mark_prepared(stmt.id);
        if let Some(pool) = &self.bound_pool {
            PoolCounters::add(&pool.counters.server_parses, 1);
        }
        build::parse(&mut self.sout, &stmt.server_name, &stmt.content);
        let kind = Kind::Parse(Some(stmt.id));
        self.expect.push(if swallow { Pending::Swallow(kind) } else { Pending::Fwd(kind) });
    }

    /// The proxy statement behind a client statement name, prepared on the
    /// bound server; `None` for the unnamed statement or unknown names (those
    /// go to the server unchanged and get the server's own answer).
    pub(super) fn ensure_prepared(&mut self, name: &[u8]) -> Option<Arc<Stmt>> {
        if name.is_empty() {
            self.ensure_unnamed();
            // Runs now (Parse/Describe/Sync may have come in an earlier
            // round): a write to learn the LSN of, DDL to reload after.
            if let Some((parse, a)) = self.unnamed.take() {
                self.note_write(a.class, a.catalog_ddl);
                self.note_opaque(&a);
                // Its session effects too (a lock, a setting): they happen
                // at every Execute, not only in the Parse's transaction.
                if a.has_session_effects() {
                    self.note_effects(&a);
                }
                self.unnamed = Some((parse, a));
            }
            return None;
        }
        let stmt = self.stmts.get(name)?.clone();
        if self.tracks_state() {
            self.note_write(stmt.analysis.class, stmt.analysis.catalog_ddl);
            self.note_opaque(&stmt.analysis);
            if stmt.analysis.has_session_effects() {
                self.note_effects(&stmt.analysis);
            }
        }
        if !self.server.as_mut().expect("bound").touch_prepared(stmt.id) || !self.settled(stmt.id) {
            self.prepare_on_server(&stmt, true);
        }
        Some(stmt)
    }

    /// A Bind or Describe of the unnamed statement on a connection that
    /// does not have the client's (another connection since its Parse, or
    /// one of pgfleet's own simple queries ran there since): its Parse is
    /// sent again first, its ParseComplete hidden. Without this the Bind
    /// would run whatever unnamed statement another client left on the
    /// connection.
    fn ensure_unnamed(&mut self) {
        if self.unnamed_here || !self.tracks_state() {
            return;
        }
        match &self.unnamed {
            Some((parse, _)) => {
                self.sout.extend_from_slice(parse);
                self.expect.push(Pending::Swallow(Kind::Parse(None)));
            }
            // The client has none: neither may the connection (the server
            // then answers 26000, as it would the client alone).
            None => {
                build::target(&mut self.sout, b'C', b'S', b"");
                self.expect.push(Pending::Swallow(Kind::Close(None)));
            }
        }
        self.unnamed_here = true;
    }

    /// A name in pgfleet's own namespace that the client did not prepare:
    /// the shared proxy statements are not the client's to run, describe
    /// or close. Answered 26000, as PostgreSQL answers an unknown name.
    fn refuse_proxy_name(&mut self, name: &[u8]) -> bool {
        if !self.tracks_state() || !name.starts_with(stmts::PREFIX) || self.stmts.contains_key(name) || self.virtuals.contains_key(name) {
            return false;
        }
        let message = format!("prepared statement \"{}\" does not exist", String::from_utf8_lossy(name));
        self.fail_locally(sqlstate::UNDEFINED_PREPARED_STATEMENT, &message);
        true
    }

    pub(super) fn on_bind(&mut self, msg: &[u8]) -> Result<(), SessionError> {
        let (portal, name, tail_at) = wire::parse_bind(msg)?;
        self.in_batch = true;
        if self.refuse_proxy_name(name) {
            return Ok(());
        }
        match self.ensure_prepared(name) {
            Some(stmt) => {
                self.count_request(msg);
                build::bind(&mut self.sout, portal, &stmt.server_name, &msg[tail_at..]);
                self.expect.push(Pending::Fwd(Kind::Bind(Some(stmt.id))));
            }
            None => self.send(msg, Some(Kind::Bind(None))),
        }
        Ok(())
    }

    pub(super) fn on_describe(&mut self, msg: &[u8]) -> Result<(), SessionError> {
        let (kind, name) = wire::parse_target(msg)?;
        self.in_batch = true;
        if kind == b'S' && self.refuse_proxy_name(name) {
            return Ok(());
        }
        let stmt = if kind == b'S' { self.ensure_prepared(name) } else { None };
        match stmt {
            Some(stmt) => {
                build::target(&mut self.sout, b'D', b'S', &stmt.server_name);
                self.expect.push(Pending::Fwd(Kind::Describe(Some(stmt.id))));
            }
            None => self.send(msg, Some(Kind::Describe(None))),
        }
        Ok(())
    }

    pub(super) fn on_close(&mut self, msg: &[u8]) -> Result<(), SessionError> {
        let (kind, name) = wire::parse_target(msg)?;
        self.in_batch = true;
        if kind == b'S' && name.is_empty() {
            self.unnamed = None;
        }
        if kind == b'S' && !name.is_empty() && self.tracks_state() {
            // The proxy statement stays cached on servers for other clients.
            // (The map's own key goes to `closing`; no name is needed to
            // restore nothing.)
            let (name, closed) = self.stmts.remove_entry(name).map_or((Bytes::new(), Closed::Nothing), |(k, s)| (k, Closed::Statement(s)));
            self.name_seq += 1;
            self.closing.push_back((name, closed, self.name_seq));
            self.expect.push(Pending::Synth(Synth::CloseComplete));
        } else {
            self.send(msg, Some(Kind::Close(None)));
        }
        Ok(())
    }

    /// With no server bound (and so no transaction open), Parse of a
    /// statement some server already accepted, Close of a statement, Flush
    /// and the Sync ending such a batch need no server: answer them here.
    /// This keeps blocking drivers (PQprepare) from waiting for a connection
    /// that their own other sessions hold.
    pub(super) fn answer_locally(&mut self, tag: u8, msg: &[u8]) -> Result<bool, SessionError> {
        match tag {
            b'P' => {
                let (name, content) = wire::parse_parse_name(msg)?;
                if name.is_empty() || !self.tracks_state() {
                    return Ok(false);
                }
                wire::parse_parse(msg)?; // answered here: validate it whole
                let stmt = self.intern(content);
                if !stmt.validated.load(Ordering::Relaxed) || stmt.analysis.pin.is_some() {
                    return Ok(false);
                }
                self.note_effects(&stmt.analysis);
                self.stmts.insert(Bytes::copy_from_slice(name), stmt);
                build::parse_complete(&mut self.cout);
            }
            b'C' => match wire::parse_target(msg)? {
                (b'S', name) if !name.is_empty() => {
                    self.stmts.remove(name);
                    build::close_complete(&mut self.cout);
                }
                _ => return Ok(false),
            },
            b'H' => {}
            b'S' => build::ready_for_query(&mut self.cout, b'I'),
            _ => return Ok(false),
        }
        Ok(true)
    }
}
