use super::*;
use crate::router::classify;

fn groups() -> Vec<GroupInfo> {
    // 0 default {r0} -> primary; 1 chat {r0} -> default, primary; 2 analytics {r1} -> error
    vec![
        GroupInfo { name: "default".into(), max_lag: None, max_lag_bytes: None, fallback: vec![Fallback::Primary], members: vec![0] },
        GroupInfo { name: "chat".into(), max_lag: None, max_lag_bytes: None, fallback: vec![Fallback::Group(0), Fallback::Primary], members: vec![0] },
        GroupInfo { name: "analytics".into(), max_lag: None, max_lag_bytes: None, fallback: vec![Fallback::Error], members: vec![1] },
    ]
}

fn snap(r0: bool, r1: bool) -> Snapshot {
    let st = |name: &str, groups: Vec<(usize, bool)>, lsn| ReplicaState {
        name: name.into(),
        groups,
        replay_lsn: lsn,
        reachable: true,
        excluded_because: None,
        ..Default::default()
    };
    Snapshot {
        checked_at_us: 1,
        primary_lsn: 100,
        primary_reachable: true,
        primary_seen_at: None,
        replicas: vec![st("r0", vec![(0, r0), (1, r0)], 90), st("r1", vec![(2, r1)], 100)],
    }
}

fn decide(sql: &str, group: usize, snapshot: &Snapshot, floor: Option<u64>, route_: Option<RouteHint>) -> Result<(Target, Reason), NoReplica> {
    let g = groups();
    let s = SessionRoute { split: true, route: route_, group, groups: &g, floor, default_read_only: false, serializable: false, calls: Calls::Safe };
    let a = classify(sql, &[]);
    route(&a, &s, snapshot, &mut |c| c[0])
}

#[test]
fn decisions() {
    let up = snap(true, true);
    // (sql, replica group, client LSN floor, hint, expected target, reason)
    type Case<'a> = (&'a str, usize, Option<u64>, Option<RouteHint>, Target, Reason);
    let cases: Vec<Case> = vec![
        ("SELECT 1", 0, None, None, Target::Replica(0), Reason::Read),
        ("SELECT 1", 2, None, None, Target::Replica(1), Reason::Read),
        ("INSERT INTO t VALUES (1)", 0, None, None, Target::Primary, Reason::Write),
        ("SELECT * FROM t FOR UPDATE", 2, None, None, Target::Primary, Reason::Write),
        ("BEGIN", 0, None, None, Target::Primary, Reason::Transaction),
        ("BEGIN READ ONLY", 0, None, None, Target::Replica(0), Reason::ReadOnlyTransaction),
        ("BEGIN READ ONLY; SELECT 1; COMMIT; DELETE FROM t", 0, None, None, Target::Primary, Reason::Transaction),
        ("BEGIN READ ONLY; SET TRANSACTION READ WRITE; INSERT INTO t VALUES (1)", 0, None, None, Target::Primary, Reason::Transaction),
        ("/* pgfleet: route=primary */ SELECT 1", 0, None, None, Target::Primary, Reason::HintPrimary),
        ("SELECT 1", 0, None, Some(RouteHint::Primary), Target::Primary, Reason::HintPrimary),
        ("/* pgfleet: route=auto */ SELECT 1", 0, None, Some(RouteHint::Primary), Target::Replica(0), Reason::Read),
        ("/* pgfleet: route=replica */ SELECT nextval('s')", 0, None, None, Target::Replica(0), Reason::HintReplica),
        // read your writes: r0 replayed 90, r1 100
        ("SELECT 1", 0, Some(95), None, Target::Primary, Reason::ReadYourWrites),
        ("SELECT 1", 0, Some(90), None, Target::Replica(0), Reason::Read),
        ("SELECT 1", 2, Some(95), None, Target::Replica(1), Reason::Read),
    ];
    for (sql, group, floor, hint, target, reason) in cases {
        assert_eq!(decide(sql, group, &up, floor, hint), Ok((target, reason)), "{sql} group {group}");
    }
}

