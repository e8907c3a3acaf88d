//! The cluster as pgfleet sees it: the primary, the replicas and their
//! groups, and a monitor task that polls every `lag_check_interval` and
//! publishes one immutable snapshot.
//!
//! Lag is measured two ways. Bytes: primary WAL position minus the
//! replica's replay position. Time: how long ago the primary first had WAL
//! the replica has not replayed yet (from the monitor's own history of
//! primary positions), so an idle primary means no lag, and clocks on
//! different hosts never matter. A replica over a group's budget leaves that
//! group and returns only under 3/4 of the budget (hysteresis).

use crate::config::Config;
use crate::router::route::{Fallback, GroupInfo, ReplicaState, Snapshot};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

pub struct ReplicaInfo {
    pub name: String,
    pub addr: String,
    pub weight: u32,
    /// Group indexes.
    pub groups: Vec<usize>,
    /// Transactions in flight on this replica (load balancing); shared
    /// with the replica of the same name in a reloaded topology.
    pub inflight: Arc<AtomicUsize>,
}

pub struct Topology {
    pub primary: String,
    pub replicas: Vec<ReplicaInfo>,
    pub groups: Vec<GroupInfo>,
    /// The current snapshot; replaced whole, never mutated in place.
    snapshot: RwLock<Arc<Snapshot>>,
    /// Where writes go (see `Writer`), encoded: 0 = the configured
    /// primary, i + 1 = replica i, `NO_WRITER` = none known.
    writer: AtomicUsize,
    /// Woken whenever `writer` changes (writes waiting out a failover).
    pub writer_changed: tokio::sync::Notify,
    /// What the monitor keeps between rounds, carried into a reloaded
    /// topology so a reload neither forgets lag nor idles the replicas.
    memory: Mutex<Memory>,
    /// Per replica: when a client's connection to it last failed. A
    /// monitor round whose checks began before that does not put it back.
    marked_down: Mutex<Vec<Option<Instant>>>,
}

#[derive(Default)]
struct Memory {
    lag: LagState,
    /// The last round: the writer's check and each replica's.
    last: Option<(Sample, Vec<Sample>)>,
    /// Per replica: answered as a standby in a check that began after the
    /// writer was last chosen (see `monitor::choose_writer`).
    standby_since: Vec<bool>,
    /// When the monitor last changed the writer (None: not since start).
    writer_chosen_at: Option<Instant>,
}

const NO_WRITER: usize = usize::MAX;

/// How `Topology::writer` stores a `Writer`.
fn writer_code(w: Writer) -> usize {
    match w {
        Writer::Configured => 0,
        Writer::Replica(i) => i + 1,
        Writer::None => NO_WRITER,
    }
}

/// The server that takes writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// `cluster.primary`.
    Configured,
    /// A replica that was promoted while the configured primary was down
    /// or in recovery. Sticky: it stays the writer while it is a primary,
    /// even if the old primary comes back (no split brain).
    Replica(usize),
    /// The configured primary is in recovery and no replica was promoted.
    None,
}

