//! Binding a server connection to the session and letting it go: checkout
//! (with the PAUSE wait), bringing its settings in line, release at the end
//! of a transaction (after the state probe if one is due), and cleanup when
//! the client leaves.

use super::*;
use crate::backend::BackendError;
use tracing::Instrument;

impl Session {
    /// Checks out a server connection and queues what brings it in line
    /// with this client's session settings.
    /// `Ok(Err(..))`: the server refused this client's session settings;
    /// nothing was bound, and the unit must fail with that error.
    pub(super) async fn bind_server(
        &mut self,
        a: &Analysis,
        mut target: Target,
    ) -> Result<Result<(), (String, String)>, SessionError> {
        self.info.state.store(CLIENT_WAITING, Ordering::Relaxed);
        let now = crate::stats::unix_us_at(self.now);
        self.info.wait_since_us.store(now, Ordering::Relaxed);
        // A connection that dies while its settings are applied (a server
        // restarted under an idle connection) is replaced: two more tries.
        let mut attempts = 0;
        let mut rechecks = 0;
        // Whether any pass waited (the clock is read again below).
        let mut waited_before = false;
        let (conn, target, pool, waited) = loop {
            // Under the session's topology, the one `target` was chosen with
            // (checkout_routed moves both on when a reload happens meanwhile).
            // (A replica a reload removed: the slow path routes again.)
            let pool = match self.pool_for(target) {
                Ok(pool) => Some(pool),
                Err(SessionError::Pool(PoolError::Retired)) => None,
                Err(e) => return Err(e),
            };
            let (checked_out, waited) = match pool.and_then(|p| p.try_checkout_idle(self.now).map(|c| (c, p))) {
                Some((conn, pool)) => (Ok((conn, target, pool)), waited_before),
                // Boxed slow path (wait, connect, re-route): see checkout_routed.
                None => {
                    // In the client's span: connects opened for it are its children.
                    let span = self.span.clone();
                    (Box::pin(self.checkout_routed(a, target).instrument(span)).await, true)
                }
            };
            self.info.state.store(CLIENT_ACTIVE, Ordering::Relaxed);
            let (mut conn, routed, pool) = checked_out?;
            // A retry goes where the unit was (re-)routed.
            target = routed;
            // Chosen before the waits (for the pool, or for admission under
            // `[[limits]]`): a replica taken out since (lag, divergence,
            // down) gets no read; it is routed again and the clean
            // connection goes back. (Not looked at again without a wait:
            // routing just chose it from the same snapshot.)
            let may_be_stale = waited || !self.cfg.limits.is_empty();
            if let (Target::Replica(i), true) = (target, may_be_stale) {
                if !self.replica_still_good(i, a.workload_hint.as_deref()) && rechecks < 2 {
                    rechecks += 1;
                    waited_before |= waited;
                    pool.checkin(conn);
                    self.info.state.store(CLIENT_WAITING, Ordering::Relaxed);
                    let topo = self.topo.clone();
                    target = match self.choose_target(a, &topo) {
                        Ok((t, _)) => t,
                        // No fallback left (`fallback = ["error"]`).
                        Err((code, message)) => {
                            self.admission = None;
                            self.info.state.store(CLIENT_IDLE, Ordering::Relaxed);
                            return Ok(Err((code.to_string(), message)));
                        }
                    };
                    continue;
                }
            }
            if conn.settings_fp == self.settings_fp {
                break (conn, target, pool, waited);
            }
            // Boxed slow path: a round trip before the client's unit is sent.
            match Box::pin(self.sync_settings(&mut conn)).await {
                Ok(()) => break (conn, target, pool, true),
                Err(BackendError::Server(fields)) => {
                    // The settings query failed whole; but a client_encoding
                    // set before it (see sync_settings) stays: the next
                    // client compares parameter by parameter.
                    conn.settings_fp = 0;
                    pool.checkin(conn);
                    self.admission = None;
                    self.info.state.store(CLIENT_IDLE, Ordering::Relaxed);
                    return Ok(Err(settings_refused(&fields)));
                }
                Err(e) => {
                    pool.discard(conn, "applying session settings failed");
                    attempts += 1;
                    if attempts == 3 {
                        return Err(SessionError::ServerLost(format!("applying session settings: {e}")));
                    }
                    tracing::info!(parent: &self.span, error = %e, "a server connection failed while session settings were applied; trying another");
                }
            }
        };
        // The event's clock reading; a slow (waiting) checkout reads again.
        let now = if waited {
            self.now = Instant::now();
            crate::stats::unix_us_at(self.now)
        } else {
            now
        };
        if let Some(si) = &conn.info {
            si.state.store(SERVER_ACTIVE, Ordering::Relaxed);
            si.link.store(self.info.id, Ordering::Relaxed);
            si.request_time_us.store(now, Ordering::Relaxed);
        }
        self.info.link.store(conn.id, Ordering::Relaxed);
        self.info.remote_pid.store(conn.backend_pid, Ordering::Relaxed);
        self.info.request_time_us.store(now, Ordering::Relaxed);
        if let Target::Replica(i) = target {
            let inflight = self.topo.replicas[i].inflight.clone();
            inflight.fetch_add(1, Ordering::Relaxed);
            self.bound_inflight = Some(inflight);
        }
        self.bound_target = Some(target);
        self.bound_pool = Some(pool);
        self.unnamed_here = false;
        self.cancel.set(CancelTarget {
            peer: conn.peer,
            pid: conn.backend_pid,
            secret: conn.backend_secret,
        });
        self.status = b'I';
        self.server = Some(conn);
        Ok(Ok(()))
    }

