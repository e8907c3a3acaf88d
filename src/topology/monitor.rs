//! The monitor task: one tokio-postgres connection per server, polled
//! concurrently every interval; results become a new snapshot.

use super::{parse_lsn, within_budget, LagState, MonitorSpec, Topology, Writer, NOT_CHECKED, READINGS_KEPT};
use crate::router::route::{ReplicaState, Snapshot};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What one check of a server found.
#[derive(Debug, Clone)]
pub(super) struct Check {
    in_recovery: bool,
    lsn: Option<u64>,
    /// A primary's timeline; a standby's while it streams (None: not
    /// streaming, or the monitor's user may not see it: superuser or
    /// `pg_read_all_stats` can).
    tli: Option<i32>,
}

/// A lazily (re)connected monitoring connection.
struct Probe {
    addr: String,
    client: Option<tokio_postgres::Client>,
}

impl Probe {
    async fn check(&mut self, spec: &MonitorSpec, sql: &str) -> Result<Check, String> {
        let limit = (spec.interval * 5).clamp(Duration::from_millis(500), Duration::from_secs(5));
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(tokio::time::timeout(limit, self.connect(spec)).await.map_err(|_| "connect timeout".to_string())??);
        }
        let client = self.client.as_ref().expect("connected above");
        let result = tokio::time::timeout(limit, client.query_one(sql, &[])).await;
        match result {
            Ok(Ok(row)) => {
                let lsn: Option<String> = row.get(1);
                Ok(Check { in_recovery: row.get(0), lsn: lsn.as_deref().and_then(parse_lsn), tli: row.get(2) })
            }
            Ok(Err(e)) => {
                self.client = None;
                Err(e.to_string())
            }
            Err(_) => {
                self.client = None;
                Err("health check timed out".into())
            }
        }
    }

    async fn connect(&self, spec: &MonitorSpec) -> Result<tokio_postgres::Client, String> {
        connect_as(spec, &self.addr, &spec.database, "pgfleet-monitor").await
    }
}

/// A tokio-postgres connection as the monitor's user to `dbname` on `addr`.
pub async fn connect_as(spec: &MonitorSpec, addr: &str, dbname: &str, app: &str) -> Result<tokio_postgres::Client, String> {
    let (host, port) = addr.rsplit_once(':').ok_or("bad address")?;
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(host)
        .port(port.parse().map_err(|_| "bad port")?)
        .user(&spec.user)
        .dbname(dbname)
        .application_name(app)
        .connect_timeout(Duration::from_secs(2));
    if let Some(p) = &spec.password {
        cfg.password(p);
    }
    crate::tls::connect_pg(cfg, spec.tls.clone()).await
}

/// Role and position of any server: replay position on a standby, write
/// position on a primary (so a promoted replica reports like a primary).
/// And the timeline: a primary's from its current WAL file name, a
/// standby's from its WAL receiver while streaming.
const CHECK_SQL: &str = "SELECT pg_catalog.pg_is_in_recovery(), (CASE WHEN pg_catalog.pg_is_in_recovery() \
     THEN pg_catalog.pg_last_wal_replay_lsn() ELSE pg_catalog.pg_current_wal_lsn() END)::text, \
     CASE WHEN pg_catalog.pg_is_in_recovery() \
     THEN (SELECT received_tli FROM pg_catalog.pg_stat_wal_receiver WHERE status = 'streaming') \
     ELSE ('x' || pg_catalog.substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8))::bit(32)::int END";

