//! Server connection pools, one per (database, user, backend). Checkout hands
//! out an idle connection (LIFO, so warm connections stay warm), opens a new
//! one while under `size`, or queues the caller FIFO until the checkout
//! deadline. Check-in hands the connection straight to the oldest waiter.

use crate::backend::{BackendError, ConnectSpec, ServerConn};

/// A pooled connection: boxed, so moving it between the pool and a session
/// moves a pointer, and an idle session does not carry its bytes inline.
pub type Conn = Box<ServerConn>;
use crate::stats::{Connections, Metrics, PoolCounters};
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::Instrument;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

mod queue;
mod upkeep;
use queue::{backoff_delay, expire_waiters, Backoff, Grant, Queued, Slot, Waiter};

/// The server parameters shown to clients at login.
type StartupParams = Vec<(String, String)>;

/// Identifies a pool. `backend` names one server of the cluster ("primary",
/// or a replica's name), so pools are never shared across users or servers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub database: String,
    pub user: String,
    pub backend: String,
}

impl std::fmt::Display for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}@{}", self.database, self.user, self.backend)
    }
}

#[derive(Debug)]
pub enum PoolError {
    /// No connection became available before the deadline.
    Timeout { pool: String, waited: Duration },
    Connect(BackendError),
    /// A reload removed the pool's server, database or user: look again
    /// under the new config.
    Retired,
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolError::Timeout { pool, waited } => write!(
                f,
                "no server connection available in pool {pool} after {} ms (pool.checkout_timeout)",
                waited.as_millis()
            ),
            PoolError::Connect(e) => write!(f, "cannot connect to server: {e}"),
            PoolError::Retired => f.write_str("the pool's server, database or user was removed from the configuration (reload)"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    pub size: usize,
    pub min_size: usize,
    pub checkout_timeout: Duration,
    pub idle_timeout: Duration,
    pub lifetime: Duration,
    /// `pool.server_login_retry`: how long a refused login is remembered.
    pub login_retry: Duration,
}

/// Guarded by `Pool::state`; the lock is never held across an await.
struct State {
    idle: Vec<Conn>,
    /// Connections open or being opened, idle or checked out.
    total: usize,
    waiters: VecDeque<Waiter>,
    /// The deadline the expiry task sleeps until (None: no task or idle).
    armed: Option<Instant>,
    /// The expiry task was started (lazily, at the first wait).
    expiry_started: bool,
}

pub struct Pool {
    pub key: PoolKey,
    /// Where and how to connect; replaced on reload.
    spec: RwLock<Arc<ConnectSpec>>,
    /// Sizes and timeouts; replaced on reload.
    settings: RwLock<PoolSettings>,
    state: Mutex<State>,
    /// Parameters the server reported at the first connect (what clients see).
    startup_params: Mutex<Option<Arc<StartupParams>>>,
    pub counters: PoolCounters,
    conns: Arc<Connections>,
    wait_count: prometheus::IntCounter,
    wait_seconds: prometheus::Histogram,
    /// Bumped when the pool's server changes (failover); connections of an
    /// older epoch are closed instead of reused.
    epoch: AtomicU64,
    /// After failed connects: no new attempt before this (exponential, jittered).
    backoff: Mutex<Backoff>,
    /// The server refused the pool's login (and when): until
    /// `login_retry` has passed, connects fail at once with that error
    /// instead of asking the server again for every waiting client.
    login_refused: Mutex<Option<(BackendError, Instant)>>,
    /// Removed by a reload: no new connections; those that come back close.
    retired: std::sync::atomic::AtomicBool,
    /// Wakes the expiry task: an earlier deadline was queued, or the pool
    /// is being dropped.
    expiry: Arc<tokio::sync::Notify>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.expiry.notify_one(); // the task finds the pool gone and ends
    }
}

/// The most recently used idle connection that is still good (LIFO keeps
/// warm connections warm); dead or expired ones are dropped on the way.
fn pop_idle(s: &mut State, lifetime: Duration, now: Instant) -> Option<Conn> {
    while let Some(c) = s.idle.pop() {
        if c.looks_healthy() && now.saturating_duration_since(c.created) < lifetime {
            return Some(c);
        }
        s.total -= 1;
    }
    None
}

/// What a checkout does after looking at the pool state.
enum Next {
    Ready(Conn),
    Open,
    Wait(oneshot::Receiver<Grant>),
}

/// Counters for observability.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolStats {
    pub idle: usize,
    pub total: usize,
    pub waiting: usize,
}

