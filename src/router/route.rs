//! Where one transaction goes. Pure: everything it needs comes in as
//! arguments (the statement's analysis, the session's routing state, the
//! groups and one topology snapshot), so it is table-tested without servers.

use super::classify::{Analysis, Class, RouteHint, TxControl};
use std::time::Duration;

/// A group's fallback step when none of its members is usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback {
    Primary,
    Error,
    Group(usize),
}

#[derive(Debug, Clone)]
pub struct GroupInfo {
    pub name: String,
    pub max_lag: Option<Duration>,
    pub max_lag_bytes: Option<u64>,
    pub fallback: Vec<Fallback>,
    /// Replica indexes.
    pub members: Vec<usize>,
}

/// One replica as the last health check saw it.
#[derive(Debug, Clone, Default)]
pub struct ReplicaState {
    pub name: String,
    /// Groups this replica is in (indexes), with its usability for each.
    pub groups: Vec<(usize, bool)>,
    pub replay_lsn: u64,
    pub lag_bytes: u64,
    pub lag: Duration,
    pub reachable: bool,
    /// Why it is excluded from some or all groups.
    pub excluded_because: Option<String>,
}

impl ReplicaState {
    pub fn usable_in(&self, group: usize) -> bool {
        self.groups.iter().any(|(g, ok)| *g == group && *ok)
    }

    /// Unreachable: in no group, for this reason.
    pub fn take_out(&mut self, why: String) {
        self.reachable = false;
        self.groups.iter_mut().for_each(|g| g.1 = false);
        self.excluded_because = Some(why);
    }
}

/// Immutable view of the cluster, published by the monitor.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// When the monitor took it (unix µs; 0 = never).
    pub checked_at_us: u64,
    pub primary_lsn: u64,
    pub primary_reachable: bool,
    /// When `primary_lsn` was read from the primary itself (None: the
    /// primary was out of sight this round).
    pub primary_seen_at: Option<std::time::Instant>,
    pub replicas: Vec<ReplicaState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Primary,
    Replica(usize),
}

/// Why a decision was made (logged, counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    SplitDisabled,
    HintPrimary,
    Write,
    Transaction,
    Read,
    ReadOnlyTransaction,
    HintReplica,
    ReadYourWrites,
    Fallback,
    /// A read that calls a VOLATILE function of the application's own.
    VolatileFunction,
    /// A read that calls functions while the catalog is not loaded.
    CatalogPending,
    /// The client's transactions are serializable (a standby refuses them).
    Serializable,
}

impl Reason {
    pub const ALL: [Reason; 12] = [
        Reason::SplitDisabled,
        Reason::HintPrimary,
        Reason::Write,
        Reason::Transaction,
        Reason::Read,
        Reason::ReadOnlyTransaction,
        Reason::HintReplica,
        Reason::ReadYourWrites,
        Reason::Fallback,
        Reason::VolatileFunction,
        Reason::CatalogPending,
        Reason::Serializable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::SplitDisabled => "split_disabled",
            Reason::HintPrimary => "hint_primary",
            Reason::Write => "write",
            Reason::Transaction => "transaction",
            Reason::Read => "read",
            Reason::ReadOnlyTransaction => "read_only_transaction",
            Reason::HintReplica => "hint_replica",
            Reason::ReadYourWrites => "read_your_writes",
            Reason::Fallback => "fallback",
            Reason::VolatileFunction => "volatile_function",
            Reason::CatalogPending => "catalog_pending",
            Reason::Serializable => "serializable",
        }
    }
}

/// A read that may not go anywhere (fallback "error").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoReplica {
    pub group: String,
    pub why: String,
}

/// The session's side of a routing decision.
#[derive(Debug, Clone, Copy)]
pub struct SessionRoute<'a> {
    pub split: bool,
    /// `SET pgfleet.route`.
    pub route: Option<RouteHint>,
    pub group: usize,
    pub groups: &'a [GroupInfo],
    /// Read-your-writes floor: the primary LSN of the client's last write.
    pub floor: Option<u64>,
    /// `default_transaction_read_only` is on for this client.
    pub default_read_only: bool,
    /// `default_transaction_isolation` is serializable for this client: a
    /// hot standby refuses every transaction of it (0A000).
    pub serializable: bool,
    /// What the function catalog says of the functions the statement calls.
    pub calls: Calls,
}

