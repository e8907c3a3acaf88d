//! A client's messages as they come in: held back while output backs up
//! or a unit must wait for a release, answered by pgfleet when no server is
//! needed, and otherwise routed, admitted and bound before they are
//! forwarded.

use super::*;

impl Session {
    /// Moves every complete client message into the server buffer, binding a
    /// server connection first when none is bound.
    pub(super) async fn process_client(&mut self) -> Result<(), SessionError> {
        self.refresh_config();
        // Output to the client backed up: no new requests until it reads
        // (as PostgreSQL, which stops reading while its output blocks).
        while self.sout.len() < SOUT_HIGH && self.cout.len() < COUT_HIGH {
            let h = match wire::peek_header(&self.cin, self.max_msg)? {
                Some(h) if self.cin.len() >= h.total => h,
                _ => return Ok(()),
            };
            if h.tag == b'X' {
                self.terminated = true;
                return Ok(());
            }
            // A reload removed the client's database or user: a new unit
            // with nothing under way ends the session (a busy client never
            // falls quiet long enough for the idle check).
            if self.removing && self.between_transactions() {
                if let Some(e) = self.app.removed(&self.database, &self.user) {
                    return Err(SessionError::Pool(crate::pool::PoolError::Connect(e)));
                }
            }
            // A connection kept between transactions (session mode, a
            // pinned client) to a server its pool no longer points at (a
            // failover, a reload that moved it): nothing more runs there,
            // where writes would go to a primary that is not one any more.
            if let (Some(conn), Some(pool)) = (&self.server, &self.bound_pool) {
                if !pool.is_current(conn) && self.between_transactions() {
                    return Err(SessionError::ServerLost("the server changed (failover or reload): this session's connection was to the old one; reconnect".into()));
                }
            }
            if !matches!(h.tag, b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'S' | b'H' | b'd' | b'c' | b'f' | b'F') {
                return Err(WireError::Malformed("unknown message type").into());
            }
            if self.server.is_some() && self.routes() && self.must_hold(&self.cin[..h.total]) {
                return Ok(());
            }
            if self.server.is_none() && matches!(h.tag, b'd' | b'c' | b'f') {
                // Copy messages outside a COPY (the rest of one the server
                // already failed): PostgreSQL ignores them, and they must
                // not bind a connection.
                self.cin.advance(h.total);
                continue;
            }
            let msg = self.cin.split_to(h.total).freeze();
            if self.discard_to_sync {
                if h.tag == b'S' {
                    self.discard_to_sync = false;
                    if self.server.is_some() {
                        self.forward(h.tag, &msg, None)?;
                    } else {
                        build::ready_for_query(&mut self.cout, b'I');
                    }
                }
                continue;
            }
            if self.try_virtual(h.tag, &msg)? {
                continue;
            }
            // (Classified once: the analysis admission made of this message.)
            let pinned = if self.cfg.limits.is_empty() { None } else { self.admit_pinned(h.tag, &msg) };
            if self.server.is_none() {
                if self.answer_locally(h.tag, &msg)? {
                    continue;
                }
                if self.app.is_paused(&self.database) {
                    // Before routing: a reload during the pause (PAUSE,
                    // edit cluster.primary, RELOAD, RESUME) must route this
                    // unit under the new config.
                    Box::pin(self.wait_while_paused()).await?;
                    self.refresh_config();
                }
                self.settle_floor();
                let a = if self.routes() { self.unit_analysis(&msg, &self.cin) } else { Analysis::default() };
                let first_only = matches!(h.tag, b'Q' | b'P');
                let topo = self.topo.clone();
                let mut target = match self.choose_target(&a, &topo) {
                    Ok((t, reason)) => {
                        tracing::debug!(parent: &self.span, target = ?t, reason = reason.as_str(), "routed");
                        self.count_decision(&a, t, reason);
                        t
                    }
                    Err((code, message)) => {
                        self.refuse_unit(h.tag, code, &message);
                        continue;
                    }
                };
                if !self.cfg.limits.is_empty() {
                    if let Err((code, message)) = self.admit_unit(&a, target).await? {
                        self.refuse_unit(h.tag, code, &message);
                        continue;
                    }
                    if self.refresh_config() {
                        // Reloaded while it waited: routed again. Admitted
                        // for a replica and now bound for the primary (or
                        // the other way), it is admitted again: the rules
                        // that count only writes did not count it.
                        let topo = self.topo.clone();
                        match self.choose_target(&a, &topo) {
                            Ok((t, _)) if (t == Target::Primary) == (target == Target::Primary) => target = t,
                            Ok((t, _)) => {
                                target = t;
                                self.admission = None;
                                if let Err((code, message)) = self.admit_unit(&a, target).await? {
                                    self.refuse_unit(h.tag, code, &message);
                                    continue;
                                }
                            }
                            Err((code, message)) => {
                                self.admission = None;
                                self.refuse_unit(h.tag, code, &message);
                                continue;
                            }
                        }
                    }
                    if self.app.is_paused(&self.database) {
                        // PAUSEd while it waited for admission: PAUSE
                        // returned once the servers were idle, so nothing
                        // may start now (a switchover may be under way).
                        // The unit goes back and starts over after RESUME.
                        self.admission = None;
                        let mut back = BytesMut::with_capacity(msg.len() + self.cin.len());
                        back.extend_from_slice(&msg);
                        back.extend_from_slice(&self.cin);
                        self.cin = back;
                        continue;
                    }
                }
                if let Err((code, message)) = self.bind_server(&a, target).await? {
                    self.refuse_unit(h.tag, &code, &message);
                    continue;
                }
                self.start_recording();
                if first_only && self.routes() {
                    // Classified once: the lookahead's analysis of this message.
                    self.forward(h.tag, &msg, Some(a))?;
                    continue;
                }
            }
            let known = pinned.filter(|_| matches!(h.tag, b'Q' | b'P') && self.routes());
            self.forward(h.tag, &msg, known)?;
        }
        self.output_backed_up = self.cout.len() >= COUT_HIGH;
        Ok(())
    }

    /// Admission under `[[limits]]`, waited for while the client can still
    /// leave or be killed; the permit is kept in `self.admission`.
    async fn admit_unit(&mut self, a: &Analysis, target: Target) -> Result<Result<(), crate::limits::Refusal>, SessionError> {
        // Boxed: only configurations with limits pay for this future. The
        // client's input is set aside while the (shared) session is
        // borrowed by the wait.
        let was = self.mark_waiting();
        let mut cin = std::mem::take(&mut self.cin);
        let admitted = Box::pin(wait::watching(&self.client, &self.info.signal, &mut cin, self.admit(a, target))).await;
        self.cin = cin;
        self.info.state.store(was, Ordering::Relaxed);
        Ok(admitted?.map(|adm| self.admission = Some(adm)))
    }
}
