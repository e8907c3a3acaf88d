//! Binding a server connection to the session and letting it go: checkout
//! (with the PAUSE wait), bringing its settings in line, release at the end
//! of a transaction (after the state probe if one is due), and cleanup when
//! the client leaves.

use super::*;
use tracing::Instrument;

impl Session {
    /// Checks out a server connection and queues what brings it in line
    /// with this client's session settings.
    pub(super) async fn bind_server(&mut self, a: &Analysis, target: Target, topo: &Topology) -> Result<(), SessionError> {
        if self.app.is_paused(&self.database) {
            Box::pin(self.wait_while_paused()).await?;
        }
        self.info.state.store(CLIENT_WAITING, Ordering::Relaxed);
        let now = crate::stats::unix_us_at(self.now);
        self.info.wait_since_us.store(now, Ordering::Relaxed);
        let pool = self.pool_for(target, topo);
        let (checked_out, waited) = match pool.try_checkout_idle(self.now) {
            Some(conn) => (Ok((conn, target, pool)), false),
            // Boxed slow path (wait, connect, re-route): see checkout_routed.
            None => {
                // In the client's span: connects opened for it are its children.
                let span = self.span.clone();
                (Box::pin(self.checkout_routed(a, target, topo).instrument(span)).await, true)
            }
        };
        self.info.state.store(CLIENT_ACTIVE, Ordering::Relaxed);
        let (mut conn, target, pool) = checked_out?;
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
            let inflight = topo.replicas[i].inflight.clone();
            inflight.fetch_add(1, Ordering::Relaxed);
            self.bound_inflight = Some(inflight);
        }
        self.bound_target = Some(target);
        self.bound_pool = Some(pool);
        self.unnamed_here = false;
        if conn.settings_fp != self.settings_fp {
            if let Some(sql) = settings_sql(&self.settings, &mut conn) {
                build::query(&mut self.sout, &sql);
                self.expect.push(Pending::Swallow(Kind::Query));
            }
            conn.settings_fp = self.settings_fp;
        }
        self.cancel.set(CancelTarget {
            peer: conn.peer,
            pid: conn.backend_pid,
            secret: conn.backend_secret,
        });
        self.status = b'I';
        self.server = Some(conn);
        Ok(())
    }

    pub(super) fn is_clean(&self) -> bool {
        self.expect.is_empty() && !self.in_batch && self.sout.is_empty() && self.skip == 0
    }

    /// Transaction mode: return the connection at the end of a transaction.
    pub(super) fn maybe_release(&mut self) {
        if self.mode != PoolMode::Transaction || self.server.is_none() {
            return;
        }
        if self.status == b'I' && self.is_clean() && self.sin.is_empty() {
            if let Some(sql) = self.probe_sql() {
                build::query(&mut self.sout, &sql);
                self.expect.push(Pending::Swallow(Kind::Query));
                // A simple query ends the connection's unnamed statement.
                self.unnamed_here = false;
                return;
            }
            if self.pinned.is_some() {
                return;
            }
            let (conn, pool) = self.unbind().expect("checked");
            pool.checkin_at(conn, self.now);
        }
    }

    /// PAUSE: new transactions wait until RESUME (or shutdown).
    pub(super) async fn wait_while_paused(&mut self) -> Result<(), SessionError> {
        while self.app.is_paused(&self.database) {
            let resumed = self.app.resumed.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            if !self.app.is_paused(&self.database) {
                break;
            }
            tokio::select! {
                _ = resumed => {}
                _ = self.info.signal.raised(crate::stats::KILL) => return Err(SessionError::Killed),
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
        Ok(())
    }

    /// Takes the bound connection and the pool it belongs to.
    pub(super) fn unbind(&mut self) -> Option<(crate::pool::Conn, Arc<Pool>)> {
        let mut conn = self.server.take()?;
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
            SessionError::Shutdown => (sqlstate::ADMIN_SHUTDOWN.into(), "pgfleet is shutting down".into()),
            SessionError::Killed => (sqlstate::ADMIN_SHUTDOWN.into(), "connection killed by the pgfleet admin console (KILL)".into()),
            SessionError::Timeout(code, msg) => ((*code).into(), (*msg).into()),
        };
        self.app.metrics.errors.with_label_values(&[&code]).inc();
        tracing::info!(parent: &self.span, sqlstate = %code, error = %msg, "closing client session");
        let mut out = std::mem::take(&mut self.cout);
        build::error_response(&mut out, "FATAL", &code, &msg);
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
        }
        if ok && (self.mode == PoolMode::Session || was_pinned) {
            ok = conn.run_silently("DISCARD ALL", limit).await.is_ok();
            conn.prepared.clear();
            conn.custom.clear();
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

/// SQL that makes `conn`'s session match `settings` (None when it already
/// does). Updates the connection's recorded parameters accordingly.
fn settings_sql(settings: &Settings, conn: &mut ServerConn) -> Option<String> {
    let mut sql = String::new();
    for (name, value) in settings {
        if conn.params.get(name) == Some(value) {
            continue;
        }
        sql.push_str(if sql.is_empty() { "SELECT " } else { ", " });
        sql.push_str(&format!(
            "pg_catalog.set_config({}, {}, false)",
            build::quote_literal(name),
            build::quote_literal(value)
        ));
        conn.params.insert(name.clone(), value.clone());
        if !REPORTED_SETTABLE.contains(&name.as_str()) {
            conn.custom.insert(name.clone());
        }
    }
    let stale: Vec<String> = conn
        .custom
        .iter()
        .filter(|c| !settings.iter().any(|(n, _)| n == *c))
        .cloned()
        .collect();
    if !sql.is_empty() {
        sql.push(';');
    }
    for name in stale {
        sql.push_str(&format!("RESET {};", build::quote_ident(&name)));
        conn.custom.remove(&name);
        conn.params.remove(&name);
    }
    (!sql.is_empty()).then_some(sql)
}