    /// Makes `conn`'s session settings this client's, and waits for the
    /// server's answer: a setting the server refuses (a text search
    /// configuration or tablespace dropped since, an extension's setting
    /// this server does not load, a bad startup option) fails the client's
    /// unit instead of letting it run with the previous client's settings.
    async fn sync_settings(&mut self, conn: &mut ServerConn) -> Result<(), BackendError> {
        let mut sync = settings_sql(&self.settings, conn);
        if sync.as_ref().is_some_and(|s| !s.sql.is_ascii()) && !conn.params.get("client_encoding").is_some_and(|e| e.eq_ignore_ascii_case("UTF8")) {
            // pgfleet's SQL is UTF-8: a connection the last client left in
            // another encoding would read 'café' as something else. Then
            // the sync sets this client's encoding again if it is not UTF8.
            conn.run_silently("SET client_encoding TO 'UTF8'", SETTINGS_TIMEOUT).await?;
            sync = settings_sql(&self.settings, conn);
        }
        if let Some(sync) = sync {
            conn.run_silently(&sync.sql, SETTINGS_TIMEOUT).await?;
            for i in sync.set {
                let (name, value) = &self.settings[i];
                if !REPORTED_SETTABLE.contains(&name.as_str()) {
                    conn.params.insert(name.clone(), value.clone());
                    conn.custom.insert(name.clone());
                    continue;
                }
                // The server's spelling (`utc` -> `UTC`) becomes the
                // client's, as PostgreSQL reports it, so that the next
                // connection compares equal.
                match conn.params.get(name) {
                    Some(canonical) if canonical != value => {
                        build::parameter_status(&mut self.cout, name, canonical);
                        std::sync::Arc::make_mut(&mut self.settings)[i].1 = canonical.clone();
                        self.settings_changed();
                    }
                    Some(_) => {}
                    None => {
                        conn.params.insert(name.clone(), value.clone());
                    }
                }
            }
            for name in sync.stale {
                conn.custom.remove(&name);
                conn.params.remove(&name);
            }
        }
        conn.settings_fp = self.settings_fp;
        Ok(())
    }

    pub(super) fn is_clean(&self) -> bool {
        self.expect.is_empty() && !self.in_batch && self.sout.is_empty() && self.skip == 0
    }

