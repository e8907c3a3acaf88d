//! The monitor task: one tokio-postgres connection per server, polled
//! concurrently every interval; results become a new snapshot.

use super::{parse_lsn, within_budget, LagState, MonitorSpec, Topology, Writer};
use crate::router::route::{ReplicaState, Snapshot};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What one check of a server found.
#[derive(Debug, Clone)]
struct Check {
    in_recovery: bool,
    lsn: Option<u64>,
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
                Ok(Check { in_recovery: row.get(0), lsn: lsn.as_deref().and_then(parse_lsn) })
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
const CHECK_SQL: &str = "SELECT pg_catalog.pg_is_in_recovery(), (CASE WHEN pg_catalog.pg_is_in_recovery() \
     THEN pg_catalog.pg_last_wal_replay_lsn() ELSE pg_catalog.pg_current_wal_lsn() END)::text";

/// Which server takes writes after this round of checks.
fn choose_writer(current: Writer, primary: &Result<Check, String>, replicas: &[Result<Check, String>]) -> Writer {
    let is_primary = |r: &Result<Check, String>| matches!(r, Ok(Check { in_recovery: false, .. }));
    if let Writer::Replica(i) = current {
        if replicas.get(i).is_some_and(is_primary) {
            return current;
        }
    }
    if is_primary(primary) {
        return Writer::Configured;
    }
    if let Some(i) = replicas.iter().position(is_primary) {
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

/// Polls the cluster until shutdown, publishing a snapshot after each round.
pub async fn run_monitor(topo: Arc<Topology>, spec: MonitorSpec, mut shutdown: watch::Receiver<bool>) {
    let mut primary = Probe { addr: topo.primary.clone(), client: None };
    let mut replicas: Vec<Probe> = topo.replicas.iter().map(|r| Probe { addr: r.addr.clone(), client: None }).collect();
    let mut lag = LagState { excluded: topo.replicas.iter().map(|r| vec![false; r.groups.len()]).collect(), ..Default::default() };
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        // The primary first, so replica positions are compared with a
        // primary position no newer than theirs.
        let p = primary.check(&spec, CHECK_SQL).await;
        let mut results = Vec::with_capacity(replicas.len());
        {
            let futs = replicas.iter_mut().map(|r| r.check(&spec, CHECK_SQL));
            for f in futs.collect::<Vec<_>>() {
                results.push(f.await);
            }
        }
        let writer = choose_writer(topo.writer(), &p, &results);
        topo.set_writer(writer);
        let writer_check = match writer {
            Writer::Configured => p,
            Writer::Replica(i) => results[i].clone(),
            Writer::None => Err("no primary".into()),
        };
        let snap = build_snapshot(&topo, &mut lag, writer_check, results, Instant::now());
        topo.publish(snap);
    }
}

fn build_snapshot(
    topo: &Topology,
    lag: &mut LagState,
    primary: Result<Check, String>,
    replicas: Vec<Result<Check, String>>,
    now: Instant,
) -> Snapshot {
    let (primary_reachable, primary_lsn) = match &primary {
        Ok(Check { in_recovery: false, lsn: Some(l) }) => (true, *l),
        _ => (false, lag.history.back().map(|(l, _)| *l).unwrap_or(0)),
    };
    if primary_reachable {
        lag.record_primary(primary_lsn, now);
    }
    let mut states = Vec::with_capacity(replicas.len());
    for (i, result) in replicas.into_iter().enumerate() {
        let info = &topo.replicas[i];
        let mut st = ReplicaState { name: info.name.clone(), ..Default::default() };
        match result {
            Err(e) => {
                st.excluded_because = Some(format!("unreachable: {e}"));
                st.groups = info.groups.iter().map(|g| (*g, false)).collect();
            }
            Ok(Check { in_recovery: false, .. }) => {
                st.reachable = true;
                st.excluded_because = Some(if topo.writer() == Writer::Replica(i) {
                    "promoted: now the primary (takes writes, and reads that fall back to the primary)".into()
                } else {
                    "not in recovery (promoted?): never used for reads".into()
                });
                st.groups = info.groups.iter().map(|g| (*g, false)).collect();
            }
            Ok(Check { lsn, .. }) => {
                st.reachable = true;
                st.replay_lsn = lsn.unwrap_or(0);
                st.lag_bytes = primary_lsn.saturating_sub(st.replay_lsn);
                st.lag = lag.lag_time(st.replay_lsn, now);
                let mut why = Vec::new();
                st.groups = info
                    .groups
                    .iter()
                    .enumerate()
                    .map(|(slot, &g)| {
                        let group = &topo.groups[g];
                        let ok = within_budget(group, st.lag, st.lag_bytes, lag.excluded[i][slot]);
                        lag.excluded[i][slot] = !ok;
                        if !ok {
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
    if let Some(min) = states.iter().filter(|s| s.reachable).map(|s| s.replay_lsn).min() {
        lag.forget_before(min);
    }
    Snapshot { checked_at_us: crate::stats::now_us(), primary_lsn, primary_reachable, replicas: states }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary() -> Result<Check, String> {
        Ok(Check { in_recovery: false, lsn: Some(1) })
    }
    fn standby() -> Result<Check, String> {
        Ok(Check { in_recovery: true, lsn: Some(1) })
    }
    fn down() -> Result<Check, String> {
        Err("connection refused".into())
    }

    #[test]
    fn writer_follows_promotion_and_sticks() {
        use Writer::*;
        assert_eq!(choose_writer(Configured, &primary(), &[standby(), standby()]), Configured);
        // Primary down, nobody promoted yet: keep trying the primary.
        assert_eq!(choose_writer(Configured, &down(), &[standby(), standby()]), Configured);
        // r2 promoted.
        assert_eq!(choose_writer(Configured, &down(), &[standby(), primary()]), Replica(1));
        // The old primary comes back as a primary: stay on r2 (no split brain).
        assert_eq!(choose_writer(Replica(1), &primary(), &[standby(), primary()]), Replica(1));
        // The configured primary demoted and nobody promoted: no writer.
        assert_eq!(choose_writer(Configured, &standby(), &[standby(), standby()]), None);
        // The promoted replica died and the old primary is down too.
        assert_eq!(choose_writer(Replica(1), &down(), &[standby(), down()]), None);
        // ...and the old primary returned as primary.
        assert_eq!(choose_writer(None, &primary(), &[standby(), down()]), Configured);
    }
}
