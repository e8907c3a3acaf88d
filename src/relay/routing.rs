//! Routing glue between the session and the pure router: what the next
//! transaction unit looks like, where it goes, and when a client bound to a
//! replica must wait for its connection to be released before a write.

use super::{Session, SessionError};
use crate::config::{PoolMode, ReadYourWrites};
use crate::pool::Pool;
use crate::router::route::{route, Calls, NoReplica, Reason, SessionRoute, Target};
use crate::router::{Analysis, Class};
use crate::wire::{self, build, sqlstate};
use crate::topology::Topology;
use std::sync::Arc;

/// The group a workload name selects, or the error a client sees.
pub(super) fn group_index(topo: &Topology, w: &str) -> Result<usize, (&'static str, String)> {
    topo.group(w).ok_or_else(|| {
        (sqlstate::UNDEFINED_OBJECT, format!("workload \"{w}\" does not exist (no [[cluster.groups]] entry of that name)"))
    })
}

impl Session {
    /// Whether this session splits reads from writes at all.
    pub(super) fn routes(&self) -> bool {
        self.mode == PoolMode::Transaction && !self.topo.groups.is_empty()
    }

    /// The analysis of a client statement by name ("" = the unnamed one).
    fn statement_analysis(&self, name: &[u8]) -> Option<Analysis> {
        if name.is_empty() {
            return self.unnamed.as_ref().map(|(_, a)| a.clone());
        }
        self.stmts.get(name).map(|s| s.analysis.clone())
    }

    /// The transaction unit starting with `first` and continuing in the
    /// buffered input up to its Sync: a simple Query alone, or the
    /// extended-protocol batch (a write anywhere makes the batch a write,
    /// and so does transaction control after its first message). A batch
    /// whose Sync is not in yet (a pipeline larger than one read, a Flush
    /// the client waits on) is a write: what follows may write, and it goes
    /// to the same connection unchecked.
    pub(super) fn unit_analysis(&self, first: &[u8], rest: &[u8]) -> Analysis {
        let mut merged: Option<Analysis> = None;
        let mut pos = 0;
        let mut msg = first;
        let mut whole = first.first() == Some(&b'Q');
        loop {
            let mut stop = false;
            let a = match msg.first() {
                Some(b'Q') => {
                    stop = true;
                    merged.is_none().then(|| self.analyze(wire::body(msg)))
                }
                Some(b'P') => wire::parse_parse_name(msg).ok().map(|(_, c)| self.analyze(c)),
                Some(b'B') => wire::parse_bind(msg).ok().and_then(|(_, s, _)| self.statement_analysis(s)),
                Some(b'D') => match wire::parse_target(msg) {
                    Ok((b'S', n)) => self.statement_analysis(n),
                    _ => None,
                },
                // A function call by OID (large objects, ...): may write.
                Some(b'F') => Some(Analysis::default()),
                Some(b'S') => {
                    stop = true;
                    whole = true;
                    None
                }
                None => {
                    stop = true;
                    None
                }
                _ => None,
            };
            if let Some(a) = a {
                merged = Some(match merged {
                    None => a,
                    Some(mut m) => {
                        if a.class == Class::Write || a.tx != crate::router::TxControl::None {
                            m.class = Class::Write;
                        }
                        for h in a.calls {
                            m.add_call(h);
                        }
                        m
                    }
                });
            }
            if stop {
                break;
            }
            match wire::peek_header(&rest[pos..], usize::MAX) {
                Ok(Some(h)) if rest.len() >= pos + h.total => {
                    msg = &rest[pos..pos + h.total];
                    pos += h.total;
                }
                _ => break,
            }
        }
        let mut a = merged.unwrap_or_default();
        if !whole {
            a.class = Class::Write;
        }
        a
    }

    /// A write whose LSN could not be read: once the monitor has read the
    /// primary's position well after it (a second more, for the WAL writer
    /// of an asynchronous commit), that position is the floor.
    pub(super) fn settle_floor(&mut self) {
        let Some(since) = self.floor_unknown_since else { return };
        if let Some(floor) = self.resolved_floor(since) {
            self.floor = Some(floor);
            self.floor_unknown_since = None;
        }
    }

    /// The own writes' floor once the monitor has read a primary position
    /// after `since` (when the write's own position could not be read):
    /// that position covers the write. None while there is none.
    pub(super) fn resolved_floor(&self, since: std::time::Instant) -> Option<u64> {
        let snap = self.topo.snapshot();
        let seen = snap.primary_seen_at?;
        (seen > since + std::time::Duration::from_secs(1)).then(|| self.floor.unwrap_or(0).max(snap.primary_lsn))
    }