impl Topology {
    pub fn from_config(cfg: &Config, previous: Option<&Topology>) -> Topology {
        let gidx = |n: &str| cfg.cluster.groups.iter().position(|g| g.name == n);
        let groups = cfg
            .cluster
            .groups
            .iter()
            .map(|g| GroupInfo {
                name: g.name.clone(),
                max_lag: g.max_lag.map(|d| d.0),
                max_lag_bytes: g.max_lag_bytes.map(|s| s.0),
                fallback: g
                    .fallback
                    .iter()
                    .filter_map(|f| match f.as_str() {
                        "primary" => Some(Fallback::Primary),
                        "error" => Some(Fallback::Error),
                        other => gidx(other).map(Fallback::Group),
                    })
                    .collect(),
                members: cfg
                    .cluster
                    .replicas
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.groups.contains(&g.name))
                    .map(|(i, _)| i)
                    .collect(),
            })
            .collect();
        let replicas: Vec<ReplicaInfo> = cfg
            .cluster
            .replicas
            .iter()
            .map(|r| ReplicaInfo {
                name: r.name.clone(),
                addr: r.addr.clone(),
                weight: r.weight,
                groups: r.groups.iter().filter_map(|g| gidx(g)).collect(),
                inflight: previous
                    .and_then(|p| p.replicas.iter().find(|o| o.name == r.name))
                    .map(|o| o.inflight.clone())
                    .unwrap_or_default(),
            })
            .collect();
        let initial = Snapshot {
            checked_at_us: 0,
            primary_lsn: 0,
            primary_reachable: false,
            primary_seen_at: None,
            replicas: replicas
                .iter()
                .map(|r| ReplicaState {
                    name: r.name.clone(),
                    groups: r.groups.iter().map(|g| (*g, false)).collect(),
                    excluded_because: Some(NOT_CHECKED.into()),
                    ..Default::default()
                })
                .collect(),
        };
        // A reload keeps the writer the monitor chose (a promoted replica
        // stays the writer even if the old primary came back thinking it is
        // one: no split brain), unless the primary's address was edited.
        let writer = previous
            .filter(|p| p.primary == cfg.cluster.primary)
            .and_then(|p| match p.writer() {
                Writer::Replica(i) => {
                    let old = &p.replicas[i];
                    replicas.iter().position(|r| r.name == old.name && r.addr == old.addr).map(Writer::Replica)
                }
                w => Some(w),
            })
            .unwrap_or(Writer::Configured);
        let excluded = replicas.iter().map(|r| vec![false; r.groups.len()]).collect();
        let replica_count = replicas.len();
        let topo = Topology {
            primary: cfg.cluster.primary.clone(),
            replicas,
            groups,
            snapshot: RwLock::new(Arc::new(initial)),
            writer: AtomicUsize::new(writer_code(writer)),
            writer_changed: tokio::sync::Notify::new(),
            memory: Mutex::new(Memory {
                lag: LagState { excluded, ..Default::default() },
                last: None,
                standby_since: vec![false; replica_count],
                writer_chosen_at: None,
            }),
            marked_down: Mutex::new(vec![None; replica_count]),
        };
        if let Some(p) = previous.filter(|p| p.primary == topo.primary) {
            topo.remember(p);
        }
        topo
    }

    /// No monitor will check the replicas: none is used.
    pub fn unmonitored(&self, why: &str) {
        self.exclude(|_| true, why);
    }

    /// Takes over what `previous` (same primary) learned: the primary's
    /// position history, each unchanged replica's last check and lag
    /// exclusions, and a snapshot made from them for the new groups.
    fn remember(&self, previous: &Topology) {
        let old = lock(&previous.memory);
        let mut mem = lock(&self.memory);
        mem.lag.history = old.lag.history.clone();
        let same = |r: &ReplicaInfo| previous.replicas.iter().position(|o| o.name == r.name && o.addr == r.addr);
        mem.lag.readings = vec![VecDeque::new(); self.replicas.len()];
        // Which replicas were standbys since the writer was chosen: a
        // reload (a new monitor) must not forget it, or a promotion seen
        // by the old monitor's last rounds would not count.
        mem.writer_chosen_at = old.writer_chosen_at;
        mem.standby_since = self.replicas.iter().map(|r| same(r).is_some_and(|o| old.standby_since.get(o).copied().unwrap_or(false))).collect();
        mem.lag.diverged = vec![None; self.replicas.len()];
        let old_down = lock(&previous.marked_down);
        let mut down = lock(&self.marked_down);
        for (i, r) in self.replicas.iter().enumerate() {
            let Some(o) = same(r) else { continue };
            // Marked down after its last check: still down after the reload.
            down[i] = old_down.get(o).copied().flatten();
            mem.lag.readings[i] = old.lag.readings.get(o).cloned().unwrap_or_default();
            mem.lag.diverged[i] = old.lag.diverged.get(o).copied().flatten();
            for (slot, &g) in r.groups.iter().enumerate() {
                let name = &self.groups[g].name;
                let was = previous.replicas[o].groups.iter().position(|&og| previous.groups[og].name == *name);
                mem.lag.excluded[i][slot] = was.is_some_and(|os| old.lag.excluded[o][os]);
            }
        }
        drop((down, old_down));
        let Some((primary, checks)) = &old.last else { return };
        let checks: Vec<_> =
            self.replicas.iter().map(|r| same(r).map_or_else(|| Sample::unchecked(primary.at), |o| checks[o].clone())).collect();
        let started: Vec<Instant> = checks.iter().map(|c| c.started).collect();
        let now = checks.iter().map(|c| c.at).fold(primary.at, Instant::max);
        self.publish(monitor::build_snapshot(self, &mut mem.lag, primary, &checks, now), &started);
        mem.last = Some((primary.clone(), checks));
    }

    pub fn writer(&self) -> Writer {
        match self.writer.load(Ordering::Acquire) {
            0 => Writer::Configured,
            NO_WRITER => Writer::None,
            i => Writer::Replica(i - 1),
        }
    }

    /// Address writes go to, if any server is known to take them.
    pub fn writer_addr(&self) -> Option<&str> {
        match self.writer() {
            Writer::Configured => Some(&self.primary),
            Writer::Replica(i) => Some(&self.replicas[i].addr),
            Writer::None => None,
        }
    }

    pub fn writer_name(&self) -> &str {
        match self.writer() {
            Writer::Configured => "primary",
            Writer::Replica(i) => &self.replicas[i].name,
            Writer::None => "(none)",
        }
    }

    fn set_writer(&self, w: Writer) {
        let code = writer_code(w);
        let old = self.writer.swap(code, Ordering::AcqRel);
        if old != code {
            tracing::warn!(writer = self.writer_name(), addr = self.writer_addr().unwrap_or("-"), "primary changed");
            self.writer_changed.notify_waiters();
        }
    }

    /// (The topology's locks are taken poisoned or not, see `lock`.)
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Installs a snapshot made from checks of each replica that began at
    /// `checked_from[i]`; a replica marked down since stays down in it (its
    /// check may have succeeded just before the client's connection failed).
    fn publish(&self, mut s: Snapshot, checked_from: &[Instant]) {
        let mut current = self.snapshot.write().unwrap_or_else(PoisonError::into_inner);
        let down = lock(&self.marked_down);
        for (i, r) in s.replicas.iter_mut().enumerate() {
            if down.get(i).copied().flatten().zip(checked_from.get(i)).is_some_and(|(at, from)| at > *from) {
                if let Some(was) = current.replicas.get(i) {
                    r.take_out(was.excluded_because.clone().unwrap_or_default());
                }
            }
        }
        *current = Arc::new(s);
    }

    pub fn group(&self, name: &str) -> Option<usize> {
        self.groups.iter().position(|g| g.name == name)
    }

    /// A connection to this replica failed: stop sending it reads now; the
    /// monitor re-admits it once it answers again.
    pub fn mark_down(&self, replica: usize, why: &str) {
        // First, so a round publishing meanwhile already sees it.
        if let Some(at) = lock(&self.marked_down).get_mut(replica) {
            *at = Some(Instant::now());
        }
        self.exclude(|i| i == replica, &format!("connection failed: {why}"));
    }

    /// Takes the replicas `which` selects out of every group, unreachable,
    /// saying why; under the write lock, so a snapshot the monitor publishes
    /// meanwhile is not overwritten with an older one.
    fn exclude(&self, which: impl Fn(usize) -> bool, why: &str) {
        let mut current = self.snapshot.write().unwrap_or_else(PoisonError::into_inner);
        let mut s = (**current).clone();
        for (_, r) in s.replicas.iter_mut().enumerate().filter(|(i, _)| which(*i)) {
            r.take_out(why.to_string());
        }
        *current = Arc::new(s);
    }

    /// Weighted power-of-two-choices by in-flight transactions.
    pub fn pick(&self, candidates: &[usize]) -> usize {
        if candidates.len() == 1 {
            return candidates[0];
        }
        let a = candidates[rand::random::<usize>() % candidates.len()];
        let mut b = candidates[rand::random::<usize>() % candidates.len()];
        if a == b {
            b = candidates[(candidates.iter().position(|c| *c == a).unwrap() + 1) % candidates.len()];
        }
        let load = |i: usize| {
            let r = &self.replicas[i];
            (r.inflight.load(Ordering::Relaxed) as u64 + 1) * 1000 / r.weight.max(1) as u64
        };
        if load(a) <= load(b) {
            a
        } else {
            b
        }
    }
}