impl Pool {
    pub fn new(key: PoolKey, spec: ConnectSpec, settings: PoolSettings, conns: Arc<Connections>, metrics: &Metrics) -> Arc<Pool> {
        let labels = [key.database.as_str(), key.user.as_str(), key.backend.as_str()];
        Arc::new(Pool {
            wait_count: metrics.pool_waits.with_label_values(&labels),
            wait_seconds: metrics.pool_wait_seconds.with_label_values(&labels),
            counters: PoolCounters::default(),
            conns,
            key,
            spec: RwLock::new(Arc::new(spec)),
            settings: RwLock::new(settings),
            state: Mutex::new(State { idle: Vec::new(), total: 0, waiters: VecDeque::new(), armed: None, expiry_started: false }),
            startup_params: Mutex::new(None),
            epoch: AtomicU64::new(0),
            backoff: Mutex::new(Backoff::default()),
            login_refused: Mutex::new(None),
            retired: Default::default(),
            expiry: Arc::new(tokio::sync::Notify::new()),
        })
    }

    pub fn stats(&self) -> PoolStats {
        let s = self.state.lock().unwrap();
        PoolStats { idle: s.idle.len(), total: s.total, waiting: s.waiters.len() }
    }

    pub fn addr(&self) -> String {
        self.spec.read().unwrap().addr.clone()
    }

    /// Points the pool at another server (the primary moved): idle
    /// connections close now, checked-out ones when they come back.
    pub fn retarget(&self, new: ConnectSpec) {
        if !self.addr_is(&new.addr) {
            self.set_spec(new, "the primary moved (failover)");
        }
    }

    /// Installs a new connect spec. When the address, the database name on
    /// the server or the TLS mode changed, the existing connections are
    /// retired (a client must not alternate between two databases): the
    /// epoch is bumped and the idle ones closed under the state lock (so a
    /// concurrent check-in either is among them or sees the new epoch),
    /// checked-out ones close when they come back, and a connect still
    /// under way is redone.
    fn set_spec(&self, new: ConnectSpec, why: &'static str) {
        let addr = new.addr.clone();
        let moved = {
            let mut spec = self.spec.write().unwrap();
            let tls_mode = |s: &ConnectSpec| s.tls.as_ref().map(|t| t.mode);
            let moved = spec.addr != new.addr || spec.database != new.database || tls_mode(&spec) != tls_mode(&new);
            *spec = Arc::new(new);
            moved
        };
        if !moved {
            return;
        }
        *self.backoff.lock().unwrap() = Backoff::default();
        self.forget_login_refusal();
        // What a new client is told (server_version, defaults) comes from
        // the new server's first connection.
        *self.startup_params.lock().unwrap() = None;
        tracing::warn!(pool = %self.key, addr = %addr, "pool now points at a new server (or database, or TLS mode)");
        self.close_idle_and(why, |_| {
            self.epoch.fetch_add(1, Ordering::AcqRel);
        });
    }

    /// Whether `conn` is to the server (and database) the pool points at
    /// now: not after a failover or a reload moved the pool.
    pub fn is_current(&self, conn: &ServerConn) -> bool {
        conn.epoch == self.epoch.load(Ordering::Acquire)
    }

    pub fn addr_is(&self, addr: &str) -> bool {
        self.spec.read().unwrap().addr == addr
    }

    pub fn settings(&self) -> PoolSettings {
        *self.settings.read().unwrap()
    }

    /// Applies reloaded settings. A smaller size takes effect as
    /// connections come back (excess ones are closed, none is interrupted);
    /// a larger one at once, for clients already waiting too. A new address
    /// retires the connections to the old one (see `set_spec`).
    pub fn reconfigure(&self, spec: ConnectSpec, settings: PoolSettings) {
        *self.settings.write().unwrap() = settings;
        // The reload may have fixed what the server refused (a password).
        self.forget_login_refusal();
        self.set_spec(spec, "the server's address, database name or TLS mode changed (reload)");
        let mut s = self.state.lock().unwrap();
        while s.total < settings.size {
            let Some(w) = s.waiters.pop_front() else {
                break;
            };
            if w.tx.send(Grant::Slot).is_ok() {
                s.total += 1;
            }
        }
    }

    /// The fast path: an idle healthy connection, without waiting. The
    /// async `checkout` is only needed (and boxed by callers) when this fails.
    /// `now`: the caller's clock reading (the relay reads it once per event).
    pub fn try_checkout_idle(&self, now: Instant) -> Option<Conn> {
        let lifetime = self.settings.read().unwrap().lifetime;
        let c = pop_idle(&mut self.state.lock().unwrap(), lifetime, now)?;
        PoolCounters::add(&self.counters.server_assignments, 1);
        self.wait_seconds.observe(0.0);
        Some(c)
    }