    /// Outside a transaction with nothing under way or left to send: the
    /// point where a connection is released (or a session may end).
    pub(super) fn between_transactions(&self) -> bool {
        self.status == b'I' && self.is_clean() && self.sin.is_empty()
    }

    /// Transaction mode: return the connection at the end of a transaction.
    pub(super) fn maybe_release(&mut self) {
        if self.mode != PoolMode::Transaction || self.server.is_none() {
            return;
        }
        if self.between_transactions() {
            if let Some(sql) = self.probe_sql() {
                // (search_path, if it changed, is among what it reads.)
                build::query(&mut self.sout, &sql);
                self.expect.push(Pending::Swallow(Kind::Query));
                // A simple query ends the connection's unnamed statement.
                self.unnamed_here = false;
                return;
            }
            // The transaction is over and what it set has been read back.
            self.search_path_unsettled = false;
            if self.pinned.is_some() {
                // Idle between transactions: not in flight (`[[limits]]`).
                self.admission = None;
                return;
            }
            let (conn, pool) = self.unbind().expect("checked");
            if std::mem::take(&mut self.discard_conn) {
                tracing::info!(parent: &self.span, "closing a server connection whose session state pgfleet could not read back (custom settings it cannot name while the function catalog is not loaded, or a failed state check)");
                pool.discard(conn, "session state unknown");
                return;
            }
            pool.checkin_at(conn, self.now);
        }
    }

    /// PAUSE: new transactions wait until RESUME, or until shutdown, which
    /// ends the session (57P01) rather than keeping the drain waiting for a
    /// RESUME that will not come.
    pub(super) async fn wait_while_paused(&mut self) -> Result<(), SessionError> {
        let app = self.app.clone();
        let was = self.mark_waiting();
        while app.is_paused(&self.database) {
            let resumed = app.resumed.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            if !app.is_paused(&self.database) {
                break;
            }
            let rechecked = tokio::time::sleep(Duration::from_millis(250));
            let info = self.info.clone();
            let shutdown = std::future::poll_fn(move |cx| info.signal.poll_raised(cx, crate::stats::SHUTDOWN));
            let shutting_down = self
                .watch(async move {
                    tokio::select! {
                        _ = resumed => false,
                        _ = rechecked => false,
                        _ = shutdown => true,
                    }
                })
                .await?;
            if shutting_down {
                return Err(SessionError::Shutdown);
            }
            // Removed by a reload while everything is paused: no RESUME
            // of it will come.
            if let Some(e) = app.removed(&self.database, &self.user) {
                return Err(SessionError::Pool(PoolError::Connect(e)));
            }
        }
        self.info.state.store(was, Ordering::Relaxed);
        Ok(())
    }

    /// Shows the client as waiting (SHOW POOLS `cl_waiting` and `maxwait`,
    /// SHOW CLIENTS) while it waits for something other than a connection:
    /// a PAUSE, admission under `[[limits]]`. Returns the state to restore.
    pub(super) fn mark_waiting(&self) -> u8 {
        let was = self.info.state.swap(CLIENT_WAITING, Ordering::Relaxed);
        if was != CLIENT_WAITING {
            self.info.wait_since_us.store(crate::stats::unix_us_at(self.now), Ordering::Relaxed);
        }
        was
    }

    /// Takes the bound connection and the pool it belongs to.
    pub(super) fn unbind(&mut self) -> Option<(crate::pool::Conn, Arc<Pool>)> {
        let mut conn = self.server.take()?;
        // Nothing of this client's is pending: no clock runs on.
        self.cycle_start = None;
        self.query_clock = None;
        self.unsettled.clear();
        if self.cancel.release() {
            conn.cancel_pending = true;
        }
        if let Some(si) = &conn.info {
            si.state.store(SERVER_IDLE, Ordering::Relaxed);
            si.link.store(0, Ordering::Relaxed);
        }
        self.info.state.store(CLIENT_IDLE, Ordering::Relaxed);
        self.info.link.store(0, Ordering::Relaxed);
        self.bound_target = None;
        self.admission = None;
        if let Some(inflight) = self.bound_inflight.take() {
            inflight.fetch_sub(1, Ordering::Relaxed);
        }
        Some((conn, self.bound_pool.take().expect("a bound connection has its pool")))
    }