    /// Where a transaction unit with this analysis goes.
    pub(super) fn choose_target(&self, a: &Analysis, topo: &Topology) -> Result<(Target, Reason), (&'static str, String)> {
        if self.mode != PoolMode::Transaction || topo.groups.is_empty() {
            return Ok((Target::Primary, Reason::SplitDisabled));
        }
        let group = match (&a.workload_hint, &self.workload) {
            (Some(w), _) => group_index(topo, w)?,
            // A group removed by a reload: the client's reads go to the primary.
            (None, Some(w)) => match topo.group(w) {
                Some(g) => g,
                None => return Ok((Target::Primary, Reason::Fallback)),
            },
            (None, None) => return Ok((Target::Primary, Reason::SplitDisabled)),
        };
        let cfg = &self.cfg;
        let (default_read_only, serializable) = self.tx_defaults;
        let s = SessionRoute {
            split: cfg.routing.read_write_split,
            route: self.route_override,
            group,
            groups: &topo.groups,
            floor: self.routing_floor(),
            default_read_only,
            serializable,
            calls: self.function_calls(a),
        };
        route(a, &s, &topo.snapshot(), &mut |c| topo.pick(c)).map_err(|NoReplica { group, why }| {
            (
                sqlstate::CANNOT_CONNECT_NOW,
                format!("no usable replica for workload \"{group}\" and its fallback is \"error\" ({why})"),
            )
        })
    }

    /// The position a replica must have replayed to serve this client's
    /// reads (read-your-writes); `u64::MAX` while its write's position is
    /// unknown (no replica has it: the primary).
    fn routing_floor(&self) -> Option<u64> {
        let floor = if self.floor_unknown_since.is_some() { Some(u64::MAX) } else { self.known_floor() };
        floor.filter(|_| self.cfg.routing.read_your_writes == ReadYourWrites::Lsn)
    }