    /// How long the longest-waiting checkout still in the queue has waited
    /// (SHOW POOLS' maxwait); zero when nobody waits.
    pub fn longest_wait(&self) -> Duration {
        let s = self.state.lock().unwrap();
        s.waiters.iter().filter(|w| !w.tx.is_closed()).map(|w| w.since.elapsed()).max().unwrap_or_default()
    }

    /// Gets a connection, waiting at most `checkout_timeout`. A connect
    /// the server refused for being at its `max_connections` (53300) while
    /// the pool has other connections puts the caller back in the queue
    /// for one of them, as long as its deadline allows. (A server that does
    /// not answer is another matter: the caller hears of it at once.)
    pub async fn checkout(self: &Arc<Self>) -> Result<Conn, PoolError> {
        let started = Instant::now();
        let settings = self.settings();
        let deadline = started + settings.checkout_timeout;
        let mut first = true;
        let result = loop {
            match self.checkout_once(settings, started, deadline, first).await {
                Err(PoolError::Connect(e)) if e.is_server_full() && self.stats().total > 0 => {
                    if Instant::now() >= deadline {
                        break Err(PoolError::Timeout { pool: self.key.to_string(), waited: started.elapsed() });
                    }
                    tracing::info!(pool = %self.key, error = %e, "opening another server connection failed; waiting for one of the pool's");
                    first = false;
                }
                r => break r,
            }
        };
        let elapsed = started.elapsed();
        self.wait_seconds.observe(elapsed.as_secs_f64());
        PoolCounters::add(&self.counters.wait_us, elapsed.as_micros() as u64);
        if result.is_ok() {
            PoolCounters::add(&self.counters.server_assignments, 1);
        }
        result
    }

    async fn checkout_once(self: &Arc<Self>, settings: PoolSettings, started: Instant, deadline: Instant, first: bool) -> Result<Conn, PoolError> {
        let mut wake_expiry = false;
        let next = {
            let mut s = self.state.lock().unwrap();
            // Read under the state lock, which `retire` sets it under: no
            // checkout joins the queue after it was emptied.
            if self.retired.load(Ordering::Acquire) {
                return Err(PoolError::Retired);
            }
            match pop_idle(&mut s, settings.lifetime, started) {
                Some(c) => Next::Ready(c),
                // After the server refused a new connection: in the queue,
                // for one that comes back (or a slot one leaves).
                None if s.total < settings.size && first => {
                    s.total += 1;
                    Next::Open
                }
                None => {
                    let (tx, rx) = oneshot::channel();
                    s.waiters.push_back(Waiter { tx, deadline, since: started });
                    if !s.expiry_started {
                        s.expiry_started = true;
                        tokio::spawn(expire_waiters(Arc::downgrade(self), self.expiry.clone()));
                    }
                    if s.armed.is_none_or(|at| deadline < at) {
                        s.armed = Some(deadline);
                        wake_expiry = true;
                    }
                    Next::Wait(rx)
                }
            }
        };
        if wake_expiry {
            self.expiry.notify_one();
        }
        if first && matches!(next, Next::Wait(_)) {
            self.wait_count.inc();
            PoolCounters::add(&self.counters.waits, 1);
        }
        let timeout = || PoolError::Timeout { pool: self.key.to_string(), waited: started.elapsed() };
        match next {
            Next::Ready(c) => Ok(c),
            Next::Open => self.open_in_slot(Some(deadline)).await.map_err(|e| e.unwrap_or_else(timeout)),
            // Exactly one grant per waiter: it leaves the queue under the
            // state lock, with a connection, a slot or its expiry.
            Next::Wait(rx) => match (Queued { pool: self, rx }).await {
                Ok(Grant::Conn(c)) => Ok(c),
                Ok(Grant::Slot) => self.open_in_slot(Some(deadline)).await.map_err(|e| e.unwrap_or_else(timeout)),
                Ok(Grant::Retired) => Err(PoolError::Retired),
                Ok(Grant::Expired) | Err(_) => Err(timeout()),
            },
        }
    }

    /// The login refusal the pool remembers, while `login_retry` lasts.
    fn refused_login(&self, retry: Duration, now: Instant) -> Option<BackendError> {
        let refused = self.login_refused.lock().unwrap();
        refused.as_ref().filter(|(_, at)| now.saturating_duration_since(*at) < retry).and_then(|(e, _)| e.login_refusal())
    }