/// Which server takes writes after this round of checks. `standby_since[i]`:
/// replica i answered as a standby at some check since the current writer
/// was chosen, so if it answers as a primary now, it was promoted since.
fn choose_writer(current: Writer, primary: &Result<Check, String>, replicas: &[&Result<Check, String>], standby_since: &[bool]) -> Writer {
    let is_primary = |r: &Result<Check, String>| matches!(r, Ok(Check { in_recovery: false, .. }));
    let since = |i: usize| standby_since.get(i).copied().unwrap_or(false);
    let promoted_since = replicas.iter().enumerate().position(|(i, r)| is_primary(r) && since(i));
    // Several answering as primaries: one promoted since first (a fresh
    // failover), else the first in the config.
    let promoted = promoted_since.or_else(|| replicas.iter().position(|r| is_primary(r)));
    if let Writer::Replica(i) = current {
        match replicas.get(i) {
            Some(r) if is_primary(r) => return current,
            // Out of sight for a round (busy, restarting): still the writer,
            // unless another replica was promoted since (the cluster failed
            // over again). One that was a primary all along is not that: a
            // blip must not move writes between two primaries. The old
            // primary answering as a primary meanwhile is the stale one (it
            // lacks the writes made since).
            Some(Err(_)) => return promoted_since.map_or(current, Writer::Replica),
            // A standby again (demoted, re-cloned): any promoted one.
            _ => {
                if let Some(p) = promoted {
                    return Writer::Replica(p);
                }
            }
        }
    }
    if is_primary(primary) {
        return Writer::Configured;
    }
    if let Some(i) = promoted {
        return Writer::Replica(i);
    }
    match primary {
        // In recovery (demoted) with nobody promoted: nowhere to write.
        Ok(_) => Writer::None,
        // Unreachable: keep trying it (it may be restarting) unless the
        // writer we followed was a promoted replica that is gone too.
        Err(_) if matches!(current, Writer::Replica(_)) => Writer::None,
        Err(_) => Writer::Configured,
    }
}

/// One server's last finished check: what it found, and when the check
/// began and ended (the reading was taken in between).
#[derive(Debug, Clone)]
pub(super) struct Sample {
    pub(super) result: Result<Check, String>,
    pub(super) started: Instant,
    pub(super) at: Instant,
}

impl Sample {
    pub(super) fn unchecked(at: Instant) -> Sample {
        Sample { result: Err(NOT_CHECKED.into()), started: at, at }
    }
}

/// Polls the cluster until shutdown, publishing a snapshot after each round.
///
/// Every server is checked in a task of its own. A round waits for the
/// checks it started, for at most one interval (the first round: until
/// they end); a server whose check is still out (blackholed, overloaded: up to
/// its timeout) counts with its last finished check, read as of its time,
/// so it delays no other server's check and its own lag keeps growing.
pub async fn run_monitor(topo: Arc<Topology>, spec: MonitorSpec, mut shutdown: watch::Receiver<bool>) {
    let spec = Arc::new(spec);
    let addrs: Vec<String> = std::iter::once(topo.primary.clone()).chain(topo.replicas.iter().map(|r| r.addr.clone())).collect();
    // Index 0 is the primary. A probe is out (None) while its check runs,
    // in `checks` (which aborts the checks still out when the monitor stops);
    // `out` then holds the check's task and the round that started it.
    let mut probes: Vec<Option<Probe>> = addrs.iter().map(|addr| Some(Probe { addr: addr.clone(), client: None })).collect();
    let mut last: Vec<Option<Sample>> = vec![None; probes.len()];
    let mut checks = tokio::task::JoinSet::new();
    let mut out: Vec<Option<(tokio::task::Id, Instant)>> = vec![None; probes.len()];
    super::lock(&topo.memory).lag.fresh_for = Some(spec.interval * 3);
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let round_start = Instant::now();
        for (i, slot) in probes.iter_mut().enumerate() {
            let Some(mut probe) = slot.take() else { continue };
            let spec = spec.clone();
            let task = checks.spawn(async move {
                let started = Instant::now();
                let result = probe.check(&spec, CHECK_SQL).await;
                (i, probe, Sample { result, started, at: Instant::now() })
            });
            out[i] = Some((task.id(), round_start));
        }
        let deadline = tokio::time::Instant::from_std(round_start + spec.interval);
        // Only for the checks this round started (a server whose check is
        // still out from an earlier round is not waited for).
        while out.iter().flatten().any(|(_, round)| *round == round_start) {
            let next = if first { Ok(checks.join_next_with_id().await) } else { tokio::time::timeout_at(deadline, checks.join_next_with_id()).await };
            let (i, probe, sample) = match next {
                Ok(Some(Ok((_, done)))) => done,
                // A check that panicked: a new connection next round.
                Ok(Some(Err(e))) => {
                    let Some(i) = out.iter().position(|o| o.is_some_and(|(id, _)| id == e.id())) else { continue };
                    let started = out[i].map_or(round_start, |(_, at)| at);
                    let failed = Sample { result: Err("health check failed (panicked)".into()), started, at: Instant::now() };
                    (i, Probe { addr: addrs[i].clone(), client: None }, failed)
                }
                _ => break,
            };
            (probes[i], last[i], out[i]) = (Some(probe), Some(sample), None);
        }
        first = false;
        let sample = |i: usize| last[i].clone().unwrap_or_else(|| Sample::unchecked(round_start));
        let p = sample(0);
        let replicas: Vec<Sample> = (1..last.len()).map(sample).collect();
        let results: Vec<&Result<Check, String>> = replicas.iter().map(|r| &r.result).collect();
        let current = topo.writer();
        let standby_since = super::lock(&topo.memory).standby_since.clone();
        let writer = choose_writer(current, &p.result, &results, &standby_since);
        topo.set_writer(writer);
        {
            // Standbys seen by checks that began after the writer was
            // chosen (not a reading carried over from before, while a
            // check is still out).
            let mut mem = super::lock(&topo.memory);
            mem.standby_since.resize(replicas.len(), false);
            if writer != current {
                mem.standby_since.fill(false);
                mem.writer_chosen_at = Some(round_start);
            }
            let from = mem.writer_chosen_at;
            for (i, r) in replicas.iter().enumerate() {
                if matches!(r.result, Ok(Check { in_recovery: true, .. })) && from.is_none_or(|f| r.started >= f) {
                    mem.standby_since[i] = true;
                }
            }
        }
        let writer_check = match writer {
            Writer::Configured => p,
            Writer::Replica(i) => replicas[i].clone(),
            Writer::None => Sample { result: Err("no primary".into()), ..p },
        };
        let now = Instant::now();
        let mut mem = super::lock(&topo.memory);
        let started: Vec<Instant> = replicas.iter().map(|r| r.started).collect();
        topo.publish(build_snapshot(&topo, &mut mem.lag, &writer_check, &replicas, now), &started);
        mem.last = Some((writer_check, replicas));
    }
}

