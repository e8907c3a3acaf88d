//! Builds pgfleet from a `Config` and owns its parts: pools, cancel keys,
//! the statement registry, client admission and shutdown. No process-global
//! state: tests run several proxies in one process.

use crate::config::Config;
use crate::frontend::{self, cancel::CancelRegistry};
use crate::pool::{Pool, PoolKey};
use crate::relay::stmts::Registry;
use crate::stats::{Connections, Metrics, WorkloadCounters};
use crate::topology::{run_monitor, MonitorSpec, Topology};
use crate::wire::auth::{ScramVerifier, Secret};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use crate::net::bind_reuseport;

mod auth_query;
mod control;
mod pools;

pub const PRIMARY: &str = "primary";

pub use crate::frontend::lockout::LoginAttempt;

pub struct App {
    /// The configuration in force; replaced whole by a reload.
    config: RwLock<Arc<Config>>,
    /// Users' secrets derived from `config`; replaced with it.
    secrets: RwLock<Arc<HashMap<String, Secret>>>,
    /// Client-facing TLS (certificate re-read on every reload).
    tls: RwLock<Option<Arc<crate::tls::ServerTls>>>,
    /// Server-facing TLS of `config`.
    server_tls: RwLock<Option<Arc<crate::tls::ClientTls>>>,
    /// Clients' session settings, shared by content (see intern_settings).
    settings: Mutex<HashMap<u64, std::sync::Weak<crate::relay::Settings>>>,
    /// auth_query users: what their logins proved, shared with their pools.
    passthrough: Mutex<HashMap<String, Arc<RwLock<crate::backend::Passthrough>>>>,
    /// Connect pacing per server address (and its rate).
    pacers: Mutex<HashMap<String, (u32, Arc<crate::limits::TokenBucket>)>>,
    /// Per database: which of its functions are VOLATILE (routing).
    pub catalogs: crate::catalog::Catalogs,
    /// Failed logins per client address (see login_attempt).
    failed_logins: crate::frontend::lockout::FailedLogins,
    /// `[[limits]]` of `config` with their live state; replaced with it.
    limits: RwLock<Arc<crate::limits::Limits>>,
    /// Replicas, groups and the lag snapshot; replaced when a reload changes them.
    topology: RwLock<Arc<Topology>>,
    /// Stops the monitor of the current topology.
    monitor_stop: Mutex<Option<watch::Sender<bool>>>,
    /// The runtime that relays clients (server connections are opened on
    /// it, so their I/O is driven by its workers).
    main: tokio::runtime::Handle,
    /// The control thread's runtime (see `control`).
    control: tokio::runtime::Handle,
    /// Guards the pool map; held only to look up or insert a pool.
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    pub cancels: Arc<CancelRegistry>,
    pub stmts: Registry,
    clients: AtomicUsize,
    /// Connections past their startup packet (held to max_client_conn).
    logins: AtomicUsize,
    /// Clients pinned to a server connection by session-only state.
    pub pinned_clients: AtomicUsize,
    shutdown: watch::Sender<bool>,
    /// auth_query's one connection (keyed by where and as whom it logged
    /// in, and the config generation), shared by every lookup.
    auth_lookup: tokio::sync::Mutex<Option<(String, tokio_postgres::Client)>>,
    /// Per-process secret behind the mock SCRAM salts of unknown users. (Not
    /// derived from the configured secrets: the salt anyone can ask for
    /// would let a weak password be guessed offline.)
    mock_secret: [u8; 32],
    /// The file `RELOAD` and SIGHUP read, when pgfleet was started from one.
    pub config_path: Mutex<Option<PathBuf>>,
    pub metrics: Metrics,
    /// Live client and server connections (SHOW CLIENTS / SERVERS).
    pub conns: Arc<Connections>,
    /// Guards the workload -> counters map; held for a lookup/insert.
    workloads: Mutex<HashMap<String, Arc<WorkloadCounters>>>,
    /// Databases paused by the admin console (PAUSE); guarded briefly.
    paused: Mutex<std::collections::HashSet<String>>,
    /// Wakes sessions waiting on a paused database.
    pub resumed: tokio::sync::Notify,
    pub started: std::time::Instant,
    /// Bumped by every applied reload; sessions re-read config/topology when it moves.
    generation: AtomicU64,
    /// Held while a reload applies.
    reloading: Mutex<()>,
    /// Fast path for PAUSE checks: true while any database is paused.
    any_paused: std::sync::atomic::AtomicBool,
}