    /// `refused_login` without the copy of the error.
    fn login_refused_recently(&self, retry: Duration, now: Instant) -> bool {
        self.login_refused.lock().unwrap().as_ref().is_some_and(|(_, at)| now.saturating_duration_since(*at) < retry)
    }

    /// A connect to the pool's server failed for a reason that may pass
    /// (the pool is in backoff): the server is down or refusing for now.
    pub fn connect_failing(&self) -> bool {
        self.backoff.lock().unwrap().failures > 0
    }

    /// Hands `Expired` to every waiter whose deadline is past; returns the
    /// earliest deadline still queued (what the expiry task sleeps until).
    fn expire(&self, now: Instant) -> Option<Instant> {
        let mut s = self.state.lock().unwrap();
        let mut next: Option<Instant> = None;
        // Deadlines are in queue order unless a reload changed the timeout:
        // look at every waiter (this runs once per earliest deadline, not
        // per checkout).
        let waiters = std::mem::take(&mut s.waiters);
        for w in waiters {
            if w.deadline <= now {
                let _ = w.tx.send(Grant::Expired);
            } else if !w.tx.is_closed() {
                next = Some(next.map_or(w.deadline, |n| n.min(w.deadline)));
                s.waiters.push_back(w);
            }
        }
        s.armed = next;
        next
    }

