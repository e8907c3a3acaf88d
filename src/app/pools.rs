//! The pools: created on first use (or pre-warmed), configured from the
//! current config, kept up by the upkeep task, retired by a reload.

use super::{App, PRIMARY};
use crate::backend::{BackendError, ConnectSpec};
use crate::pool::{Pool, PoolError, PoolKey, PoolSettings};
use crate::router::route::Target;
use crate::topology::Topology;
use std::sync::Arc;
use crate::wire::sqlstate;
use std::time::Duration;

impl App {
    /// The connect pacer of one server (all pools to it share it).
    pub(super) fn pacer(&self, addr: &str, rate: u32) -> Arc<crate::limits::TokenBucket> {
        let mut m = self.pacers.lock().unwrap();
        match m.get(addr) {
            Some((r, p)) if *r == rate => p.clone(),
            _ => {
                let p = Arc::new(crate::limits::TokenBucket::new(f64::from(rate), f64::from(rate)));
                m.insert(addr.to_string(), (rate, p.clone()));
                p
            }
        }
    }

    /// The pool for (database, user, backend), created on first use, when
    /// the config has the database and the user (a reload may have removed
    /// them: it retires their pools under the same lock).
    /// `topo` must be the topology the target was chosen with.
    /// A replica the current topology no longer has gets `Retired` (the
    /// caller routes again under the new one).
    pub fn pool(&self, database: &str, user: &str, target: Target, topo: &Topology) -> Result<Arc<Pool>, PoolError> {
        // The writer is read under the pools' lock, as by every other
        // re-pointing: one that read it before a failover and took the lock
        // after must not point the pool back at the old primary.
        let mut pools = self.pools.lock().unwrap();
        let (backend, addr) = match target {
            // After a failover the primary pool follows the promoted server.
            Target::Primary => (PRIMARY.to_string(), topo.writer_addr().unwrap_or(&topo.primary).to_string()),
            Target::Replica(i) => (topo.replicas[i].name.clone(), topo.replicas[i].addr.clone()),
        };
        let key = PoolKey { database: database.into(), user: user.into(), backend };
        if let Some(p) = pools.get(&key) {
            // Only under the current topology: a session still holding the
            // one from before a reload would point the pool back at the
            // old primary.
            if target == Target::Primary && !p.addr_is(&addr) && std::ptr::eq(topo, &*self.topology()) {
                p.retarget(self.pool_params(&key, &addr).0);
            }
            return Ok(p.clone());
        }
        if let Some(e) = self.removed(database, user) {
            return Err(PoolError::Connect(e));
        }
        if matches!(target, Target::Replica(_)) && !self.topology().replicas.iter().any(|r| r.name == key.backend && r.addr == addr) {
            return Err(PoolError::Retired);
        }
        let (spec, settings) = self.pool_params(&key, &addr);
        let pool = Pool::new(key.clone(), spec, settings, self.conns.clone(), &self.metrics);
        pools.insert(key, pool.clone());
        Ok(pool)
    }