    /// The client's own writes' floor and the one it raised, whichever is
    /// higher (the own one may be unknown: see `floor_unknown_since`).
    pub(super) fn known_floor(&self) -> Option<u64> {
        match (self.floor, self.min_lsn) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// `SHOW pgfleet.lsn` must wait: a write of the client's (or code that
    /// may write) has not ended, or its position is being read. Its answer
    /// is what another connection of the client's passes to
    /// `SET pgfleet.min_lsn`, so it must cover that write.
    pub(super) fn lsn_pending(&self, next: &[u8]) -> bool {
        if !(self.wrote || self.probe.as_ref().is_some_and(|p| p.lsn)) {
            return false;
        }
        let sql = match next[0] {
            b'Q' => wire::body(next),
            b'P' => match wire::parse_parse_name(next) {
                Ok((_, content)) => content,
                Err(_) => return false,
            },
            _ => return false,
        };
        matches!(self.classify_virtual(sql), Some(super::virt::Virtual::Show(n)) if n == "lsn" || n == "min_lsn")
    }

    /// Whether a read calls a VOLATILE function of the database's own.
    fn function_calls(&self, a: &Analysis) -> Calls {
        if a.calls.is_empty() || a.class == Class::Write || !self.cfg.routing.read_write_split {
            return Calls::Safe;
        }
        // `routing.write_functions` as of now: a statement classified (and
        // shared) before a reload added one is still sent to the primary.
        let listed = |h: &u32| {
            self.cfg.routing.write_functions.iter().any(|f| {
                let n = f.rsplit('.').next().unwrap_or(f).as_bytes();
                crate::router::name_hash(n, true) == *h || crate::router::name_hash(n, false) == *h
            })
        };
        if !self.cfg.routing.write_functions.is_empty() && a.calls.iter().any(listed) {
            return Calls::Volatile;
        }
        self.app.function_verdict(&self.database, &a.calls, self.cfg.routing.function_catalog_refresh.0, self.now)
    }

    /// Code pgfleet cannot see into may change session settings: a DO block,
    /// CALL, or a call to one of the application's VOLATILE functions (or
    /// any function while the catalog is not loaded). PostgreSQL keeps such
    /// a `set_config(..., false)` for the session: the end of the
    /// transaction reads the connection's session settings, so that they
    /// follow the client and are reset for the next one.
    pub(super) fn note_opaque(&mut self, a: &Analysis) {
        if !self.opaque_settings && self.may_change_settings(a) {
            self.opaque_settings = true;
            // A function that may write: read-your-writes learns the LSN.
            if self.bound_target == Some(Target::Primary) && self.routes() {
                self.wrote = true;
            }
        }
        // Custom settings a DO block sets: pg_settings does not list those.
        super::state::add_names(&mut self.opaque_names, a.opaque_settings.iter().cloned());
    }

    fn may_change_settings(&self, a: &Analysis) -> bool {
        let refresh = self.cfg.routing.function_catalog_refresh.0;
        if !self.tracks_state() {
            return false;
        }
        if a.opaque {
            return true;
        }
        if a.calls.is_empty() || refresh.is_zero() {
            return false;
        }
        match self.app.function_verdict(&self.database, &a.calls, refresh, self.now) {
            Calls::Safe => false,
            Calls::Volatile => true,
            // Catalog not loaded: a read is checked (it went to the primary
            // for the same reason); a write only once the catalog tells
            // (every write calling now() or nextval() would otherwise close
            // its connection after it: see `probe_sql`).
            Calls::Unknown => a.class == Class::Read,
        }
    }

    /// Admission under the `[[limits]]` rules matching this transaction.
    pub(super) async fn admit(&self, a: &Analysis, target: Target) -> Result<crate::limits::Admission, crate::limits::Refusal> {
        let limits = self.app.limits();
        let result = limits.admit(&self.limit_request(a, target)).await;
        if let Err((_, msg)) = &result {
            tracing::info!(parent: &self.span, error = %msg, "transaction refused by a limit");
        }
        result
    }

    fn limit_request<'a>(&'a self, a: &'a Analysis, target: Target) -> crate::limits::Request<'a> {
        let workload = a
            .workload_hint
            .as_deref()
            .or(self.workload.as_deref())
            .unwrap_or(self.cfg.routing.default_workload.as_str());
        crate::limits::Request { workload, user: &self.user, database: &self.database, to_primary: target == Target::Primary }
    }

    /// A pinned client keeps its connection between transactions but not
    /// its admission: a transaction starting with this message (`tag`) is
    /// counted in flight when the rules have room, never made to wait or
    /// refused (its connection may hold a lock the transactions filling
    /// the budget wait for, and this one may be what releases it).
    /// Returns the unit's analysis when it made one (for `forward`: the
    /// message is not classified twice).
    pub(super) fn admit_pinned(&mut self, tag: u8, msg: &[u8]) -> Option<Analysis> {
        let starts = self.server.is_some()
            && self.pinned.is_some()
            && self.admission.is_none()
            && self.mode == PoolMode::Transaction
            && self.status == b'I'
            && !self.in_batch
            && matches!(tag, b'Q' | b'P' | b'B' | b'F');
        if !starts {
            return None;
        }
        let a = self.unit_analysis(msg, &self.cin);
        let target = self.bound_target.unwrap_or(Target::Primary);
        self.admission = self.app.limits().try_admit(&self.limit_request(&a, target));
        Some(a)
    }

    /// Counts a routing decision (Prometheus and SHOW WORKLOADS).
    pub(super) fn count_decision(&self, a: &Analysis, t: Target, reason: Reason) {
        let w = &self.workload_stats;
        let add = |c: &std::sync::atomic::AtomicU64| c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        add(if a.class == Class::Write { &w.writes } else { &w.reads });
        let target = match t {
            Target::Primary => {
                add(&w.to_primary);
                "primary"
            }
            Target::Replica(_) => {
                add(&w.to_replica);
                "replica"
            }
        };
        if reason == Reason::Fallback {
            add(&w.fallbacks);
        }
        self.app.metrics.routing_decision(target == "replica", reason).inc();
    }

    /// Bound at a transaction boundary, with a unit waiting that should run
    /// elsewhere: wait for the release first. On a replica, a write; on the
    /// primary, a read that goes to a replica (sent before the last unit's
    /// ReadyForQuery arrived, or while pgfleet's own check after the
    /// transaction runs: settings, LSN).
    pub(super) fn must_hold(&self, next: &[u8]) -> bool {
        // SHOW pgfleet.lsn behind a write still being answered (a COMMIT
        // pipelined before it, in a transaction) or checked: it waits for
        // the answers, which need nothing more from the client (not in an
        // extended batch whose Sync it has not sent: that could wait for
        // ever). In a transaction with nothing pending, the floor as it is.
        if !self.in_batch && !self.expect.is_empty() && self.lsn_pending(next) {
            return true;
        }
        // A client pinned to a replica stays there (its session state is
        // on that connection): once no check that could unpin it is under
        // way, its write runs there and gets the server's read-only error
        // instead of waiting for a release that never comes.
        if self.status != b'I' || self.in_batch || (self.pinned.is_some() && self.is_clean()) {
            return false;
        }
        let to_replica = |s: &Self| {
            let a = s.unit_analysis(next, &s.cin[next.len()..]);
            matches!(s.choose_target(&a, &s.topo), Ok((Target::Replica(_), _)))
        };
        match self.bound_target {
            // The bound replica itself may have dropped out since: a client
            // that keeps pipelining must not stay on it.
            Some(Target::Replica(i)) => !to_replica(self) || !self.replica_still_good(i, None),
            // A read pipelined behind a write (or a function that may
            // write) stays on the primary: it sees that write.
            Some(Target::Primary) => self.pinned.is_none() && !self.wrote && !self.opaque_settings && to_replica(self),
            None => false,
        }
    }

    /// Whether replica `i` may still serve this client's reads (lag,
    /// divergence, promotion, down, or behind the client's floor may have
    /// taken it out since it was chosen): usable in a group routing could
    /// have taken it from (the client's workload, `hint` if the unit named
    /// one, or a group of its fallback chain); one reached otherwise (a
    /// route hint), in any of its groups.
    pub(super) fn replica_still_good(&self, i: usize, hint: Option<&str>) -> bool {
        use crate::router::route::Fallback;
        let snap = self.topo.snapshot();
        let Some(r) = snap.replicas.get(i) else { return false };
        if !self.routing_floor().is_none_or(|f| r.replay_lsn >= f) {
            return false;
        }
        let any = || r.groups.iter().any(|(_, ok)| *ok);
        let Some(g) = hint.or(self.workload.as_deref()).and_then(|w| self.topo.group(w)) else { return any() };
        let chain = std::iter::once(g).chain(self.topo.groups[g].fallback.iter().filter_map(|f| match f {
            Fallback::Group(x) => Some(*x),
            _ => None,
        }));
        let mut in_chain = false;
        for c in chain {
            if let Some((_, ok)) = r.groups.iter().find(|(m, _)| *m == c) {
                if *ok {
                    return true;
                }
                in_chain = true;
            }
        }
        !in_chain && any()
    }

    /// The pool for `target`; the last one is cached (no key building and
    /// map lookup per transaction) until a reload or a change of primary.
    /// `target` was chosen with the session's topology (`self.topo`).
    /// A reload that removed the client's database or user ends its
    /// session at its next checkout (a transaction under way finishes).
    pub(super) fn pool_for(&mut self, target: Target) -> Result<Arc<Pool>, SessionError> {
        let writer = self.topo.writer();
        if let Some((t, generation, w, pool)) = &self.pool_cache {
            if *t == target && *generation == self.generation && *w == writer {
                return Ok(pool.clone());
            }
        }
        let pool = self.app.pool(&self.database, &self.user, target, &self.topo).map_err(SessionError::Pool)?;
        self.pool_cache = Some((target, self.generation, writer, pool.clone()));
        Ok(pool)
    }

    /// A routing or admission failure for a unit not yet sent anywhere
    /// (counted as refused): the client gets
    /// the error, then ReadyForQuery (simple Query) or, for an
    /// extended-protocol batch, the rest of the batch is skipped to Sync.
    pub(super) fn refuse_unit(&mut self, tag: u8, code: &str, message: &str) {
        // The unit is over (a retried one too: the next may record again).
        self.replay_state = super::Replay::Off;
        self.workload_stats.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.app.metrics.errors.with_label_values(&[code]).inc();
        build::error_response(&mut self.cout, "ERROR", code, message);
        if matches!(tag, b'Q' | b'F') {
            build::ready_for_query(&mut self.cout, b'I');
        } else {
            self.discard_to_sync = true;
        }
    }

    /// Checks out a connection for `target`. A replica that cannot be
    /// reached is marked down and the unit re-routed (each replica at most
    /// once, then the primary fallback). A primary that
    /// cannot be reached (down, restarting, failing over, or a standby) is
    /// waited for up to `cluster.failover_timeout`, following the monitor
    /// to a promoted replica; the pool's backoff paces the retries.
    pub(super) async fn checkout_routed(
        &mut self,
        a: &Analysis,
        mut target: Target,
    ) -> Result<(crate::pool::Conn, Target, Arc<Pool>), SessionError> {
        use crate::backend::BackendError;
        use crate::pool::PoolError;
        let deadline = tokio::time::Instant::now() + self.cfg.cluster.failover_timeout.0;
        let mut rerouted = 0;
        let mut retired = 0;
        loop {
            // A reload while this waited (for the pool, a writer, a
            // failover): route again under the new config, whose monitor is
            // the one that sees the writer.
            if self.refresh_config() {
                let topo = self.topo.clone();
                target = match self.choose_target(a, &topo) {
                    Ok((t, _)) => t,
                    Err((_, why)) => return Err(SessionError::Pool(PoolError::Connect(BackendError::NoPrimary(why)))),
                };
            }
            let (topo, app) = (self.topo.clone(), self.app.clone());
            let topo = &*topo;
            if target == Target::Primary && topo.writer_addr().is_none() {
                if !self.watch(wait_for_writer(topo, deadline, &app, self.generation)).await? {
                    let why = "the primary is in recovery and no replica was promoted".to_string();
                    return Err(SessionError::Pool(PoolError::Connect(BackendError::NoPrimary(why))));
                }
                continue;
            }
            let pool = match self.pool_for(target) {
                Ok(pool) => pool,
                // A replica a reload removed meanwhile: routed again at the
                // top of the loop (the reload may still be installing its
                // config: a pause).
                Err(SessionError::Pool(PoolError::Retired)) if retired < 100 => {
                    retired += 1;
                    tokio::task::yield_now().await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Some(conn) = pool.try_checkout_idle(std::time::Instant::now()) {
                return Ok((conn, target, pool));
            }
            // Not boxed again: this whole future is already boxed by its
            // caller (the slow path), so idle clients' tasks do not reserve it.
            match self.watch(pool.checkout()).await? {
                Ok(conn) => return Ok((conn, target, pool)),
                Err(PoolError::Connect(e)) => match target {
                    // Unreachable (a refused login is the server's answer
                    // for this user only, and goes to the client as is).
                    Target::Replica(i) if rerouted < topo.replicas.len() && e.is_transient() => {
                        tracing::warn!(parent: &self.span, replica = %topo.replicas[i].name, error = %e, "replica unreachable; re-routing");
                        topo.mark_down(i, &e.to_string());
                        rerouted += 1;
                        target = match self.choose_target(a, topo) {
                            Ok((t, _)) => t,
                            Err(_) => return Err(SessionError::Pool(PoolError::Connect(e))),
                        };
                    }
                    Target::Primary if e.is_transient() && tokio::time::Instant::now() < deadline => {
                        tracing::info!(parent: &self.span, error = %e, "primary unavailable; waiting for it or a promoted replica");
                        self.watch(wait_for_writer_change(topo, deadline)).await?;
                    }
                    _ => return Err(SessionError::Pool(PoolError::Connect(e))),
                },
                // Queued behind clients whose connects failed while the
                // primary is down or restarting: the failover wait goes on.
                Err(PoolError::Timeout { .. }) if target == Target::Primary && pool.connect_failing() && tokio::time::Instant::now() < deadline => {
                    self.watch(wait_for_writer_change(topo, deadline)).await?;
                }
                // Removed by a reload meanwhile (out of the pool map by
                // now): under the new config, another pool, or the reason.
                Err(PoolError::Retired) if retired < 100 => {
                    retired += 1;
                    self.pool_cache = None;
                }
                Err(e) => return Err(SessionError::Pool(e)),
            }
        }
    }
}

/// Waits until some server takes writes (true), or a reload replaces
/// `topo` (true: the caller looks again under the new config); false at
/// the deadline.
async fn wait_for_writer(topo: &Topology, deadline: tokio::time::Instant, app: &crate::app::App, generation: u64) -> bool {
    while topo.writer_addr().is_none() && app.generation() == generation {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        wait_for_writer_change(topo, deadline).await;
    }
    true
}

/// Sleeps until the monitor changes the writer, a short jittered retry
/// interval passes, or the deadline.
async fn wait_for_writer_change(topo: &Topology, deadline: tokio::time::Instant) {
    let changed = topo.writer_changed.notified();
    let retry = tokio::time::Instant::now() + std::time::Duration::from_millis(100 + rand::random::<u64>() % 200);
    tokio::select! {
        _ = changed => {}
        _ = tokio::time::sleep_until(retry.min(deadline)) => {}
    }
}
