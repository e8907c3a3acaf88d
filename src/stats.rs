//! Observability state: per-pool counters (SHOW STATS), registries of live
//! client and server connections (SHOW CLIENTS / SHOW SERVERS), and the
//! Prometheus metrics. Hot paths only touch atomics: label lookups happen
//! once per session (or workload change), never per query.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{SystemTime, UNIX_EPOCH};

/// Counters of one pool; SHOW STATS sums them per database.
#[derive(Default, Debug)]
pub struct PoolCounters {
    pub server_assignments: AtomicU64,
    pub xacts: AtomicU64,
    pub queries: AtomicU64,
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub xact_us: AtomicU64,
    pub query_us: AtomicU64,
    pub wait_us: AtomicU64,
    pub client_parses: AtomicU64,
    pub server_parses: AtomicU64,
    pub binds: AtomicU64,
    /// Checkouts that had to queue.
    pub waits: AtomicU64,
}

/// Per-workload routing counters (SHOW WORKLOADS).
#[derive(Default, Debug)]
pub struct WorkloadCounters {
    pub queries: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub to_primary: AtomicU64,
    pub to_replica: AtomicU64,
    pub fallbacks: AtomicU64,
    pub refused: AtomicU64,
}

impl PoolCounters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Wall-clock microseconds of a monotonic instant (for SHOW and metrics
/// timestamps), so a hot path that already read the monotonic clock does not
/// read the wall clock too. Anchored once; it drifts from the wall clock only
/// by later clock adjustments, which display timestamps can afford.
pub fn unix_us_at(t: std::time::Instant) -> u64 {
    static ANCHOR: std::sync::OnceLock<(std::time::Instant, u64)> = std::sync::OnceLock::new();
    let (at, us) = *ANCHOR.get_or_init(|| (std::time::Instant::now(), now_us()));
    match t.checked_duration_since(at) {
        Some(d) => us + d.as_micros() as u64,
        None => us.saturating_sub(at.duration_since(t).as_micros() as u64),
    }
}

pub const CLIENT_IDLE: u8 = 0;
pub const CLIENT_ACTIVE: u8 = 1;
pub const CLIENT_WAITING: u8 = 2;

/// One connected client, as SHOW CLIENTS lists it.
#[derive(Debug)]
pub struct ClientInfo {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub addr: SocketAddr,
    pub local: SocketAddr,
    pub connect_time_us: u64,
    pub application_name: String,
    pub state: AtomicU8,
    pub request_time_us: AtomicU64,
    pub wait_since_us: AtomicU64,
    /// Id of the server connection serving it (0 = none).
    pub link: AtomicU64,
    pub remote_pid: AtomicI32,
    /// KILL and shutdown reach the session through this.
    pub signal: Signal,
}

/// `Signal` bits.
pub const KILL: u8 = 1;
pub const SHUTDOWN: u8 = 2;
/// A reload removed the client's database or user: the session ends once
/// idle outside a transaction.
pub const REMOVED: u8 = 4;

/// How the outside reaches a session: KILL from the admin console and the
/// start of a shutdown drain. The bits are sticky and there is one waker
/// slot, so nothing is registered and unregistered per wait (as with a
/// `Notify` or a `watch`). A wait by the task whose waker is already in the
/// slot (the usual case: a session's task waits on its own signal) costs
/// three atomic loads and no lock: the slot's waker identity (data and
/// vtable pointers) is mirrored in `owner`.
#[derive(Debug, Default)]
pub struct Signal {
    raised: AtomicU8,
    waker: Mutex<Option<Waker>>,
    /// Identity of the waker in the slot (data, vtable); zeros when empty.
    /// Written under the lock; only the session's own task waits.
    owner: [AtomicUsize; 2],
}

impl Signal {
    pub fn raise(&self, what: u8) {
        self.raised.fetch_or(what, Ordering::AcqRel);
        let mut slot = self.waker.lock().unwrap();
        for o in &self.owner {
            o.store(0, Ordering::Release);
        }
        if let Some(w) = slot.take() {
            drop(slot);
            w.wake();
        }
    }

    /// Lowers `what` (a condition that no longer holds).
    pub fn clear(&self, what: u8) {
        self.raised.fetch_and(!what, Ordering::AcqRel);
    }

    /// Ready with the raised bits among `mask`.
    pub fn poll_raised(&self, cx: &mut Context<'_>, mask: u8) -> Poll<u8> {
        let r = self.raised.load(Ordering::Acquire) & mask;
        if r != 0 {
            return Poll::Ready(r);
        }
        // Our waker is in the slot: a raise after the load above takes and
        // wakes it, so this task is polled again and sees the bit. A raise
        // that already emptied the slot also cleared `owner`.
        let me = identity(cx.waker());
        if self.owner[0].load(Ordering::Acquire) == me[0] && self.owner[1].load(Ordering::Acquire) == me[1] {
            return Poll::Pending;
        }
        {
            // Empty (a raise took it) or another waker's: ours goes in.
            let mut slot = self.waker.lock().unwrap();
            *slot = Some(cx.waker().clone());
            for (o, v) in self.owner.iter().zip(me) {
                o.store(v, Ordering::Release);
            }
        }
        // A raise between the first check and the registration.
        match self.raised.load(Ordering::Acquire) & mask {
            0 => Poll::Pending,
            r => Poll::Ready(r),
        }
    }

    pub async fn raised(&self, mask: u8) -> u8 {
        std::future::poll_fn(|cx| self.poll_raised(cx, mask)).await
    }
}

/// A waker's identity: its data and vtable pointers (what `will_wake`
/// compares).
fn identity(w: &Waker) -> [usize; 2] {
    [w.data() as usize, w.vtable() as *const _ as usize]
}

pub const SERVER_IDLE: u8 = 0;
pub const SERVER_ACTIVE: u8 = 1;

/// One server connection, as SHOW SERVERS lists it.
#[derive(Debug)]
pub struct ServerInfo {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub backend: String,
    pub addr: SocketAddr,
    pub local: SocketAddr,
    pub connect_time_us: u64,
    pub backend_pid: i32,
    pub state: AtomicU8,
    pub request_time_us: AtomicU64,
    /// Id of the client it serves (0 = none).
    pub link: AtomicU64,
}

/// Live connections by id. The lock guards the maps only; held briefly.
#[derive(Default)]
pub struct Connections {
    pub clients: Mutex<HashMap<u64, Arc<ClientInfo>>>,
    pub servers: Mutex<HashMap<u64, Arc<ServerInfo>>>,
    next_client: AtomicU64,
}

impl Connections {
    pub fn next_client_id(&self) -> u64 {
        self.next_client.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Removes a client or server from the registry when dropped.
pub struct Listed {
    registry: Arc<Connections>,
    id: u64,
    server: bool,
}

impl Listed {
    pub fn client(registry: &Arc<Connections>, info: Arc<ClientInfo>) -> Listed {
        let id = info.id;
        registry.clients.lock().unwrap().insert(id, info);
        Listed { registry: registry.clone(), id, server: false }
    }

    pub fn server(registry: &Arc<Connections>, info: Arc<ServerInfo>) -> Listed {
        let id = info.id;
        registry.servers.lock().unwrap().insert(id, info);
        Listed { registry: registry.clone(), id, server: true }
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        if self.server {
            self.registry.servers.lock().unwrap().remove(&self.id);
        } else {
            self.registry.clients.lock().unwrap().remove(&self.id);
        }
    }
}

impl std::fmt::Debug for Listed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Listed({})", self.id)
    }
}

/// Latency buckets (seconds) for queries and pool waits.
const BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The Prometheus metrics of one pgfleet. Label values come from the
/// configuration (databases, users, workloads, replicas, groups), routing
/// reasons and SQLSTATEs: bounded sets; never SQL text or client addresses.
pub struct Metrics {
    pub registry: prometheus::Registry,
    pub transactions: IntCounterVec,
    pub queries: IntCounterVec,
    pub bytes_received: IntCounterVec,
    pub bytes_sent: IntCounterVec,
    pub query_duration: HistogramVec,
    pub routing: IntCounterVec,
    /// `routing` resolved for every (target, reason): no label lookup per transaction.
    routing_resolved: Vec<prometheus::IntCounter>,
    pub errors: IntCounterVec,
    pub pool_waits: IntCounterVec,
    pub pool_wait_seconds: HistogramVec,
    pub clients: IntGaugeVec,
    pub servers: IntGaugeVec,
    pub pinned_clients: IntGauge,
    pub replica_lag_bytes: IntGaugeVec,
    pub replica_lag_seconds: prometheus::GaugeVec,
    pub replica_usable: IntGaugeVec,
    /// Background tasks (lag monitor, pool upkeep) restarted after a panic.
    pub background_restarts: IntCounterVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &prometheus::Registry, c: T) -> T {
    r.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = prometheus::Registry::new();
        let dim = &["database", "user", "workload"];
        let pool = &["database", "user", "backend"];
        let routing = reg(&r, IntCounterVec::new(Opts::new("pgfleet_routing_decisions_total", "Routing decisions"), &["target", "reason"]).unwrap());
        let routing_resolved = ["primary", "replica"]
            .iter()
            .flat_map(|t| crate::router::route::Reason::ALL.iter().map(|r| routing.with_label_values(&[t, r.as_str()])).collect::<Vec<_>>())
            .collect();
        Metrics {
            routing_resolved,
            transactions: reg(&r, IntCounterVec::new(Opts::new("pgfleet_transactions_total", "Transactions completed"), dim).unwrap()),
            queries: reg(&r, IntCounterVec::new(Opts::new("pgfleet_queries_total", "Queries (Query and Execute messages) sent to servers"), dim).unwrap()),
            bytes_received: reg(&r, IntCounterVec::new(Opts::new("pgfleet_client_bytes_received_total", "Bytes received from clients and sent to servers"), dim).unwrap()),
            bytes_sent: reg(&r, IntCounterVec::new(Opts::new("pgfleet_client_bytes_sent_total", "Bytes from servers sent to clients"), dim).unwrap()),
            query_duration: reg(
                &r,
                HistogramVec::new(HistogramOpts::new("pgfleet_query_duration_seconds", "Time from a request to its ReadyForQuery").buckets(BUCKETS.to_vec()), &["workload", "route"]).unwrap(),
            ),
            routing,
            errors: reg(&r, IntCounterVec::new(Opts::new("pgfleet_errors_total", "ErrorResponses sent to clients"), &["sqlstate"]).unwrap()),
            pool_waits: reg(&r, IntCounterVec::new(Opts::new("pgfleet_pool_waits_total", "Checkouts that had to wait for a connection"), pool).unwrap()),
            pool_wait_seconds: reg(
                &r,
                HistogramVec::new(HistogramOpts::new("pgfleet_pool_wait_seconds", "Time to get a server connection").buckets(BUCKETS.to_vec()), pool).unwrap(),
            ),
            clients: reg(&r, IntGaugeVec::new(Opts::new("pgfleet_clients", "Client connections by state"), &["state"]).unwrap()),
            servers: reg(&r, IntGaugeVec::new(Opts::new("pgfleet_servers", "Server connections by state"), &["database", "user", "backend", "state"]).unwrap()),
            pinned_clients: reg(&r, IntGauge::new("pgfleet_pinned_clients", "Clients pinned to a server connection").unwrap()),
            replica_lag_bytes: reg(&r, IntGaugeVec::new(Opts::new("pgfleet_replica_lag_bytes", "Replay distance behind the primary"), &["replica"]).unwrap()),
            replica_lag_seconds: reg(&r, prometheus::GaugeVec::new(Opts::new("pgfleet_replica_lag_seconds", "Replay delay behind the primary"), &["replica"]).unwrap()),
            replica_usable: reg(&r, IntGaugeVec::new(Opts::new("pgfleet_replica_usable", "1 when the replica serves reads for the group"), &["replica", "group"]).unwrap()),
            background_restarts: reg(&r, IntCounterVec::new(Opts::new("pgfleet_background_restarts_total", "Background tasks restarted after a panic"), &["task"]).unwrap()),
            registry: r,
        }
    }

    /// The routing-decision counter for (to a replica?, reason).
    pub fn routing_decision(&self, to_replica: bool, reason: crate::router::route::Reason) -> &prometheus::IntCounter {
        let i = crate::router::route::Reason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        &self.routing_resolved[usize::from(to_replica) * crate::router::route::Reason::ALL.len() + i]
    }

    /// Handles for one client's hot path.
    pub fn for_client(&self, database: &str, user: &str, workload: &str) -> ClientMetrics {
        let l = &[database, user, workload];
        ClientMetrics {
            transactions: self.transactions.with_label_values(l),
            queries: self.queries.with_label_values(l),
            received: self.bytes_received.with_label_values(l),
            sent: self.bytes_sent.with_label_values(l),
            latency_primary: self.query_duration.with_label_values(&[workload, "primary"]),
            latency_replica: self.query_duration.with_label_values(&[workload, "replica"]),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Label-resolved metric handles a session keeps.
pub struct ClientMetrics {
    pub transactions: IntCounter,
    pub queries: IntCounter,
    pub received: IntCounter,
    pub sent: IntCounter,
    pub latency_primary: Histogram,
    pub latency_replica: Histogram,
}

/// Approximate quantile (seconds, a bucket's upper bound) over histograms
/// with the same buckets.
pub fn quantile(hs: &[&Histogram], q: f64) -> f64 {
    use prometheus::core::Metric;
    let metrics: Vec<_> = hs.iter().map(|h| h.metric()).collect();
    let total: u64 = metrics.iter().map(|m| m.get_histogram().get_sample_count()).sum();
    if total == 0 {
        return 0.0;
    }
    let want = (total as f64 * q).ceil() as u64;
    let buckets = metrics[0].get_histogram().get_bucket();
    for (i, b) in buckets.iter().enumerate() {
        let cum: u64 = metrics.iter().map(|m| m.get_histogram().get_bucket()[i].get_cumulative_count()).sum();
        if cum >= want {
            return b.get_upper_bound();
        }
    }
    f64::INFINITY
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A waker that counts its wakes.
    struct Count(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn signal_wakes_its_waiter_once_per_raise_even_after_an_unwatched_bit() {
        let sig = Signal::default();
        let count = Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert_eq!(sig.poll_raised(&mut cx, KILL | SHUTDOWN), Poll::Pending);
        // Polled again by the same task: the lock-free path, still Pending.
        assert_eq!(sig.poll_raised(&mut cx, KILL | SHUTDOWN), Poll::Pending);
        // SHUTDOWN wakes it, then the drain waits for KILL only.
        sig.raise(SHUTDOWN);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(sig.poll_raised(&mut cx, KILL | SHUTDOWN), Poll::Ready(SHUTDOWN));
        assert_eq!(sig.poll_raised(&mut cx, KILL), Poll::Pending);
        assert_eq!(sig.poll_raised(&mut cx, KILL), Poll::Pending);
        // The slot was emptied by the first raise: the waiter registered
        // again, so KILL still reaches it.
        sig.raise(KILL);
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        assert_eq!(sig.poll_raised(&mut cx, KILL), Poll::Ready(KILL));
        // Another task's waker is not mistaken for the registered one.
        let other = Arc::new(Count(Default::default()));
        let other_waker = Waker::from(other.clone());
        let sig = Signal::default();
        assert_eq!(sig.poll_raised(&mut cx, KILL), Poll::Pending);
        assert_eq!(sig.poll_raised(&mut Context::from_waker(&other_waker), KILL), Poll::Pending);
        sig.raise(KILL);
        assert_eq!((count.0.load(Ordering::SeqCst), other.0.load(Ordering::SeqCst)), (2, 1));
    }

    #[test]
    fn unix_us_at_follows_the_wall_clock() {
        let before = now_us();
        let t = Instant::now();
        let after = now_us();
        let at = unix_us_at(t);
        // Within the wall-clock readings around it (1 ms slack for the anchor).
        assert!(at + 1_000 >= before && at <= after + 1_000, "{before} <= {at} <= {after}");
        // Instants before the anchor map to earlier times, spaced as they were.
        let earlier = t.checked_sub(Duration::from_millis(50)).unwrap();
        assert!((unix_us_at(t) - unix_us_at(earlier)).abs_diff(50_000) <= 1);
    }
}