    /// Connection spec and settings of a pool under the current config.
    pub(super) fn pool_params(&self, key: &PoolKey, addr: &str) -> (ConnectSpec, PoolSettings) {
        let cfg = self.config();
        let user = cfg.user(&key.user);
        let password = user.and_then(|u| u.server_login_password().map(str::to_string));
        let dbname = cfg.database(&key.database).map(|d| d.server_name().to_string()).unwrap_or_else(|| key.database.clone());
        let spec = ConnectSpec {
            addr: addr.to_string(),
            user: key.user.clone(),
            database: dbname,
            password,
            connect_timeout: cfg.pool.connect_timeout.0,
            require_primary: key.backend == PRIMARY,
            tls: self.server_tls.read().unwrap().clone(),
            pacer: (cfg.pool.max_connects_per_second > 0).then(|| self.pacer(addr, cfg.pool.max_connects_per_second)),
            passthrough: if user.is_none() { self.passthrough.lock().unwrap().get(&key.user).cloned() } else { None },
        };
        let settings = PoolSettings {
            size: cfg.pool_size_for(&key.user),
            min_size: cfg.pool.min_size,
            checkout_timeout: cfg.pool.checkout_timeout.0,
            idle_timeout: cfg.pool.server_idle_timeout.0,
            lifetime: cfg.pool.server_lifetime.0,
            login_retry: cfg.pool.server_login_retry.0,
        };
        (spec, settings)
    }

    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools.lock().unwrap().values().cloned().collect()
    }

    /// With `pool.min_size`, the pools to keep warm exist from the start (and
    /// after a reload): the primary's and each replica's, for every database
    /// and every user pgfleet can log in as (not admin-only users, not
    /// verifier-only users without a server_password).
    pub(super) fn create_prewarmed_pools(&self) {
        let cfg = self.config();
        if cfg.pool.min_size == 0 {
            return;
        }
        let topo = self.topology();
        for db in &cfg.databases {
            for user in cfg.users.iter().filter(|u| !cfg.admin.users.contains(&u.name) && u.server_login_password().is_some()) {
                // (From the config just read: only a later reload removes them.)
                let _ = self.pool(&db.name, &user.name, Target::Primary, &topo);
                for i in 0..topo.replicas.len() {
                    let _ = self.pool(&db.name, &user.name, Target::Replica(i), &topo);
                }
            }
        }
    }

    /// Pool upkeep: idle/lifetime expiry and `min_size` pre-warming.
    pub(super) async fn maintain(self: Arc<Self>) {
        let mut shutdown = self.shutdown_signal();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            for pool in self.pools() {
                for _ in 0..pool.maintain() {
                    let pool = pool.clone();
                    // On the workers: the connection is theirs to drive.
                    self.main.spawn(async move { pool.prewarm_one().await });
                }
            }
        }
    }

    /// Why the current config has no place for this client's database or
    /// user (a reload removed it), if so.
    pub fn removed(&self, database: &str, user: &str) -> Option<BackendError> {
        let cfg = self.config();
        if cfg.database(database).is_none() {
            return Some(BackendError::Removed(sqlstate::INVALID_CATALOG_NAME, format!("database \"{database}\" was removed from pgfleet's configuration")));
        }
        if cfg.user(user).is_none() && cfg.auth.auth_query.is_none() {
            return Some(BackendError::Removed(sqlstate::INVALID_AUTHORIZATION, format!("user \"{user}\" was removed from pgfleet's configuration")));
        }
        None
    }

    /// Sessions of a database or user the reload removed end once idle
    /// outside a transaction (a pinned or session-mode client would
    /// otherwise never look at the config again).
    pub(super) fn end_removed_sessions(&self) {
        // A removed database's PAUSE goes with it (RESUME could no longer
        // name it): its waiting clients are told.
        let cfg = self.config();
        let lifted = {
            let mut paused = self.paused.lock().unwrap();
            let before = paused.len();
            paused.retain(|d| d == "*" || cfg.database(d).is_some());
            self.any_paused.store(!paused.is_empty(), std::sync::atomic::Ordering::Release);
            paused.len() != before
        };
        if lifted {
            self.resumed.notify_waiters();
        }
        let clients: Vec<_> = self.conns.clients.lock().unwrap().values().cloned().collect();
        for c in clients.iter().filter(|c| self.removed(&c.database, &c.user).is_some()) {
            c.signal.raise(crate::stats::REMOVED);
        }
    }

    /// Retires the pools of a server, database or user the config no
    /// longer has (auth_query users are not listed: theirs stay while it
    /// is on).
    pub(super) fn retire_removed_pools(&self, topo: &Topology) {
        let cfg = self.config();
        let mut retired = Vec::new();
        self.pools.lock().unwrap().retain(|key, pool| {
            let keep = (key.backend == PRIMARY || topo.replicas.iter().any(|r| r.name == key.backend))
                && cfg.database(&key.database).is_some()
                && (cfg.user(&key.user).is_some() || cfg.auth.auth_query.is_some());
            if !keep {
                retired.push(pool.clone());
            }
            keep
        });
        for pool in retired {
            pool.retire();
        }
    }
}