    /// Tells the client why its session ends (best effort, bounded in time).
    pub(super) async fn rescue(&mut self, e: &SessionError) {
        let (code, msg): (String, String) = match e {
            SessionError::ClientGone => return,
            SessionError::Protocol(w) => (sqlstate::PROTOCOL_VIOLATION.into(), format!("protocol violation: {w}")),
            SessionError::ServerLost(why) => {
                (sqlstate::CONNECTION_FAILURE.into(), format!("server connection lost: {why}"))
            }
            SessionError::Pool(p @ PoolError::Timeout { .. }) => (sqlstate::TOO_MANY_CONNECTIONS.into(), p.to_string()),
            SessionError::Pool(p @ PoolError::Connect(b)) => (b.sqlstate(), p.to_string()),
            SessionError::Pool(p @ PoolError::Retired) => (sqlstate::CONNECTION_FAILURE.into(), p.to_string()),
            SessionError::Shutdown => (sqlstate::ADMIN_SHUTDOWN.into(), "pgfleet is shutting down".into()),
            SessionError::Killed => (sqlstate::ADMIN_SHUTDOWN.into(), "connection killed by the pgfleet admin console (KILL)".into()),
            SessionError::Timeout(code, msg) => ((*code).into(), (*msg).into()),
        };
        self.app.metrics.errors.with_label_values(&[&code]).inc();
        tracing::info!(parent: &self.span, sqlstate = %code, error = %msg, "closing client session");
        let mut out = std::mem::take(&mut self.cout);
        // Not in the middle of a message still streaming from the server
        // (the client would read the FATAL as the rest of a DataRow): then
        // the connection just closes after what was sent.
        if self.skip == 0 {
            build::error_response(&mut out, "FATAL", &code, &msg);
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            use tokio::io::AsyncWriteExt;
            let _ = self.client.write_all(&out).await;
        })
        .await;
    }

    /// Leaves the server connection clean for the next client, or closes it.
    pub(super) async fn finish(&mut self) {
        let was_pinned = self.pinned.is_some();
        self.reset_or_drop(was_pinned).await;
        // Pinned until the connection's session state is gone (DISCARD ALL
        // done, or the connection closed): a lock it held is free by now.
        self.unpin();
    }

    async fn reset_or_drop(&mut self, was_pinned: bool) {
        let Some((mut conn, pool)) = self.unbind() else { return };
        let idle_and_done = self.is_clean() && self.sin.is_empty();
        if !idle_and_done {
            // Something is in flight: stop it and drop the connection.
            let _ = ServerConn::cancel(conn.peer, conn.backend_pid, conn.backend_secret).await;
            pool.discard(conn, "client left with a request in flight");
            return;
        }
        let limit = Duration::from_secs(5);
        let mut ok = true;
        if self.status != b'I' {
            ok = conn.run_silently("ROLLBACK", limit).await.is_ok();
            // SETs of the rolled-back transaction the client saw reported
            // are undone: the connection no longer carries its settings.
            conn.settings_fp = 0;
        }
        // Code that may have set settings out of sight ran, or settings the
        // client changed were not read back yet (it left, or was ended,
        // before its state check): unchecked.
        let unknown_settings = self.opaque_settings
            || self.discard_conn
            || !self.dirty.is_empty()
            || !self.resets.is_empty()
            || !self.opaque_names.is_empty();
        if ok && (self.mode == PoolMode::Session || was_pinned || unknown_settings) {
            ok = conn.run_silently("DISCARD ALL", limit).await.is_ok();
            conn.prepared.clear();
            // Back to the server's defaults, which pgfleet does not know
            // for unreported settings (reported ones were reported).
            for name in conn.custom.drain() {
                conn.params.remove(&name);
            }
            conn.settings_fp = 0;
        }
        if ok {
            pool.checkin(conn);
        } else {
            pool.discard(conn, "reset after the client left failed");
        }
    }
}

