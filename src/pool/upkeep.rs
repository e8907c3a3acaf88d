//! The pool's upkeep: idle and lifetime expiry (`maintain`, run from the
//! control thread, see `app::control`), and `min_size` pre-warming
//! (`prewarm_one`, spawned on the workers, which drive the connection).

use super::Pool;
use std::time::Instant;

impl Pool {
    /// Periodic upkeep: close idle connections past `idle_timeout` (down to
    /// `min_size`) or past `lifetime`; returns how many to open to reach `min_size`.
    pub fn maintain(&self) -> usize {
        let settings = self.settings();
        let mut closed = Vec::new();
        let missing = {
            let mut s = self.state.lock().unwrap();
            let mut i = 0;
            while i < s.idle.len() {
                let c = &s.idle[i];
                let too_old = c.created.elapsed() >= settings.lifetime;
                // server_idle_timeout = 0: never closed for idleness (PgBouncer's meaning).
                let too_idle = !settings.idle_timeout.is_zero() && c.idle_since.elapsed() >= settings.idle_timeout && s.total > settings.min_size;
                let too_many = s.total > settings.size;
                let why = if too_old {
                    Some("server_lifetime reached")
                } else if too_idle {
                    Some("server_idle_timeout reached")
                } else if too_many {
                    Some("pool shrunk by a reload")
                } else if !c.looks_healthy() {
                    Some("closed by the server")
                } else {
                    None
                };
                if let Some(why) = why {
                    closed.push((s.idle.swap_remove(i), why));
                    s.total -= 1;
                } else {
                    i += 1;
                }
            }
            // Not while the server refuses the pool's login.
            let refused = self.login_refused_recently(settings.login_retry, Instant::now());
            let missing = if refused { 0 } else { settings.min_size.min(settings.size).saturating_sub(s.total) };
            s.total += missing;
            missing
        };
        for (c, why) in closed {
            c.terminate(why);
        }
        missing
    }

    /// Opens one pre-warmed connection in a slot reserved by `maintain`.
    /// Only with a connect token free now, and no backoff under way: the
    /// pre-warming of many pools must not run the connect pacer into debt
    /// that clients' connects then wait out (or fail on at once). The next
    /// upkeep tick tries again.
    pub async fn prewarm_one(&self) {
        match self.open_in_slot(Some(std::time::Instant::now())).await {
            Ok(c) => self.checkin(c),
            Err(Some(e)) => tracing::warn!(pool = %self.key, error = %e, "pre-warming a server connection failed"),
            Err(None) => {}
        }
    }
}