/// Parses "16/B374D848" into a 64-bit WAL position.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// "insert-LSN block-size segment-size" (the read-your-writes probe) as
/// the end of the last record, the position a standby's replay reaches:
/// an insert position at the start of a page points past the page's header
/// (24 bytes, 40 at a segment's start), where no record ends.
pub fn wal_end(s: &str) -> Option<u64> {
    let mut parts = s.split(' ');
    let lsn = parse_lsn(parts.next()?)?;
    let block: u64 = parts.next()?.parse().ok().filter(|b| *b > 0)?;
    let segment: u64 = parts.next()?.parse().ok().filter(|s| *s > 0)?;
    Some(if lsn % segment == 40 {
        lsn - 40
    } else if lsn % block == 24 {
        lsn - 24
    } else {
        lsn
    })
}

pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Credentials and timing for the monitor's own connections.
#[derive(Clone)]
pub struct MonitorSpec {
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub interval: Duration,
    /// `cluster.server_tls_mode` (None: plaintext).
    pub tls: Option<Arc<crate::tls::ClientTls>>,
}

mod monitor;
use monitor::Sample;
pub use monitor::{connect_as, run_monitor};

/// The check result of a replica the monitor has not checked yet.
const NOT_CHECKED: &str = "not checked yet";

/// The lag state machine of one monitor, kept between checks.
#[derive(Default)]
struct LagState {
    /// (primary LSN, when first seen), increasing.
    history: VecDeque<(u64, Instant)>,
    /// Per replica, per group slot: excluded for lag.
    excluded: Vec<Vec<bool>>,
    /// Per replica: its last few replay positions as a standby, and when
    /// each check answered (oldest first).
    readings: Vec<VecDeque<(u64, Instant)>>,
    /// Per replica: found ahead of the primary at this replay position
    /// (WAL the primary never had: a standby left on the old timeline by a
    /// failover). Kept until it streams on the primary's timeline.
    diverged: Vec<Option<u64>>,
    /// How old the primary's last reading may be before it is overdue
    /// (set by the monitor: three check intervals). None: never.
    fresh_for: Option<Duration>,
}