#[test]
fn fallbacks() {
    let r0_down = snap(false, true);
    assert_eq!(decide("SELECT 1", 0, &r0_down, None, None), Ok((Target::Primary, Reason::Fallback)));
    assert_eq!(decide("SELECT 1", 1, &r0_down, None, None), Ok((Target::Primary, Reason::Fallback)));
    let r1_down = snap(true, false);
    let e = decide("SELECT 1", 2, &r1_down, None, None).unwrap_err();
    assert_eq!(e.group, "analytics");
    assert!(e.why.contains("r1"), "{}", e.why);
    // Writes never need a replica.
    assert_eq!(decide("UPDATE t SET a = 1", 2, &r1_down, None, None), Ok((Target::Primary, Reason::Write)));
    // chat falls back to default's members when its own are unusable for chat only.
    let mut partial = snap(true, true);
    partial.replicas[0].groups = vec![(0, true), (1, false)];
    assert_eq!(decide("SELECT 1", 1, &partial, None, None), Ok((Target::Replica(0), Reason::Fallback)));
}

#[test]
fn split_disabled_sends_everything_to_primary() {
    let g = groups();
    let s = SessionRoute { split: false, route: None, group: 0, groups: &g, floor: None, default_read_only: false, serializable: false, calls: Calls::Safe };
    let a = classify("SELECT 1", &[]);
    assert_eq!(route(&a, &s, &snap(true, true), &mut |c| c[0]), Ok((Target::Primary, Reason::SplitDisabled)));
}

#[test]
fn default_read_only_yields_to_an_explicit_mode() {
    let g = groups();
    let s = SessionRoute { split: true, route: None, group: 0, groups: &g, floor: None, default_read_only: true, serializable: false, calls: Calls::Safe };
    let up = snap(true, true);
    let go = |sql: &str| route(&classify(sql, &[]), &s, &up, &mut |c| c[0]).unwrap().0;
    assert_eq!(go("BEGIN"), Target::Replica(0));
    assert_eq!(go("BEGIN READ WRITE"), Target::Primary);
    assert_eq!(go("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE"), Target::Primary);
    // A hot standby refuses serializable transactions, read-only or not.
    assert_eq!(go("BEGIN ISOLATION LEVEL SERIALIZABLE"), Target::Primary);
}

#[test]
fn a_serializable_session_reads_on_the_primary() {
    let g = groups();
    let s = SessionRoute { split: true, route: None, group: 0, groups: &g, floor: None, default_read_only: false, serializable: true, calls: Calls::Safe };
    let up = snap(true, true);
    let go = |sql: &str| route(&classify(sql, &[]), &s, &up, &mut |c| c[0]).unwrap();
    assert_eq!(go("SELECT 1"), (Target::Primary, Reason::Serializable));
    assert_eq!(go("BEGIN READ ONLY"), (Target::Primary, Reason::Serializable));
    // The application's own word still wins.
    assert_eq!(go("/* pgfleet: route=replica */ SELECT 1").0, Target::Replica(0));
}

#[test]
fn reads_calling_volatile_functions_go_to_the_primary() {
    let g = groups();
    let up = snap(true, true);
    let go = |sql: &str, calls: Calls| {
        let s = SessionRoute { split: true, route: None, group: 0, groups: &g, floor: None, default_read_only: false, serializable: false, calls };
        route(&classify(sql, &[]), &s, &up, &mut |c| c[0]).unwrap()
    };
    assert_eq!(go("SELECT create_order(42)", Calls::Safe), (Target::Replica(0), Reason::Read));
    assert_eq!(go("SELECT create_order(42)", Calls::Volatile), (Target::Primary, Reason::VolatileFunction));
    assert_eq!(go("SELECT create_order(42)", Calls::Unknown), (Target::Primary, Reason::CatalogPending));
    // A route hint is the application's word, and wins.
    assert_eq!(go("/* pgfleet: route=replica */ SELECT f()", Calls::Volatile).0, Target::Replica(0));
}