pub(super) fn build_snapshot(
    topo: &Topology,
    lag: &mut LagState,
    primary_sample: &Sample,
    replicas: &[Sample],
    now: Instant,
) -> Snapshot {
    // The position was read after the check began: the primary had it
    // then at the latest (lag reads high rather than low, and a
    // read-your-writes floor taken from it covers every write before).
    let (primary, primary_at) = (&primary_sample.result, primary_sample.started);
    let seen = match primary {
        Ok(Check { in_recovery: false, lsn: Some(l), .. }) => Some(*l),
        _ => None,
    };
    let primary_tli = match primary {
        Ok(Check { in_recovery: false, tli, .. }) => *tli,
        _ => None,
    };
    match seen {
        Some(l) => lag.record_primary(l, primary_at),
        // Out of sight (down, demoted, not checked): the primary is at least
        // as far as the furthest standby has replayed, so lag is measured
        // against that, not frozen at the last position seen.
        None => {
            let furthest = replicas.iter().filter_map(|r| match r.result {
                Ok(Check { in_recovery: true, lsn: Some(l), .. }) => Some((l, r.at)),
                _ => None,
            });
            // Replayed by the time its check answered.
            if let Some((f, at)) = furthest.max_by_key(|(l, _)| *l) {
                lag.advance(f, at);
            }
        }
    }
    let primary_reachable = seen.is_some();
    let overdue = match lag.fresh_for {
        Some(fresh) if seen.is_some() => now.saturating_duration_since(primary_at).saturating_sub(fresh),
        _ => Duration::ZERO,
    };
    let primary_lsn = lag.history.back().map(|(l, _)| *l).unwrap_or(0);
    lag.readings.resize(topo.replicas.len(), Default::default());
    lag.diverged.resize(topo.replicas.len(), None);
    let mut states = Vec::with_capacity(replicas.len());
    for (i, Sample { result, at: checked_at, .. }) in replicas.iter().enumerate() {
        let info = &topo.replicas[i];
        // In no group unless its lag is judged below.
        let mut st = ReplicaState { name: info.name.clone(), groups: info.groups.iter().map(|g| (*g, false)).collect(), ..Default::default() };
        match result {
            Err(e) => {
                st.excluded_because = Some(if e == NOT_CHECKED { e.clone() } else { format!("unreachable: {e}") });
            }
            Ok(Check { in_recovery: false, .. }) => {
                st.reachable = true;
                st.excluded_because = Some(if topo.writer() == Writer::Replica(i) {
                    "promoted: now the primary (takes writes, and reads that fall back to the primary)".into()
                } else {
                    "not in recovery (promoted?): never used for reads".into()
                });
            }
            Ok(Check { lsn, tli, .. }) => {
                st.reachable = true;
                st.replay_lsn = lsn.unwrap_or(0);
                // A standby cannot have replayed WAL its primary had not yet
                // written when checked later: if it has, it is on another
                // timeline (left behind by a failover, ahead of the new
                // primary) and its rows are not the primary's.
                // Neither its position moving on (the rest of the old
                // timeline's WAL), nor falling back (a restart replays from
                // its last restartpoint), nor a failed check tells that it
                // was rewound or re-cloned: streaming on the primary's
                // timeline does.
                // Checks run concurrently: compared are the readings that
                // ended before the primary's check began.
                let readings = &mut lag.readings[i];
                if readings.back().is_none_or(|(_, at)| at != checked_at) {
                    if readings.len() == READINGS_KEPT {
                        readings.pop_front();
                    }
                    readings.push_back((st.replay_lsn, *checked_at));
                }
                let before = readings.iter().filter(|(_, at)| *at < primary_sample.started).map(|(l, _)| *l).max();
                if let (Some(p), Some(before)) = (seen, before) {
                    if before > p {
                        lag.diverged[i] = Some(lag.diverged[i].unwrap_or(0).max(before));
                    }
                }
                if lag.diverged[i].is_some() && tli.is_some() && *tli == primary_tli {
                    // Its readings from before the rewind do not count.
                    lag.diverged[i] = None;
                    readings.drain(..readings.len() - 1);
                }
                if let Some(d) = lag.diverged[i] {
                    st.excluded_because = Some(format!(
                        "diverged: replayed up to {} that the primary never had (left on the old timeline by a failover?); used again once it streams on the primary's timeline (rewound or re-cloned; seeing that takes a health_user with pg_read_all_stats)",
                        crate::topology::format_lsn(d)
                    ));
                    states.push(st);
                    continue;
                }
                st.lag_bytes = primary_lsn.saturating_sub(st.replay_lsn);
                let lag_time = match lag.lag_time(st.replay_lsn, now) {
                    // The primary's check is overdue (a slow or hung
                    // primary, often one that is busy, when replicas fall
                    // behind): what it wrote since its last reading is not
                    // known, so no replica counts as fresher than that.
                    Ok(t) => Ok(t.max(overdue)),
                    unknown => unknown,
                };
                st.lag = lag_time.unwrap_or_else(|at_least| at_least);
                let mut why = Vec::new();
                st.groups = info
                    .groups
                    .iter()
                    .enumerate()
                    .map(|(slot, &g)| {
                        let group = &topo.groups[g];
                        let ok = within_budget(group, lag_time, st.lag_bytes, lag.excluded[i][slot]);
                        lag.excluded[i][slot] = !ok;
                        if !ok && lag_time.is_err() && group.max_lag.is_some() {
                            why.push(format!(
                                "lag unknown (behind every primary position seen, the oldest {} ms ago) for group {}",
                                st.lag.as_millis(),
                                group.name
                            ));
                        } else if !ok {
                            why.push(format!(
                                "lag {} ms / {} bytes over the budget of group {}",
                                st.lag.as_millis(),
                                st.lag_bytes,
                                group.name
                            ));
                        }
                        (g, ok)
                    })
                    .collect();
                st.excluded_because = (!why.is_empty()).then(|| why.join("; "));
            }
        }
        states.push(st);
    }
    // History is kept back to the slowest standby seen lately, not only
    // this round: one failed check must not make a slow standby's lag
    // unknown (and flap it out of its groups).
    let recent = lag.readings.iter().filter_map(|r| r.back()).filter(|(_, at)| now.saturating_duration_since(*at) < super::REPLAY_REMEMBERED);
    if let Some(min) = recent.map(|(l, _)| *l).min() {
        lag.forget_before(min);
    }
    let primary_seen_at = seen.map(|_| primary_at);
    Snapshot { checked_at_us: crate::stats::now_us(), primary_lsn, primary_reachable, primary_seen_at, replicas: states }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary() -> Result<Check, String> {
        Ok(Check { in_recovery: false, lsn: Some(1), tli: Some(1) })
    }
    fn standby() -> Result<Check, String> {
        Ok(Check { in_recovery: true, lsn: Some(1), tli: Some(1) })
    }
    fn down() -> Result<Check, String> {
        Err("connection refused".into())
    }

    fn at(in_recovery: bool, lsn: u64) -> Result<Check, String> {
        Ok(Check { in_recovery, lsn: Some(lsn), tli: Some(1) })
    }

    fn on(tli: i32, in_recovery: bool, lsn: u64) -> Result<Check, String> {
        Ok(Check { in_recovery, lsn: Some(lsn), tli: Some(tli) })
    }

    /// Two replicas in one group with a 10 s time budget and no byte budget.
    fn topo() -> Topology {
        let mut text = String::from("[[users]]\nname=\"a\"\npassword=\"a\"\n[[databases]]\nname=\"a\"\n");
        text.push_str("[[cluster.groups]]\nname=\"default\"\nmax_lag=\"10s\"\n");
        for i in 0..2 {
            text.push_str(&format!("[[cluster.replicas]]\nname=\"r{i}\"\naddr=\"127.0.0.1:{}\"\ngroups=[\"default\"]\n", 6000 + i));
        }
        Topology::from_config(&crate::config::Config::parse(&text, "t").unwrap(), None)
    }

    /// A round whose checks all ran at `now`, the primary's from `primary_at`.
    fn snap(t: &Topology, lag: &mut LagState, (p, primary_at): (&Result<Check, String>, Instant), rs: &[Result<Check, String>], now: Instant) -> Snapshot {
        let sample = |result: &Result<Check, String>, at: Instant| Sample { result: result.clone(), started: at, at };
        let replicas: Vec<Sample> = rs.iter().map(|r| sample(r, now)).collect();
        build_snapshot(t, lag, &sample(p, primary_at), &replicas, now)
    }

    fn usable(s: &Snapshot) -> Vec<bool> {
        s.replicas.iter().map(|r| r.groups.iter().all(|(_, ok)| *ok)).collect()
    }

    #[test]
    fn a_replica_behind_the_first_primary_position_seen_is_not_used() {
        let t = topo();
        let mut lag = LagState { excluded: vec![vec![false]; 2], ..Default::default() };
        let t0 = Instant::now();
        // Replication of r1 stalled long ago, the primary idle since: the
        // first check cannot tell how old its missing WAL is.
        let s = snap(&t, &mut lag, (&at(false, 1000), t0), &[at(true, 1000), at(true, 400)], t0);
        assert_eq!(usable(&s), [true, false]);
        assert!(s.replicas[1].excluded_because.as_deref().unwrap().contains("lag unknown"), "{:?}", s.replicas[1]);
        assert_eq!(s.replicas[1].lag_bytes, 600);
        // It catches up: measurable, and back.
        let s = snap(&t, &mut lag, (&at(false, 1000), t0 + Duration::from_millis(100)), &[at(true, 1000), at(true, 1000)], t0 + Duration::from_millis(100));
        assert_eq!(usable(&s), [true, true]);
    }

    #[test]
    fn with_the_primary_out_of_sight_lag_is_against_the_furthest_standby() {
        let t = topo();
        let mut lag = LagState { excluded: vec![vec![false]; 2], ..Default::default() };
        let t0 = Instant::now();
        // Down from the start: the furthest standby is as fresh as anything known.
        let s = snap(&t, &mut lag, (&down(), t0), &[at(true, 800), at(true, 300)], t0);
        assert!(!s.primary_reachable);
        assert_eq!(s.primary_lsn, 800);
        assert_eq!(usable(&s), [true, false]);
        // Seen, then gone: positions keep advancing through the standbys,
        // and a standby left behind ages out of the budget.
        let s = snap(&t, &mut lag, (&at(false, 900), t0 + Duration::from_secs(1)), &[at(true, 900), at(true, 900)], t0 + Duration::from_secs(1));
        assert_eq!(usable(&s), [true, true]);
        let s = snap(&t, &mut lag, (&down(), t0 + Duration::from_secs(2)), &[at(true, 1500), at(true, 900)], t0 + Duration::from_secs(2));
        assert_eq!(s.primary_lsn, 1500);
        assert_eq!(usable(&s), [true, true]);
        let s = snap(&t, &mut lag, (&down(), t0 + Duration::from_secs(13)), &[at(true, 1500), at(true, 900)], t0 + Duration::from_secs(13));
        assert_eq!(usable(&s), [true, false]);
        assert!(s.replicas[1].excluded_because.as_deref().unwrap().contains("over the budget"), "{:?}", s.replicas[1]);
    }

    #[test]
    fn one_failed_check_does_not_make_a_slow_standby_unknown() {
        let t = topo();
        let mut lag = LagState { excluded: vec![vec![false]; 2], ..Default::default() };
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        // r1 runs a second behind r0, well within its 10 s budget.
        snap(&t, &mut lag, (&at(false, 1000), ms(0)), &[at(true, 1000), at(true, 1000)], ms(0));
        for (i, p) in [2000u64, 3000, 4000].into_iter().enumerate() {
            let s = snap(&t, &mut lag, (&at(false, p), ms(1000 * (i as u64 + 1))), &[at(true, p), at(true, p - 1000)], ms(1000 * (i as u64 + 1)));
            assert_eq!(usable(&s), [true, true]);
        }
        // Its check fails once, while the others pass where it was; the
        // next finds it a bit further, still behind them.
        snap(&t, &mut lag, (&at(false, 5000), ms(4000)), &[at(true, 5000), down()], ms(4000));
        let s = snap(&t, &mut lag, (&at(false, 6000), ms(5000)), &[at(true, 6000), at(true, 4500)], ms(5000));
        assert_eq!(usable(&s), [true, true], "{:?}", s.replicas[1]);
        assert_eq!(s.replicas[1].lag, Duration::from_secs(1));
    }

    #[test]
    fn a_new_timeline_starts_the_history_again() {
        let t = topo();
        let mut lag = LagState { excluded: vec![vec![false]; 2], ..Default::default() };
        let t0 = Instant::now();
        snap(&t, &mut lag, (&at(false, 5000), t0), &[at(true, 5000), at(true, 5000)], t0);
        // Failover to a primary that had not received the last WAL: its
        // position is lower; standbys that follow it are not lagging behind
        // a position that no longer exists.
        let s = snap(&t, &mut lag, (&at(false, 4000), t0 + Duration::from_secs(20)), &[at(true, 4000), at(true, 4000)], t0 + Duration::from_secs(20));
        assert_eq!(s.primary_lsn, 4000);
        assert_eq!(usable(&s), [true, true]);
    }

    #[test]
    fn a_standby_ahead_of_its_primary_is_diverged_until_it_streams_on_its_timeline() {
        let t = topo();
        let mut lag = LagState { excluded: vec![vec![false]; 2], ..Default::default() };
        let t0 = Instant::now();
        let round = |k: u64| t0 + Duration::from_millis(100 * k);
        // Checked after the primary, a standby may be a little ahead of the
        // position the primary reported in the same round: not diverged.
        let s = snap(&t, &mut lag, (&on(1, false, 5000), round(1)), &[on(1, true, 5100), on(1, true, 5000)], round(1));
        assert_eq!(usable(&s), [true, true]);
        let s = snap(&t, &mut lag, (&on(1, false, 5200), round(2)), &[on(1, true, 5200), on(1, true, 5200)], round(2));
        assert_eq!(usable(&s), [true, true]);
        // Failover to a server that had only reached 4000 (now timeline 2);
        // r0 had replayed 5200 of the old primary's WAL: ahead of the new
        // primary's later position, so its rows are not the primary's. r1
        // follows the new timeline.
        let s = snap(&t, &mut lag, (&on(2, false, 4100), round(3)), &[on(1, true, 5200), on(2, true, 4100)], round(3));
        assert_eq!(usable(&s), [false, true]);
        assert!(s.replicas[0].excluded_because.as_deref().is_some_and(|w| w.starts_with("diverged")), "{:?}", s.replicas[0]);
        // It replays on the rest of the old timeline's WAL it received,
        // the new primary passes it, one check fails, it restarts and
        // replays from its last restartpoint (below where it diverged),
        // it is not streaming: still diverged through all of it.
        let rounds: [Result<Check, String>; 5] = [
            on(1, true, 5300),
            on(1, true, 5350),
            down(),
            Ok(Check { in_recovery: true, lsn: Some(4500), tli: None }),
            Ok(Check { in_recovery: true, lsn: Some(5350), tli: None }),
        ];
        for (k, r0) in rounds.into_iter().enumerate() {
            let p = if k == 0 { 4200 } else { 9000 };
            let s = snap(&t, &mut lag, (&on(2, false, p), round(4 + k as u64)), &[r0, on(2, true, p)], round(4 + k as u64));
            assert_eq!(usable(&s), [false, true], "round {k}");
        }
        // Rewound or re-cloned: it streams on the primary's timeline.
        let s = snap(&t, &mut lag, (&on(2, false, 9100), round(10)), &[on(2, true, 9050), on(2, true, 9100)], round(10));
        assert_eq!(usable(&s), [true, true]);
    }

    #[test]
    fn a_slow_primary_check_is_compared_with_the_readings_that_ended_before_it_began() {
        let t = topo();
        let mut lag = LagState { excluded: vec![vec![false]; 2], ..Default::default() };
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let s = |result: Result<Check, String>, started: u64, at: u64| Sample { result, started: ms(started), at: ms(at) };
        // Both standbys at 5200 on timeline 1.
        build_snapshot(&t, &mut lag, &s(on(1, false, 5200), 0, 5), &[s(on(1, true, 5200), 0, 5), s(on(1, true, 5200), 0, 5)], ms(6));
        // Failover to a server that had 4000: its checks (from 150 ms)
        // answer slowly; meanwhile r0, left on timeline 1, answers fast.
        for round in [100, 200] {
            let r = |c| s(c, round, round + 5);
            build_snapshot(&t, &mut lag, &s(down(), 150, 150), &[r(on(1, true, 5200)), r(on(2, true, 4000))], ms(round + 6));
        }
        // The new primary's first answer: r0 had 5200 before that check
        // began (its readings up to 105 ms), which the primary never had.
        let r = |c| s(c, 300, 305);
        let snap = build_snapshot(&t, &mut lag, &s(on(2, false, 4100), 150, 300), &[r(on(1, true, 5200)), r(on(2, true, 4100))], ms(306));
        assert_eq!(usable(&snap), [false, true]);
        assert!(snap.replicas[0].excluded_because.as_deref().is_some_and(|w| w.starts_with("diverged")), "{:?}", snap.replicas[0]);
    }

    #[test]
    fn replicas_count_as_lagging_while_the_primarys_check_is_overdue() {
        let t = topo();
        let mut lag = LagState { excluded: vec![vec![false]; 2], fresh_for: Some(Duration::from_millis(200)), ..Default::default() };
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        // Fresh readings: no lag.
        let s = snap(&t, &mut lag, (&at(false, 5000), ms(0)), &[at(true, 5000), at(true, 5000)], ms(50));
        assert_eq!(s.replicas[0].lag, Duration::ZERO);
        // The primary's next check hangs: 12 s later its last reading is
        // all there is. A replica at that position may lack 12 s of writes
        // (over the group's 10 s budget).
        let s = snap(&t, &mut lag, (&at(false, 5000), ms(0)), &[at(true, 5000), at(true, 5000)], ms(12_000));
        assert_eq!(s.replicas[0].lag, Duration::from_millis(11_800));
        assert_eq!(usable(&s), [false, false]);
    }

    #[test]
    fn a_round_that_began_before_a_replica_was_marked_down_does_not_restore_it() {
        let t = topo();
        let mut lag = LagState { excluded: vec![vec![false]; 2], ..Default::default() };
        let t0 = Instant::now();
        let s = snap(&t, &mut lag, (&at(false, 5000), t0), &[at(true, 5000), at(true, 5000)], t0);
        t.publish(s, &[t0, t0]);
        assert_eq!(usable(&t.snapshot()), [true, true]);
        let round_start = Instant::now();
        t.mark_down(0, "connection refused");
        assert_eq!(usable(&t.snapshot()), [false, true]);
        // Checks of that round succeeded before the client's connect failed.
        let s = snap(&t, &mut lag, (&at(false, 5100), round_start), &[at(true, 5100), at(true, 5100)], round_start);
        t.publish(s, &[round_start, round_start]);
        assert_eq!(usable(&t.snapshot()), [false, true]);
        assert!(t.snapshot().replicas[0].excluded_because.as_deref().is_some_and(|w| w.contains("connection failed")));
        // The next round's checks began after it: back.
        let later = Instant::now();
        let s = snap(&t, &mut lag, (&at(false, 5200), later), &[at(true, 5200), at(true, 5200)], later);
        t.publish(s, &[later, later]);
        assert_eq!(usable(&t.snapshot()), [true, true]);
    }

    #[test]
    fn a_reload_keeps_a_replica_marked_down_after_its_last_check() {
        let cfg = |text: &str| crate::config::Config::parse(text, "t").unwrap();
        let text = "[[users]]\nname=\"a\"\npassword=\"a\"\n[[databases]]\nname=\"a\"\n[[cluster.groups]]\nname=\"default\"\n\
                    [[cluster.replicas]]\nname=\"r0\"\naddr=\"127.0.0.1:6000\"\ngroups=[\"default\"]\n\
                    [[cluster.replicas]]\nname=\"r1\"\naddr=\"127.0.0.1:6001\"\ngroups=[\"default\"]\n";
        let t = Topology::from_config(&cfg(text), None);
        let t0 = Instant::now();
        let s = |lsn| Sample { result: at(true, lsn), started: t0, at: t0 };
        let (p, rs) = (Sample { result: at(false, 5000), started: t0, at: t0 }, vec![s(5000), s(5000)]);
        {
            let mut mem = t.memory.lock().unwrap();
            let snap = build_snapshot(&t, &mut mem.lag, &p, &rs, t0);
            t.publish(snap, &[t0, t0]);
            mem.last = Some((p, rs));
        }
        t.mark_down(0, "connection refused");
        // A reload (a new group, say) rebuilds the snapshot from the last
        // checks, which began before r0 failed a client's connect.
        let reloaded = Topology::from_config(&cfg(&format!("{text}[[cluster.groups]]\nname=\"other\"\n")), Some(&t));
        assert_eq!(usable(&reloaded.snapshot()), [false, true]);
    }

    #[test]
    fn writer_follows_promotion_and_sticks() {
        use Writer::*;
        let none = [false, false];
        assert_eq!(choose_writer(Configured, &primary(), &[&standby(), &standby()], &none), Configured);
        // Primary down, nobody promoted yet: keep trying the primary.
        assert_eq!(choose_writer(Configured, &down(), &[&standby(), &standby()], &none), Configured);
        // r2 promoted.
        assert_eq!(choose_writer(Configured, &down(), &[&standby(), &primary()], &[true, true]), Replica(1));
        // The old primary comes back as a primary: stay on r2 (no split brain).
        assert_eq!(choose_writer(Replica(1), &primary(), &[&standby(), &primary()], &[true, false]), Replica(1));
        // The configured primary demoted and nobody promoted: no writer.
        assert_eq!(choose_writer(Configured, &standby(), &[&standby(), &standby()], &none), None);
        // The promoted replica is out of sight (one failed check, or
        // down): writes keep waiting for it, whether the old primary is
        // down or answers as a primary (it lacks the writes made since).
        assert_eq!(choose_writer(Replica(1), &down(), &[&standby(), &down()], &[true, false]), Replica(1));
        assert_eq!(choose_writer(Replica(1), &primary(), &[&standby(), &down()], &[true, false]), Replica(1));
        // ...unless another replica was promoted since (seen as a standby
        // after r2 took over): follow that one.
        assert_eq!(choose_writer(Replica(1), &primary(), &[&primary(), &down()], &[true, false]), Replica(0));
        // One that was a primary all along (two promoted at once) is not
        // followed on a blip of the writer: writes would split.
        assert_eq!(choose_writer(Replica(1), &down(), &[&primary(), &down()], &none), Replica(1));
        // Two promoted at once, the configured primary down: the one
        // promoted since wins over the first in the config.
        assert_eq!(choose_writer(Configured, &down(), &[&primary(), &primary()], &[false, true]), Replica(1));
        // The promoted replica is a standby again (demoted, re-cloned from
        // the old primary): the configured primary takes writes again.
        assert_eq!(choose_writer(Replica(1), &primary(), &[&standby(), &standby()], &[true, true]), Configured);
        // The configured primary down and the promoted one a standby again.
        assert_eq!(choose_writer(Replica(1), &down(), &[&standby(), &standby()], &[true, true]), None);
        // ...and the old primary returned as primary.
        assert_eq!(choose_writer(None, &primary(), &[&standby(), &down()], &[true, false]), Configured);
    }

}