/// Takes a topology lock poisoned or not: a panic of the monitor while it
/// held one must not panic every session that routes, nor the monitor its
/// supervisor restarts.
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How many of a standby's readings are kept (see `LagState::readings`).
const READINGS_KEPT: usize = 8;

/// How long a standby's last replay position keeps the history it needs.
const REPLAY_REMEMBERED: Duration = Duration::from_secs(60);

impl LagState {
    /// The primary's position as checked. Lower than the last one: a new
    /// timeline (failover), so what was remembered no longer compares.
    fn record_primary(&mut self, lsn: u64, now: Instant) {
        if self.history.back().is_some_and(|(l, _)| lsn < *l) {
            self.history.clear();
        }
        self.advance(lsn, now);
    }

    /// The primary is known to be at least at `lsn`.
    fn advance(&mut self, lsn: u64, now: Instant) {
        if self.history.back().is_none_or(|(l, _)| lsn > *l) {
            self.history.push_back((lsn, now));
        }
        while self.history.len() > 100_000 {
            self.history.pop_front();
        }
    }

    /// How long ago the primary first had WAL past `replay`. Unknown
    /// (`Err`, carrying the lower bound) for a replica behind the oldest
    /// position remembered: at start, after a reload, or back from
    /// downtime, the WAL it lacks may be of any age.
    fn lag_time(&self, replay: u64, now: Instant) -> Result<Duration, Duration> {
        match self.history.front() {
            Some((oldest, t)) if replay < *oldest => Err(now.duration_since(*t)),
            _ => Ok(self.history.iter().find(|(l, _)| *l > replay).map(|(_, t)| now.duration_since(*t)).unwrap_or_default()),
        }
    }

