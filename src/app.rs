//! Builds pgfleet from a `Config` and owns its parts: pools, cancel keys,
//! the statement registry, client admission and shutdown. No process-global
//! state: tests run several proxies in one process.

use crate::backend::ConnectSpec;
use crate::config::Config;
use crate::frontend::{self, cancel::CancelRegistry};
use crate::pool::{Pool, PoolKey, PoolSettings};
use crate::relay::stmts::Registry;
use crate::router::route::Target;
use crate::topology::{run_monitor, MonitorSpec, Topology};
use crate::wire::auth::{ScramVerifier, Secret};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub const PRIMARY: &str = "primary";

pub struct App {
    config: Arc<Config>,
    secrets: HashMap<String, Secret>,
    /// Guards the pool map; held only to look up or insert a pool.
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    pub cancels: Arc<CancelRegistry>,
    pub stmts: Registry,
    clients: AtomicUsize,
    /// Clients pinned to a server connection by session-only state.
    pub pinned_clients: AtomicUsize,
    shutdown: watch::Sender<bool>,
    pub dummy_verifier: ScramVerifier,
    pub topology: Arc<Topology>,
}

/// Counts a connected client while alive.
pub struct ClientGuard(Arc<App>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

impl App {
    pub fn new(config: Config) -> Arc<App> {
        let secrets = config
            .users
            .iter()
            .filter_map(|u| {
                let pw = u.password.as_deref()?;
                Secret::from_config(pw).ok().map(|s| (u.name.clone(), s))
            })
            .collect();
        let dummy = postgres_protocol::password::scram_sha_256(&rand::random::<[u8; 16]>());
        Arc::new(App {
            secrets,
            pools: Mutex::new(HashMap::new()),
            cancels: Arc::new(CancelRegistry::default()),
            stmts: Registry::default(),
            clients: AtomicUsize::new(0),
            pinned_clients: AtomicUsize::new(0),
            shutdown: watch::channel(false).0,
            dummy_verifier: ScramVerifier::parse(&dummy).expect("valid verifier"),
            topology: Arc::new(Topology::from_config(&config)),
            config: Arc::new(config),
        })
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.clone()
    }

    pub fn secret(&self, user: &str) -> Option<Secret> {
        self.secrets.get(user).cloned()
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Acquire)
    }

    /// Admits one more client unless `max_client_conn` is reached.
    pub fn admit_client(self: &Arc<Self>) -> Option<ClientGuard> {
        let max = self.config.listen.max_client_conn;
        let prev = self.clients.fetch_add(1, Ordering::AcqRel);
        let guard = ClientGuard(self.clone());
        (prev < max).then_some(guard)
    }

    /// The pool for (database, user, backend), created on first use.
    pub fn pool(&self, database: &str, user: &str, target: Target) -> Arc<Pool> {
        let (backend, addr) = match target {
            Target::Primary => (PRIMARY, &self.config.cluster.primary),
            Target::Replica(i) => (self.topology.replicas[i].name.as_str(), &self.topology.replicas[i].addr),
        };
        let key = PoolKey { database: database.into(), user: user.into(), backend: backend.into() };
        let mut pools = self.pools.lock().unwrap();
        if let Some(p) = pools.get(&key) {
            return p.clone();
        }
        let pool = self.make_pool(key.clone(), addr);
        pools.insert(key, pool.clone());
        pool
    }

    /// Who the lag monitor connects as.
    fn monitor_spec(&self) -> Option<MonitorSpec> {
        let cfg = &self.config;
        let user = match &cfg.cluster.health_user {
            Some(u) => cfg.user(u)?,
            None => cfg.users.iter().find(|u| u.server_password.is_some() || self.secrets.get(&u.name).is_some_and(|s| s.plaintext().is_some()))?,
        };
        let password = user.server_password.clone().or_else(|| self.secrets.get(&user.name)?.plaintext().map(str::to_string));
        let db = match &cfg.cluster.health_database {
            Some(d) => cfg.database(d)?,
            None => cfg.databases.first()?,
        };
        Some(MonitorSpec {
            user: user.name.clone(),
            password,
            database: db.server_name().to_string(),
            interval: cfg.cluster.lag_check_interval.0,
        })
    }

    fn make_pool(&self, key: PoolKey, addr: &str) -> Arc<Pool> {
        let cfg = &self.config;
        let user = cfg.user(&key.user);
        let password = user.and_then(|u| {
            u.server_password.clone().or_else(|| self.secrets.get(&u.name)?.plaintext().map(str::to_string))
        });
        let dbname = cfg.database(&key.database).map(|d| d.server_name().to_string()).unwrap_or_default();
        let spec = ConnectSpec {
            addr: addr.to_string(),
            user: key.user.clone(),
            database: dbname,
            password,
            connect_timeout: cfg.pool.connect_timeout.0,
        };
        let settings = PoolSettings {
            size: cfg.pool_size_for(&key.user),
            min_size: cfg.pool.min_size,
            checkout_timeout: cfg.pool.checkout_timeout.0,
            idle_timeout: cfg.pool.server_idle_timeout.0,
            lifetime: cfg.pool.server_lifetime.0,
        };
        Pool::new(key, spec, settings)
    }

    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools.lock().unwrap().values().cloned().collect()
    }

    /// Pool upkeep: idle/lifetime expiry and `min_size` pre-warming.
    async fn maintain(self: Arc<Self>) {
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
                    tokio::spawn(async move { pool.prewarm_one().await });
                }
            }
        }
    }
}

/// A running pgfleet: its address, and the handle to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub app: Arc<App>,
}

impl Running {
    /// Stops accepting, lets sessions finish their transactions, and waits up
    /// to `grace` for clients to leave.
    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.app.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        while self.app.client_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Starts serving on `listener` (bind port 0 in tests).
pub fn start(config: Config, listener: TcpListener) -> std::io::Result<Running> {
    let addr = listener.local_addr()?;
    let app = App::new(config);
    if app.config.pool.min_size > 0 {
        for db in &app.config.databases {
            for user in &app.config.users {
                if !app.config.admin.users.contains(&user.name) {
                    app.pool(&db.name, &user.name, Target::Primary);
                }
            }
        }
    }
    tokio::spawn(app.clone().maintain());
    if !app.topology.replicas.is_empty() {
        match app.monitor_spec() {
            Some(spec) => {
                tokio::spawn(run_monitor(app.topology.clone(), spec, app.shutdown_signal()));
            }
            None => tracing::warn!("no user with a known server password for the lag monitor: replicas stay unused"),
        }
    }
    tokio::spawn(frontend::accept_loop(app.clone(), listener));
    Ok(Running { addr, app })
}