/// The function catalog's verdict on the functions a read calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Calls {
    /// None of them is VOLATILE (or the lookup is off).
    #[default]
    Safe,
    /// One is VOLATILE: it may write, so the read goes to the primary.
    Volatile,
    /// The catalog is not loaded (yet, or it failed): not sure, primary.
    Unknown,
}

/// Decides the target of a transaction starting with `a`. `pick` chooses
/// among usable replica indexes (load balancing).
pub fn route(
    a: &Analysis,
    s: &SessionRoute<'_>,
    snap: &Snapshot,
    pick: &mut dyn FnMut(&[usize]) -> usize,
) -> Result<(Target, Reason), NoReplica> {
    if !s.split || s.groups.is_empty() {
        return Ok((Target::Primary, Reason::SplitDisabled));
    }
    match a.route_hint.or(s.route) {
        Some(RouteHint::Primary) => return Ok((Target::Primary, Reason::HintPrimary)),
        Some(RouteHint::Replica) => return replica(s, snap, s.group, Reason::HintReplica, pick),
        _ => {}
    }
    if s.serializable {
        return Ok((Target::Primary, Reason::Serializable));
    }
    if let TxControl::Begin { read_only } = a.tx {
        // A write later in the same string (`BEGIN READ ONLY; ...; DELETE`)
        // or an explicit READ WRITE keeps it on the primary.
        return if a.class == Class::Read && read_only.unwrap_or(s.default_read_only) {
            replica(s, snap, s.group, Reason::ReadOnlyTransaction, pick)
        } else {
            Ok((Target::Primary, Reason::Transaction))
        };
    }
    if a.class == Class::Write {
        return Ok((Target::Primary, Reason::Write));
    }
    match s.calls {
        Calls::Safe => replica(s, snap, s.group, Reason::Read, pick),
        Calls::Volatile => Ok((Target::Primary, Reason::VolatileFunction)),
        Calls::Unknown => Ok((Target::Primary, Reason::CatalogPending)),
    }
}

fn replica(
    s: &SessionRoute<'_>,
    snap: &Snapshot,
    group: usize,
    reason: Reason,
    pick: &mut dyn FnMut(&[usize]) -> usize,
) -> Result<(Target, Reason), NoReplica> {
    let mut tried = vec![group];
    let mut current = group;
    let mut step = 0;
    let mut why = Vec::new();
    loop {
        let usable: Vec<usize> = s.groups[current]
            .members
            .iter()
            .copied()
            .filter(|&r| snap.replicas.get(r).is_some_and(|st| st.usable_in(current)))
            .collect();
        if !usable.is_empty() {
            let fresh: Vec<usize> = match s.floor {
                Some(f) => usable.iter().copied().filter(|&r| snap.replicas[r].replay_lsn >= f).collect(),
                None => usable,
            };
            if fresh.is_empty() {
                // Only the client's own write is missing: the primary has it.
                return Ok((Target::Primary, Reason::ReadYourWrites));
            }
            let chosen = pick(&fresh);
            let r = if current == group { reason } else { Reason::Fallback };
            return Ok((Target::Replica(chosen), r));
        }
        for &m in &s.groups[current].members {
            if let Some(st) = snap.replicas.get(m) {
                why.push(format!("{}: {}", st.name, st.excluded_because.as_deref().unwrap_or("unusable")));
            }
        }
        // Next step of the original group's fallback chain.
        let chain = &s.groups[group].fallback;
        let next = if chain.is_empty() && step == 0 { Some(&Fallback::Primary) } else { chain.get(step) };
        step += 1;
        match next {
            None | Some(Fallback::Primary) => return Ok((Target::Primary, Reason::Fallback)),
            Some(Fallback::Error) => {
                let why = if why.is_empty() { "the group has no members".to_string() } else { why.join("; ") };
                return Err(NoReplica { group: s.groups[group].name.clone(), why });
            }
            Some(Fallback::Group(g)) => {
                if tried.contains(g) {
                    continue;
                }
                tried.push(*g);
                current = *g;
            }
        }
    }
}

#[cfg(test)]
#[path = "route_tests.rs"]
mod tests;