    fn forget_before(&mut self, min_replay: u64) {
        // Keep the last entry at or below the slowest replica so lag stays measurable.
        while self.history.len() > 1 && self.history[1].0 <= min_replay {
            self.history.pop_front();
        }
    }
}

/// Within budget, with hysteresis: leaving at the budget, returning under
/// 3/4. A time lag that is unknown (`Err`) is over any time budget.
fn within_budget(g: &GroupInfo, lag: Result<Duration, Duration>, bytes: u64, was_excluded: bool) -> bool {
    let (num, den) = if was_excluded { (3, 4) } else { (1, 1) };
    let time_ok = g.max_lag.is_none_or(|m| lag.is_ok_and(|lag| lag.as_nanos() * den <= m.as_nanos() * num));
    let bytes_ok = g.max_lag_bytes.is_none_or(|m| bytes as u128 * den <= m as u128 * num);
    time_ok && bytes_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_roundtrip() {
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374D848));
        assert_eq!(format_lsn(parse_lsn("0/3000060").unwrap()), "0/3000060");
        assert_eq!(parse_lsn("nonsense"), None);
    }

    #[test]
    fn insert_positions_read_as_record_ends() {
        let seg = 16 << 20;
        let at = |lsn: u64| wal_end(&format!("{} 8192 {seg}", format_lsn(lsn)));
        assert_eq!(at(0x3000_0a8), Some(0x3000_0a8), "inside a page: as it is");
        assert_eq!(at(3 * 8192 + 24), Some(3 * 8192), "past a page header: the page's start");
        assert_eq!(at(2 * seg + 40), Some(2 * seg), "past a segment's long header");
        assert_eq!(at(3 * 8192 + 40), Some(3 * 8192 + 40), "40 bytes into a page that starts no segment: a record end");
        assert_eq!(wal_end("0/3000060"), None);
    }

    #[test]
    fn idle_primary_means_no_lag() {
        let mut s = LagState::default();
        let t0 = Instant::now();
        s.record_primary(100, t0);
        s.record_primary(100, t0 + Duration::from_secs(10));
        assert_eq!(s.lag_time(100, t0 + Duration::from_secs(10)), Ok(Duration::ZERO));
        s.record_primary(200, t0 + Duration::from_secs(11));
        assert_eq!(s.lag_time(100, t0 + Duration::from_secs(13)), Ok(Duration::from_secs(2)));
        assert_eq!(s.lag_time(200, t0 + Duration::from_secs(13)), Ok(Duration::ZERO));
    }

    #[test]
    fn behind_everything_remembered_is_unknown_not_zero() {
        let mut s = LagState::default();
        let t0 = Instant::now();
        // First sight of the primary: a replica behind it lags by an
        // unknown amount, at least the time since then.
        s.record_primary(500, t0);
        assert_eq!(s.lag_time(100, t0), Err(Duration::ZERO));
        assert_eq!(s.lag_time(100, t0 + Duration::from_secs(1)), Err(Duration::from_secs(1)));
        assert_eq!(s.lag_time(500, t0 + Duration::from_secs(1)), Ok(Duration::ZERO));
        // History trimmed to the slowest replica: one that comes back from
        // downtime further behind is unknown again.
        s.record_primary(900, t0 + Duration::from_secs(2));
        s.forget_before(900);
        assert_eq!(s.lag_time(600, t0 + Duration::from_secs(3)), Err(Duration::from_secs(1)));
        assert_eq!(s.lag_time(900, t0 + Duration::from_secs(3)), Ok(Duration::ZERO));
    }

    #[test]
    fn hysteresis() {
        let g = GroupInfo { name: "g".into(), max_lag: Some(Duration::from_millis(400)), max_lag_bytes: None, fallback: vec![], members: vec![] };
        let ms = |n| Ok(Duration::from_millis(n));
        assert!(within_budget(&g, ms(350), 0, false));
        assert!(!within_budget(&g, ms(350), 0, true));
        assert!(within_budget(&g, ms(300), 0, true));
        assert!(!within_budget(&g, ms(401), 0, false));
        assert!(!within_budget(&g, Err(Duration::ZERO), 0, false));
        let bytes_only = GroupInfo { max_lag: None, max_lag_bytes: Some(1000), ..g };
        assert!(within_budget(&bytes_only, Err(Duration::ZERO), 10, false));
    }
}