    /// Opens a connection in a slot already counted in `total`. `Err(None)`:
    /// `deadline` came first (the backoff or the connect pacer would have
    /// waited past it).
    async fn open_in_slot(&self, deadline: Option<Instant>) -> Result<Conn, Option<PoolError>> {
        // Given back if this ends without a connection, dropped included.
        let slot = Slot(self);
        let until = self.backoff.lock().unwrap().until;
        if let Some(until) = until.filter(|u| *u > Instant::now()) {
            if deadline.is_some_and(|d| d < until) {
                return Err(None);
            }
            tokio::time::sleep_until(until.into()).await;
        }
        if let Some(e) = self.refused_login(self.settings().login_retry, Instant::now()) {
            return Err(Some(PoolError::Connect(e)));
        }
        // Repeated only when the pool moved to another server while this
        // connect was under way: the new connection must reach the new one.
        loop {
            if self.retired.load(Ordering::Acquire) {
                return Err(Some(PoolError::Retired));
            }
            let epoch = self.epoch.load(Ordering::Acquire);
            let spec = self.spec.read().unwrap().clone();
            if let Some(p) = &spec.pacer {
                let max_wait = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(Instant::now()));
                if !p.take_within(max_wait).await {
                    return Err(None);
                }
            }
            let span = tracing::info_span!("server", pool = %self.key, addr = %spec.addr, id = tracing::field::Empty, backend_pid = tracing::field::Empty);
            // Boxed: connecting is rare and its future is large.
            match Box::pin(ServerConn::connect(&spec)).instrument(span.clone()).await {
                Ok(mut c) => {
                    span.record("id", c.id).record("backend_pid", c.backend_pid);
                    c.span = span;
                    if self.epoch.load(Ordering::Acquire) != epoch {
                        c.terminate("the pool's server moved while connecting");
                        continue;
                    }
                    *self.backoff.lock().unwrap() = Backoff::default();
                    self.forget_login_refusal();
                    std::mem::forget(slot);
                    c.epoch = epoch;
                    tracing::info!(parent: &c.span, "server connection opened");
                    c.register(&self.conns, &self.key);
                    let c = Box::new(c);
                    let mut sp = self.startup_params.lock().unwrap();
                    // (Not from a connection to a server the pool has left.)
                    if sp.is_none() && self.epoch.load(Ordering::Acquire) == epoch {
                        let mut v: Vec<_> = c.params.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                        v.sort();
                        *sp = Some(Arc::new(v));
                    }
                    return Ok(c);
                }
                Err(e) => {
                    tracing::warn!(parent: &span, error = %e, "server connection failed");
                    let now = Instant::now();
                    if e.is_transient() {
                        let mut b = self.backoff.lock().unwrap();
                        // Once per round: connects that ran together and
                        // failed together do not push the wait to its cap.
                        if b.until.is_none_or(|u| u <= now) {
                            b.failures = b.failures.saturating_add(1);
                            b.until = Some(now + backoff_delay(b.failures));
                        }
                    } else if let Some(refusal) = e.login_refusal() {
                        if !self.settings.read().unwrap().login_retry.is_zero() {
                            *self.login_refused.lock().unwrap() = Some((refusal, now));
                        }
                    }
                    drop(slot);
                    return Err(Some(PoolError::Connect(e)));
                }
            }
        }
    }

    /// Parameters to show clients at login; connects once if none known yet.
    pub async fn startup_params(self: &Arc<Self>) -> Result<Arc<StartupParams>, PoolError> {
        // A new connection sets them; the pool moving to another server at
        // that moment clears them again, hence a few tries.
        for _ in 0..3 {
            if let Some(p) = self.startup_params.lock().unwrap().clone() {
                return Ok(p);
            }
            let c = self.checkout().await?;
            self.checkin(c);
        }
        self.startup_params
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| PoolError::Connect(BackendError::Protocol("the pool's server changed during login".into())))
    }

    /// Returns a clean connection (idle, no transaction) to the pool.
    pub fn checkin(&self, conn: Conn) {
        self.checkin_at(conn, Instant::now())
    }

    /// `checkin` with the caller's clock reading.
    pub fn checkin_at(&self, mut conn: Conn, now: Instant) {
        let settings = self.settings();
        if conn.cancel_pending {
            conn.terminate("a cancel request for its last client was in flight");
            self.release_slot();
            return;
        }
        if now.saturating_duration_since(conn.created) >= settings.lifetime {
            conn.terminate("server_lifetime reached");
            self.release_slot();
            return;
        }
        conn.idle_since = now;
        let mut s = self.state.lock().unwrap();
        // The epoch is read under the state lock: `set_spec` bumps it under
        // the same lock, so a connection to a server the pool left is never
        // parked (or handed on) after the idle ones were closed.
        let why = if self.retired.load(Ordering::Acquire) {
            Some("its server, database or user was removed (reload)")
        } else if conn.epoch != self.epoch.load(Ordering::Acquire) {
            Some("the pool's server moved")
        } else if s.total > settings.size {
            // Shrunk by a reload: excess connections close as they come
            // back, even while clients wait (the others come back too).
            Some("pool shrunk by a reload")
        } else {
            None
        };
        if let Some(why) = why {
            drop(s);
            conn.terminate(why);
            self.release_slot();
            return;
        }
        while let Some(w) = s.waiters.pop_front() {
            match w.tx.send(Grant::Conn(conn)) {
                Ok(()) => return,
                Err(Grant::Conn(back)) => conn = back,
                Err(_) => unreachable!("we sent a connection"),
            }
        }
        s.idle.push(conn);
    }

    /// What a client's login proved changed (auth_query users): a refusal
    /// remembered for the old proof no longer holds.
    pub fn forget_login_refusal(&self) {
        *self.login_refused.lock().unwrap() = None;
    }

    /// The pool's server, database or user left the config (reload): its
    /// idle connections close now, checked-out ones when they come back.
    /// (The caller has removed it from the pool map, so nothing keeps it
    /// warm.)
    /// Clients waiting for a connection get an error at once.
    pub fn retire(&self) {
        tracing::info!(pool = %self.key, "pool removed by a reload");
        let mut waiters = Default::default();
        self.close_idle_and("its server, database or user was removed (reload)", |s| {
            self.retired.store(true, Ordering::Release);
            self.epoch.fetch_add(1, Ordering::AcqRel);
            waiters = std::mem::take(&mut s.waiters);
        });
        for w in waiters {
            let _ = w.tx.send(Grant::Retired);
        }
    }

    /// Closes every connection (KILL): the idle ones now, the checked-out
    /// ones (the killed clients') when they come back instead of reusing
    /// them, as PgBouncer's KILL drops the database's server connections.
    pub fn close_all(&self, why: &'static str) {
        self.close_idle_and(why, |_| {
            self.epoch.fetch_add(1, Ordering::AcqRel);
        });
    }

    /// `close_idle`, running `also` under the same state lock.
    fn close_idle_and(&self, why: &'static str, also: impl FnOnce(&mut State)) {
        let idle: Vec<Conn> = {
            let mut s = self.state.lock().unwrap();
            also(&mut s);
            let v: Vec<Conn> = s.idle.drain(..).collect();
            s.total -= v.len();
            v
        };
        for c in idle {
            c.terminate(why);
        }
    }

    /// Forgets a connection that was closed or is unusable.
    pub fn discard(&self, conn: Conn, why: &'static str) {
        conn.terminate(why);
        self.release_slot();
    }

    fn release_slot(&self) {
        let size = self.settings.read().unwrap().size;
        let mut s = self.state.lock().unwrap();
        // Over a reduced size, a freed slot is not handed on.
        while s.total <= size {
            let Some(w) = s.waiters.pop_front() else {
                break;
            };
            if w.tx.send(Grant::Slot).is_ok() {
                return;
            }
        }
        s.total -= 1;
    }
}