/// Order-sensitive fingerprint of a settings list (never 0).
pub(crate) fn fingerprint(settings: &Settings) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    settings.hash(&mut h);
    h.finish() | 1
}

/// What brings a connection's session settings in line with a client's.
struct SettingsSync {
    sql: String,
    /// Indexes into the client's settings that the SQL sets.
    set: Vec<usize>,
    /// Settings of earlier clients that the SQL resets.
    stale: Vec<String>,
}

/// How long a server may take to apply a client's session settings.
const SETTINGS_TIMEOUT: Duration = Duration::from_secs(10);

/// SQL that makes `conn`'s session match `settings` (None when it already
/// does). One simple query: one implicit transaction, so a refused value
/// leaves every setting of the connection as it was.
fn settings_sql(settings: &Settings, conn: &ServerConn) -> Option<SettingsSync> {
    sync_sql(settings, &conn.params, &conn.custom)
}

fn sync_sql(settings: &Settings, params: &std::collections::HashMap<String, String>, custom: &std::collections::HashSet<String>) -> Option<SettingsSync> {
    let stale: Vec<String> = custom.iter().filter(|c| !settings.iter().any(|(n, _)| n == *c)).cloned().collect();
    // The earlier clients' settings are reset first, then this client's
    // set, in the order it set them: changing the session authorization
    // resets the role, so a role set after it is set again after it.
    let mut sql: String = stale.iter().map(|name| format!("RESET {};", build::quote_ident(name))).collect();
    let mut role_reset = stale.iter().any(|n| n == "session_authorization");
    let mut select = String::new();
    let mut set = Vec::new();
    for (i, (name, value)) in settings.iter().enumerate() {
        if params.get(name) == Some(value) && !(role_reset && name == "role") {
            continue;
        }
        role_reset |= name == "session_authorization";
        select.push_str(if select.is_empty() { "SELECT " } else { ", " });
        select.push_str(&format!("pg_catalog.set_config({}, {}, false)", build::quote_literal(name), build::quote_literal(value)));
        set.push(i);
    }
    if !select.is_empty() {
        sql.push_str(&select);
        sql.push(';');
    }
    (!sql.is_empty()).then_some(SettingsSync { sql, set, stale })
}

/// The client's error when the server refused its session settings.
fn settings_refused(fields: &[(u8, String)]) -> (String, String) {
    let field = |c: u8| wire::error_field(fields, c);
    let code = field(b'C').unwrap_or(sqlstate::INVALID_PARAMETER_VALUE).to_string();
    let message = format!(
        "pgfleet could not restore this session's settings on a server connection: {}",
        field(b'M').unwrap_or("the server refused them")
    );
    (code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::{HashMap, HashSet};

    fn settings(list: &[(&str, &str)]) -> Settings {
        list.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_role_is_set_after_what_resets_it() {
        let params: HashMap<String, String> = [("role".to_string(), "r1".to_string()), ("session_authorization".to_string(), "bob".to_string())].into();
        let custom: HashSet<String> = ["session_authorization".to_string(), "role".to_string()].into();
        // The last client was bob acting as r1; this one is the login
        // acting as r1: the RESET of bob resets the role, set again after.
        let sync = sync_sql(&settings(&[("role", "r1")]), &params, &custom).unwrap();
        assert_eq!(sync.sql, "RESET \"session_authorization\";SELECT pg_catalog.set_config('role', 'r1', false);");
        // This client set the authorization, then a role: both, in that order.
        let sync = sync_sql(&settings(&[("session_authorization", "alice"), ("role", "r1")]), &params, &custom).unwrap();
        assert_eq!(sync.sql, "SELECT pg_catalog.set_config('session_authorization', 'alice', false), pg_catalog.set_config('role', 'r1', false);");
        // Nothing differs: nothing to run.
        assert!(sync_sql(&settings(&[("session_authorization", "bob"), ("role", "r1")]), &params, &custom).is_none());
    }
}