#[cfg(test)]
mod pick_tests {
    use super::*;

    fn topo(weights: &[u32]) -> Topology {
        let mut text = String::from("[[users]]\nname=\"a\"\npassword=\"a\"\n[[databases]]\nname=\"a\"\n[[cluster.groups]]\nname=\"default\"\n");
        for (i, w) in weights.iter().enumerate() {
            text.push_str(&format!("[[cluster.replicas]]\nname=\"r{i}\"\naddr=\"127.0.0.1:{}\"\ngroups=[\"default\"]\nweight={w}\n", 6000 + i));
        }
        Topology::from_config(&Config::parse(&text, "t").unwrap(), None)
    }

    #[test]
    fn a_panic_while_the_monitor_held_the_topology_locks_stops_nothing() {
        let t = topo(&[1, 1]);
        let poisoned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _memory = t.memory.lock().unwrap();
            let _snapshot = t.snapshot.write().unwrap();
            let _down = t.marked_down.lock().unwrap();
            panic!("a bug in the monitor");
        }));
        assert!(poisoned.is_err() && t.snapshot.is_poisoned());
        // Sessions still route, the restarted monitor still publishes, a
        // reload still inherits what the monitor learned.
        let _ = t.snapshot();
        t.mark_down(0, "test");
        let now = Instant::now();
        t.publish(t.snapshot().as_ref().clone(), &[now, now]);
        let _ = Topology::from_config(&Config::parse("[[users]]\nname=\"a\"\npassword=\"a\"\n[[databases]]\nname=\"a\"\n", "t").unwrap(), Some(&t));
    }

    #[test]
    fn least_loaded_of_two_wins() {
        let t = topo(&[1, 1]);
        t.replicas[0].inflight.store(5, Ordering::Relaxed);
        for _ in 0..50 {
            assert_eq!(t.pick(&[0, 1]), 1);
        }
    }

    #[test]
    fn weight_scales_load() {
        let t = topo(&[1, 4]);
        t.replicas[0].inflight.store(2, Ordering::Relaxed);
        t.replicas[1].inflight.store(5, Ordering::Relaxed);
        // (2+1)/1 = 3 vs (5+1)/4 = 1.5: the heavier-weighted replica takes more.
        for _ in 0..50 {
            assert_eq!(t.pick(&[0, 1]), 1);
        }
    }

    #[test]
    fn spreads_evenly_when_idle() {
        let t = topo(&[1, 1, 1]);
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            let i = t.pick(&[0, 1, 2]);
            counts[i] += 1;
            t.replicas[i].inflight.fetch_add(1, Ordering::Relaxed);
        }
        // Power of two choices keeps loads within a few of each other.
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(max - min <= 30, "{counts:?}");
    }
}