/// Counts a connected client while alive.
/// A connection counted against `max_client_conn` (with the startup
/// reserve), and once its startup packet was read, a login slot.
pub struct ClientGuard(Arc<App>, bool);

impl ClientGuard {
    /// Takes one of the `max_client_conn` login slots; false when all are
    /// taken.
    pub fn claim_login(&mut self) -> bool {
        let max = self.0.config().listen.max_client_conn;
        if self.0.logins.fetch_add(1, Ordering::AcqRel) >= max {
            self.0.logins.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        self.1 = true;
        true
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
        if self.1 {
            self.0.logins.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Each user's secret. A plaintext password unchanged since `previous`
/// keeps its derived SCRAM verifier: a fresh random salt at every reload
/// would tell configured names from unknown ones, whose mock salt stays.
fn derive_secrets(config: &Config, previous: Option<&HashMap<String, Secret>>) -> HashMap<String, Secret> {
    config
        .users
        .iter()
        .filter_map(|u| {
            let pw = u.password.as_deref()?;
            let kept = previous.and_then(|p| p.get(&u.name)).filter(|s| s.plaintext() == Some(pw));
            kept.cloned().or_else(|| Secret::from_config(pw).ok()).map(|s| (u.name.clone(), s))
        })
        .collect()
}

impl App {
    pub fn new(config: Config) -> Arc<App> {
        Arc::new(App {
            secrets: RwLock::new(Arc::new(derive_secrets(&config, None))),
            topology: RwLock::new(Arc::new(Topology::from_config(&config, None))),
            tls: RwLock::new(crate::tls::ServerTls::from_config(&config.listen).unwrap_or_else(|e| {
                tracing::error!("{e}");
                None
            })),
            server_tls: RwLock::new(
                crate::tls::ClientTls::new(config.cluster.server_tls_mode, config.cluster.server_tls_ca.as_deref()).unwrap_or_else(|e| {
                    tracing::error!("{e}");
                    None
                }),
            ),
            failed_logins: Default::default(),
            catalogs: Default::default(),
            pacers: Mutex::new(HashMap::new()),
            passthrough: Mutex::new(HashMap::new()),
            settings: Mutex::new(HashMap::new()),
            limits: RwLock::new(Arc::new(crate::limits::Limits::new(&config.limits, config.pool.checkout_timeout.0))),
            monitor_stop: Mutex::new(None),
            main: tokio::runtime::Handle::current(),
            control: control::start(),
            pools: Mutex::new(HashMap::new()),
            cancels: Arc::new(CancelRegistry::default()),
            stmts: Registry::default(),
            clients: AtomicUsize::new(0),
            logins: AtomicUsize::new(0),
            pinned_clients: AtomicUsize::new(0),
            shutdown: watch::channel(false).0,
            mock_secret: rand::random(),
            auth_lookup: tokio::sync::Mutex::new(None),
            config: RwLock::new(Arc::new(config)),
            config_path: Mutex::new(None),
            metrics: Metrics::new(),
            conns: Arc::new(Connections::default()),
            workloads: Mutex::new(HashMap::new()),
            paused: Mutex::new(Default::default()),
            resumed: tokio::sync::Notify::new(),
            started: std::time::Instant::now(),
            generation: AtomicU64::new(0),
            reloading: Mutex::new(()),
            any_paused: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// What an unknown user's login is run against, so the exchange looks
    /// like a real user's and names cannot be probed: a salt that is stable
    /// per name (as PostgreSQL's mock salt; a random one per attempt, or one
    /// shared by all unknown names, would tell them apart from real users),
    /// the usual 4096 iterations, and keys no proof matches.
    pub fn mock_verifier(&self, user: &str) -> ScramVerifier {
        use sha2::{Digest, Sha256};
        let derive = |label: &[u8]| -> [u8; 32] {
            Sha256::new()
                .chain_update(self.mock_secret)
                .chain_update(label)
                .chain_update(user.as_bytes())
                .finalize()
                .into()
        };
        ScramVerifier {
            iterations: 4096,
            salt: derive(b"salt")[..16].to_vec(),
            stored_key: derive(b"stored"),
            server_key: derive(b"server"),
        }
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.read().unwrap().clone()
    }

    /// The client-facing TLS acceptor, unless TLS is disabled.
    pub fn tls(&self) -> Option<Arc<crate::tls::ServerTls>> {
        self.tls.read().unwrap().clone()
    }

    /// Records what an auth_query user's login proved, for its pools.
    pub fn remember_login(&self, user: &str, proof: crate::backend::Passthrough) {
        {
            let mut m = self.passthrough.lock().unwrap();
            let slot = m.entry(user.to_string()).or_default();
            *slot.write().unwrap() = proof;
        }
        // A refusal of the user's old credentials does not stand for these.
        for pool in self.pools.lock().unwrap().values().filter(|p| p.key.user == user) {
            pool.forget_login_refusal();
        }
    }

    /// One shared copy of each distinct settings list in use (clients copy
    /// on write when they change theirs): an idle client then costs a
    /// pointer, not a dozen small strings.
    pub fn intern_settings(&self, settings: crate::relay::Settings) -> Arc<crate::relay::Settings> {
        let fp = crate::relay::fingerprint(&settings);
        let mut map = self.settings.lock().unwrap();
        if let Some(shared) = map.get(&fp).and_then(std::sync::Weak::upgrade) {
            if *shared == settings {
                return shared;
            }
        }
        if map.len() >= 1024 {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let shared = Arc::new(settings);
        map.insert(fp, Arc::downgrade(&shared));
        shared
    }

    /// Seconds until `ip` may try to log in again, if it failed too often.
    pub fn login_blocked(&self, ip: std::net::IpAddr) -> Option<u64> {
        self.failed_logins.blocked(ip, self.login_limit())
    }

    /// Right before a password or SCRAM proof is checked (see
    /// `FailedLogins::attempt`).
    pub fn login_attempt(&self, ip: std::net::IpAddr) -> Result<LoginAttempt<'_>, u64> {
        self.failed_logins.attempt(ip, self.login_limit())
    }

    /// Counts a failed login of `ip` that checked no proof.
    pub fn record_failed_login(&self, ip: std::net::IpAddr) {
        self.failed_logins.record(ip, self.login_limit().window);
    }

    fn login_limit(&self) -> crate::frontend::lockout::Limit {
        let cfg = self.config();
        crate::frontend::lockout::Limit { max: cfg.auth.max_failed_logins, window: cfg.auth.failed_login_window.0 }
    }

    pub fn limits(&self) -> Arc<crate::limits::Limits> {
        self.limits.read().unwrap().clone()
    }

    pub fn topology(&self) -> Arc<Topology> {
        self.topology.read().unwrap().clone()
    }

    pub fn secret(&self, user: &str) -> Option<Secret> {
        self.secrets.read().unwrap().get(user).cloned()
    }

    /// Applies a new, already validated configuration without dropping
    /// clients: pools whose settings changed are reconfigured in place,
    /// users/databases/rules apply to new logins and new transactions, and
    /// a changed cluster gets a new topology and monitor. `listen.addr` and
    /// `pool.mode` need a restart (reported as warnings).
    pub fn apply(self: &Arc<Self>, new: Config) -> Vec<String> {
        // One reload at a time (SIGHUP and admin RELOAD together would mix
        // one file's secrets with the other's config).
        let _one = self.reloading.lock().unwrap();
        let old = self.config();
        let old_monitor = self.monitor_spec().map(|m| (m.user, m.password, m.database));
        let mut notes = Vec::new();
        if new.listen.addr != old.listen.addr {
            notes.push("listen.addr changes need a restart; still listening on the old address".to_string());
        }
        if new.pool.mode != old.pool.mode {
            notes.push("pool.mode changes apply to new clients only".to_string());
        }
        if new.admin.metrics_addr != old.admin.metrics_addr {
            notes.push("admin.metrics_addr changes need a restart; the metrics endpoint stays where it was".to_string());
        }
        if new.log.level != old.log.level || new.log.format != old.log.format {
            notes.push("log.level and log.format changes need a restart".to_string());
        }
        if new.listen.unix_socket_dir != old.listen.unix_socket_dir || new.listen.unix_socket_mode != old.listen.unix_socket_mode {
            notes.push("listen.unix_socket_dir and unix_socket_mode changes need a restart".to_string());
        }
        if new.runtime.workers != old.runtime.workers {
            notes.push("runtime.workers changes need a restart".to_string());
        }
        let secrets = derive_secrets(&new, Some(&self.secrets.read().unwrap()));
        *self.secrets.write().unwrap() = Arc::new(secrets);
        match crate::tls::ServerTls::from_config(&new.listen) {
            Ok(t) => *self.tls.write().unwrap() = t,
            Err(e) => notes.push(format!("TLS not reloaded, the previous certificate stays in use: {e}")),
        }
        match crate::tls::ClientTls::new(new.cluster.server_tls_mode, new.cluster.server_tls_ca.as_deref()) {
            Ok(t) => *self.server_tls.write().unwrap() = t,
            Err(e) => notes.push(format!("server TLS not reloaded: {e}")),
        }
        if new.routing.read_functions != old.routing.read_functions {
            self.catalogs.invalidate_all();
        }
        let mut cluster_changed = new.cluster != old.cluster;
        if new.limits != old.limits || new.pool.checkout_timeout != old.pool.checkout_timeout {
            // Unchanged rules keep their state; new and changed ones start
            // fresh (transactions holding their old permits finish under them).
            let limits = crate::limits::Limits::reloaded(&new.limits, new.pool.checkout_timeout.0, &self.limits());
            *self.limits.write().unwrap() = Arc::new(limits);
        }
        *self.config.write().unwrap() = Arc::new(new);
        // Who the monitor logs in as (a rotated password, another
        // health user or database) counts as a change of [cluster]: the
        // old monitor would fail at its next reconnect.
        cluster_changed |= self.monitor_spec().map(|m| (m.user, m.password, m.database)) != old_monitor;
        if cluster_changed {
            let topo = Arc::new(Topology::from_config(&self.config(), Some(&self.topology())));
            *self.topology.write().unwrap() = topo;
            self.restart_monitor();
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.create_prewarmed_pools();
        let topo = self.topology();
        {
            // Under the pools' lock, the writer read there (see `pool`).
            let pools = self.pools.lock().unwrap();
            for pool in pools.values() {
                let addr = if pool.key.backend == PRIMARY {
                    Some(topo.writer_addr().unwrap_or(&topo.primary).to_string())
                } else {
                    topo.replicas.iter().find(|r| r.name == pool.key.backend).map(|r| r.addr.clone())
                };
                if let Some(addr) = addr {
                    let (spec, settings) = self.pool_params(&pool.key, &addr);
                    pool.reconfigure(spec, settings);
                }
            }
        }
        self.retire_removed_pools(&topo);
        self.end_removed_sessions();
        notes
    }

    /// Reads, validates and applies the config file. An invalid file
    /// changes nothing; the error lists every problem.
    pub fn reload(self: &Arc<Self>) -> Result<Vec<String>, String> {
        let path = self.config_path.lock().unwrap().clone().ok_or("pgfleet was not started from a config file")?;
        let cfg = Config::load(&path).map_err(|e| e.to_string())?;
        let notes = self.apply(cfg);
        tracing::info!(path = %path.display(), "configuration reloaded");
        for n in &notes {
            tracing::warn!("{n}");
        }
        Ok(notes)
    }

    fn restart_monitor(&self) {
        if let Some(stop) = self.monitor_stop.lock().unwrap().take() {
            let _ = stop.send(true);
        }
        let topo = self.topology();
        if topo.replicas.is_empty() {
            return;
        }
        match self.monitor_spec() {
            Some(spec) => {
                let (tx, rx) = watch::channel(false);
                *self.monitor_stop.lock().unwrap() = Some(tx);
                let restarts = self.metrics.background_restarts.with_label_values(&["lag_monitor"]);
                control::supervise(&self.control, "lag monitor", restarts, move || run_monitor(topo.clone(), spec.clone(), rx.clone()));
            }
            None => {
                tracing::warn!("no user with a known server password for the lag monitor: replicas stay unused");
                // Not what an earlier monitor saw (a reload): unchecked is unused.
                topo.unmonitored("no lag monitor: no user with a known server password (cluster.health_user)");
            }
        }
    }

    /// Stop accepting; sessions finish their transactions and leave.
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown.send(true);
        // Sessions listed from here on see the watch's value when they start.
        for c in self.conns.clients.lock().unwrap().values() {
            c.signal.raise(crate::stats::SHUTDOWN);
        }
        if let Some(stop) = self.monitor_stop.lock().unwrap().take() {
            let _ = stop.send(true);
        }
    }

    /// The control thread's runtime (background work; see `control`).
    pub(crate) fn control(&self) -> &tokio::runtime::Handle {
        &self.control
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Acquire)
    }

    /// Admits one more connection to its startup phase unless
    /// `max_client_conn` plus a reserve is reached. The reserve lets a
    /// CancelRequest in when every client slot is taken (its packet is only
    /// read after accepting); a login is held to `max_client_conn` itself
    /// once its startup packet is read (`ClientGuard::claim_login`), as
    /// PostgreSQL checks for "too many clients" after the cancel requests.
    pub fn admit_client(self: &Arc<Self>) -> Option<ClientGuard> {
        let max = self.config().listen.max_client_conn;
        let prev = self.clients.fetch_add(1, Ordering::AcqRel);
        let guard = ClientGuard(self.clone(), false);
        (prev < max + (max / 10).max(16)).then_some(guard)
    }

    /// Who the lag monitor connects as.
    pub(crate) fn monitor_spec(&self) -> Option<MonitorSpec> {
        let cfg = self.config();
        let user = match &cfg.cluster.health_user {
            Some(u) => cfg.user(u)?,
            // A user with a password first; else one without any (trust).
            None => cfg.users.iter().find(|u| u.server_login_password().is_some()).or_else(|| cfg.users.iter().find(|u| u.logs_in_by_itself()))?,
        };
        let password = user.server_login_password().map(str::to_string);
        let db = match &cfg.cluster.health_database {
            Some(d) => cfg.database(d)?,
            None => cfg.databases.first()?,
        };
        Some(MonitorSpec {
            user: user.name.clone(),
            password,
            database: db.server_name().to_string(),
            interval: cfg.cluster.lag_check_interval.0,
            tls: self.server_tls.read().unwrap().clone(),
        })
    }

    pub fn workload_counters(&self, workload: &str) -> Arc<WorkloadCounters> {
        self.workloads.lock().unwrap().entry(workload.to_string()).or_default().clone()
    }

    pub fn workload_list(&self) -> Vec<(String, Arc<WorkloadCounters>)> {
        let mut v: Vec<_> = self.workloads.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn is_paused(&self, database: &str) -> bool {
        if !self.any_paused.load(Ordering::Acquire) {
            return false;
        }
        let p = self.paused.lock().unwrap();
        p.contains(database) || p.contains("*")
    }

    /// PAUSE: new transactions of `database` (None = all) wait for RESUME.
    pub fn pause(&self, database: Option<&str>) {
        self.paused.lock().unwrap().insert(database.unwrap_or("*").to_string());
        self.any_paused.store(true, Ordering::Release);
    }

    /// RESUME (all, or one database). Resuming a database that is not
    /// paused on its own is an error, as in PgBouncer: after a global PAUSE
    /// only a global RESUME lifts it.
    pub fn resume(&self, database: Option<&str>) -> Result<(), String> {
        let mut p = self.paused.lock().unwrap();
        match database {
            Some(d) => {
                if !p.remove(d) {
                    return Err(if p.contains("*") {
                        format!("database {d} is not paused on its own: everything is (PAUSE without a database); RESUME without a database lifts that")
                    } else {
                        format!("database {d} is not paused")
                    });
                }
            }
            None => p.clear(),
        }
        self.any_paused.store(!p.is_empty(), Ordering::Release);
        drop(p);
        self.resumed.notify_waiters();
        Ok(())
    }

}

/// A running pgfleet: its address, and the handle to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    /// Where /metrics is served, when `admin.metrics_addr` is set.
    pub metrics_addr: Option<SocketAddr>,
    /// The Unix-domain socket file, when `listen.unix_socket_dir` is set.
    pub unix_socket: Option<std::path::PathBuf>,
}

impl Running {
    /// Stops accepting, lets sessions finish their transactions, and waits up
    /// to `grace` for clients to leave.
    pub async fn shutdown(&self, grace: Duration) {
        self.app.begin_shutdown();
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
    let cfg = app.config();
    app.create_prewarmed_pools();
    let upkeep = app.clone();
    let restarts = app.metrics.background_restarts.with_label_values(&["pool_upkeep"]);
    control::supervise(&app.control, "pool upkeep", restarts, move || upkeep.clone().maintain());
    app.restart_monitor();
    app.preload_catalogs();
    let metrics_addr = match &cfg.admin.metrics_addr {
        Some(a) => {
            let std_listener = std::net::TcpListener::bind(a)?;
            std_listener.set_nonblocking(true)?;
            let bound = std_listener.local_addr()?;
            // Registered with the control runtime, which serves it.
            let app2 = app.clone();
            app.control.spawn(async move {
                match TcpListener::from_std(std_listener) {
                    Ok(l) => crate::admin::http::serve(app2, l).await,
                    Err(e) => tracing::error!(error = %e, "metrics endpoint"),
                }
            });
            Some(bound)
        }
        None => None,
    };
    let unix_socket = match &cfg.listen.unix_socket_dir {
        Some(dir) => {
            let path = std::path::Path::new(dir).join(format!(".s.PGSQL.{}", addr.port()));
            let listener = crate::net::bind_unix(&path, cfg.listen.unix_socket_mode().unwrap_or(0o777))?;
            tokio::spawn(serve_unix(app.clone(), frontend::Listener::Unix { listener, local: addr }, path.clone()));
            Some(path)
        }
        None => None,
    };
    tokio::spawn(frontend::accept_loop(app.clone(), frontend::Listener::Tcp(listener)));
    Ok(Running { addr, app, metrics_addr, unix_socket })
}

/// Serves the Unix-domain socket `path` until shutdown, then removes the
/// file unless another pgfleet has taken it over since (see bind_unix).
async fn serve_unix(app: Arc<App>, listener: frontend::Listener, path: std::path::PathBuf) {
    use std::os::unix::fs::MetadataExt;
    let identity = || std::fs::metadata(&path).map(|m| (m.dev(), m.ino())).ok();
    let ours = identity();
    frontend::accept_loop(app, listener).await;
    if ours.is_some() && identity() == ours {
        let _ = std::fs::remove_file(&path);
    }
}
