//! SHOW tables of the admin console. PgBouncer-compatible ones use its
//! column names, order and types (1.24/1.25); numbers are sent as text.

use super::{Table, INT4, NUMERIC, TEXT};
use crate::app::App;
use crate::config::PoolMode;
use crate::stats::{quantile, CLIENT_ACTIVE, CLIENT_WAITING, SERVER_ACTIVE};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

fn s(v: impl ToString) -> Option<String> {
    Some(v.to_string())
}

fn ts(us: u64) -> Option<String> {
    if us == 0 {
        return None;
    }
    let secs = (us / 1_000_000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    Some(format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60))
}

/// Days since 1970-01-01 to a calendar date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn mode(app: &App) -> &'static str {
    match app.config().pool.mode {
        PoolMode::Transaction => "transaction",
        PoolMode::Session => "session",
    }
}

pub(super) fn table(app: &App, what: &str) -> Option<Table> {
    Some(match what {
        "POOLS" => pools(app),
        "STATS" => stats(app, false),
        "STATS_TOTALS" => stats(app, true),
        "SERVERS" => servers(app),
        "CLIENTS" => clients(app),
        "DATABASES" => databases(app),
        "LISTS" => lists(app),
        "CONFIG" => config(app),
        "VERSION" => {
            let mut t = Table::new(&[("version", TEXT)]);
            t.row(vec![s(format!("pgfleet {}", env!("CARGO_PKG_VERSION")))]);
            t
        }
        "REPLICAS" => replicas(app),
        "GROUPS" => groups(app),
        "WORKLOADS" => workloads(app),
        "LIMITS" => limits(app),
        _ => return None,
    })
}

/// One row per (database, user), summed over its backends.
fn pools(app: &App) -> Table {
    let mut t = Table::new(&[
        ("database", TEXT), ("user", TEXT), ("cl_active", INT4), ("cl_waiting", INT4),
        ("cl_active_cancel_req", INT4), ("cl_waiting_cancel_req", INT4), ("sv_active", INT4),
        ("sv_active_cancel", INT4), ("sv_being_canceled", INT4), ("sv_idle", INT4), ("sv_used", INT4),
        ("sv_tested", INT4), ("sv_login", INT4), ("maxwait", INT4), ("maxwait_us", INT4),
        ("pool_mode", TEXT), ("load_balance_hosts", TEXT),
    ]);
    #[derive(Default)]
    struct Row {
        cl_active: usize,
        cl_waiting: usize,
        sv_active: usize,
        sv_idle: usize,
        sv_login: usize,
        longest_wait: std::time::Duration,
    }
    let mut rows: BTreeMap<(String, String), Row> = BTreeMap::new();
    for p in app.pools() {
        let st = p.stats();
        let r = rows.entry((p.key.database.clone(), p.key.user.clone())).or_default();
        let active = app.conns.servers.lock().unwrap().values().filter(|i| i.database == p.key.database && i.user == p.key.user && i.backend == p.key.backend && i.state.load(Ordering::Relaxed) == SERVER_ACTIVE).count();
        r.sv_active += active;
        r.sv_idle += st.idle;
        r.sv_login += st.total.saturating_sub(st.idle + active);
        r.longest_wait = r.longest_wait.max(p.longest_wait());
    }
    let now = crate::stats::now_us();
    for c in app.conns.clients.lock().unwrap().values() {
        let r = rows.entry((c.database.clone(), c.user.clone())).or_default();
        match c.state.load(Ordering::Relaxed) {
            CLIENT_WAITING => {
                r.cl_waiting += 1;
                // Also a wait for RESUME or for admission, outside any pool's queue.
                let waited = now.saturating_sub(c.wait_since_us.load(Ordering::Relaxed));
                r.longest_wait = r.longest_wait.max(std::time::Duration::from_micros(waited));
            }
            // PgBouncer's cl_active: linked to a server connection, or idle
            // with no query waiting.
            _ => r.cl_active += 1,
        }
    }
    for ((db, user), r) in rows {
        let wait = r.longest_wait.as_micros() as u64;
        t.row(vec![
            s(db), s(user), s(r.cl_active), s(r.cl_waiting), s(0), s(0), s(r.sv_active), s(0), s(0),
            s(r.sv_idle), s(0), s(0), s(r.sv_login), s(wait / 1_000_000), s(wait % 1_000_000), s(mode(app)), None,
        ]);
    }
    t
}

fn stats(app: &App, totals: bool) -> Table {
    let mut per_db: BTreeMap<String, [u64; 11]> = BTreeMap::new();
    for p in app.pools() {
        let c = &p.counters;
        let v = per_db.entry(p.key.database.clone()).or_default();
        for (i, a) in [
            &c.server_assignments, &c.xacts, &c.queries, &c.received, &c.sent, &c.xact_us, &c.query_us,
            &c.wait_us, &c.client_parses, &c.server_parses, &c.binds,
        ]
        .iter()
        .enumerate()
        {
            v[i] += a.load(Ordering::Relaxed);
        }
    }
    let mut cols: Vec<(&'static str, u32)> = vec![("database", TEXT)];
    if totals {
        let tnames = [
            "server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent", "xact_time",
            "query_time", "wait_time", "client_parse_count", "server_parse_count", "bind_count",
        ];
        cols.extend(tnames.iter().map(|n| (*n, NUMERIC)));
    } else {
        const TOTAL: [&str; 11] = [
            "total_server_assignment_count", "total_xact_count", "total_query_count", "total_received", "total_sent",
            "total_xact_time", "total_query_time", "total_wait_time", "total_client_parse_count",
            "total_server_parse_count", "total_bind_count",
        ];
        const AVG: [&str; 11] = [
            "avg_server_assignment_count", "avg_xact_count", "avg_query_count", "avg_recv", "avg_sent",
            "avg_xact_time", "avg_query_time", "avg_wait_time", "avg_client_parse_count",
            "avg_server_parse_count", "avg_bind_count",
        ];
        cols.extend(TOTAL.iter().map(|n| (*n, NUMERIC)));
        cols.extend(AVG.iter().map(|n| (*n, NUMERIC)));
    }
    let mut t = Table { cols, rows: Vec::new() };
    let uptime = app.started.elapsed().as_secs().max(1);
    for (db, v) in per_db {
        let mut row = vec![s(db)];
        row.extend(v.iter().map(s));
        if !totals {
            // Averages per second since start (counts, bytes), and per
            // transaction / query / assignment for the times (µs).
            let per = |num: u64, den: u64| s(num.checked_div(den).unwrap_or(0));
            row.extend([
                per(v[0], uptime), per(v[1], uptime), per(v[2], uptime), per(v[3], uptime), per(v[4], uptime),
                per(v[5], v[1]), per(v[6], v[2]), per(v[7], v[0]), per(v[8], uptime), per(v[9], uptime), per(v[10], uptime),
            ]);
        }
        t.row(row);
    }
    t
}

const CONN_COLS: &[(&str, u32)] = &[
    ("type", TEXT), ("user", TEXT), ("database", TEXT), ("replication", TEXT), ("state", TEXT), ("addr", TEXT),
    ("port", INT4), ("local_addr", TEXT), ("local_port", INT4), ("connect_time", TEXT), ("request_time", TEXT),
    ("wait", INT4), ("wait_us", INT4), ("close_needed", INT4), ("ptr", TEXT), ("link", TEXT), ("remote_pid", INT4),
    ("tls", TEXT), ("application_name", TEXT), ("prepared_statements", INT4), ("id", INT4),
];

fn hex(id: u64) -> Option<String> {
    if id == 0 {
        None
    } else {
        s(format!("0x{id:x}"))
    }
}

fn servers(app: &App) -> Table {
    let mut t = Table::new(CONN_COLS);
    let mut list: Vec<_> = app.conns.servers.lock().unwrap().values().cloned().collect();
    list.sort_by_key(|i| i.id);
    for i in list {
        let active = i.state.load(Ordering::Relaxed) == SERVER_ACTIVE;
        t.row(vec![
            s("S"), s(&i.user), s(&i.database), s("none"), s(if active { "active" } else { "idle" }),
            s(i.addr.ip()), s(i.addr.port()), s(i.local.ip()), s(i.local.port()), ts(i.connect_time_us),
            ts(i.request_time_us.load(Ordering::Relaxed)), s(0), s(0), s(0), hex(i.id),
            hex(i.link.load(Ordering::Relaxed)), s(i.backend_pid), s(""), s(&i.backend), s(0), s(i.id),
        ]);
    }
    t
}

fn clients(app: &App) -> Table {
    let mut t = Table::new(CONN_COLS);
    let mut list: Vec<_> = app.conns.clients.lock().unwrap().values().cloned().collect();
    list.sort_by_key(|c| c.id);
    let now = crate::stats::now_us();
    for c in list {
        let st = c.state.load(Ordering::Relaxed);
        let (state, wait) = match st {
            CLIENT_ACTIVE => ("active", 0),
            CLIENT_WAITING => ("waiting", now.saturating_sub(c.wait_since_us.load(Ordering::Relaxed))),
            _ => ("idle", 0),
        };
        t.row(vec![
            s("C"), s(&c.user), s(&c.database), s("none"), s(state), s(client_addr(c.addr)), s(c.addr.port()),
            s(c.local.ip()), s(c.local.port()), ts(c.connect_time_us), ts(c.request_time_us.load(Ordering::Relaxed)),
            s(wait / 1_000_000), s(wait % 1_000_000), s(0), hex(c.id), hex(c.link.load(Ordering::Relaxed)),
            s(c.remote_pid.load(Ordering::Relaxed)), s(""), s(&c.application_name), s(0), s(c.id),
        ]);
    }
    t
}

fn databases(app: &App) -> Table {
    let cfg = app.config();
    let mut t = Table::new(&[
        ("name", TEXT), ("host", TEXT), ("port", INT4), ("database", TEXT), ("force_user", TEXT),
        ("pool_size", INT4), ("min_pool_size", INT4), ("reserve_pool_size", INT4), ("server_lifetime", INT4),
        ("pool_mode", TEXT), ("load_balance_hosts", TEXT), ("max_connections", INT4), ("current_connections", INT4),
        ("max_client_connections", INT4), ("current_client_connections", INT4), ("paused", INT4), ("disabled", INT4),
    ]);
    let (host, port) = cfg.cluster.primary.rsplit_once(':').unwrap_or((&cfg.cluster.primary, "5432"));
    let pools = app.pools();
    let clients = app.conns.clients.lock().unwrap().values().map(|c| c.database.clone()).collect::<Vec<_>>();
    for d in &cfg.databases {
        let current: usize = pools.iter().filter(|p| p.key.database == d.name).map(|p| p.stats().total).sum();
        let cl = clients.iter().filter(|c| **c == d.name).count();
        t.row(vec![
            s(&d.name), s(host), s(port), s(d.server_name()), None, s(cfg.pool.size), s(cfg.pool.min_size), s(0),
            s(cfg.pool.server_lifetime.0.as_secs()), s(mode(app)), None, s(0), s(current), s(0), s(cl),
            s(i32::from(app.is_paused(&d.name))), s(0),
        ]);
    }
    t
}

fn lists(app: &App) -> Table {
    let cfg = app.config();
    let pools = app.pools();
    let (clients, servers) = (app.conns.clients.lock().unwrap().len(), app.conns.servers.lock().unwrap().len());
    let mut t = Table::new(&[("list", TEXT), ("items", INT4)]);
    for (k, v) in [
        ("databases", cfg.databases.len()), ("users", cfg.users.len()), ("peers", 0), ("pools", pools.len()),
        ("peer_pools", 0), ("free_clients", 0), ("used_clients", clients), ("login_clients", 0),
        ("free_servers", 0), ("used_servers", servers), ("dns_names", 0), ("dns_zones", 0),
        ("dns_queries", 0), ("dns_pending", 0),
    ] {
        t.row(vec![s(k), s(v)]);
    }
    t
}

/// Settings, PgBouncer names first (the exporter reads max_client_conn),
/// then pgfleet's own keys. Never users or passwords.
fn config(app: &App) -> Table {
    let c = app.config();
    let d = crate::config::Config::default();
    let mut t = Table::new(&[("key", TEXT), ("value", TEXT), ("default", TEXT), ("changeable", TEXT)]);
    let secs = |x: crate::config::Dur| x.0.as_secs_f64().to_string();
    let rows: Vec<(&str, String, String, bool)> = vec![
        ("max_client_conn", c.listen.max_client_conn.to_string(), d.listen.max_client_conn.to_string(), true),
        ("max_user_connections", "0".into(), "0".into(), true),
        ("default_pool_size", c.pool.size.to_string(), d.pool.size.to_string(), true),
        ("min_pool_size", c.pool.min_size.to_string(), d.pool.min_size.to_string(), true),
        ("pool_mode", mode(app).into(), "transaction".into(), false),
        ("server_idle_timeout", secs(c.pool.server_idle_timeout), secs(d.pool.server_idle_timeout), true),
        ("server_lifetime", secs(c.pool.server_lifetime), secs(d.pool.server_lifetime), true),
        ("server_connect_timeout", secs(c.pool.connect_timeout), secs(d.pool.connect_timeout), true),
        ("query_wait_timeout", secs(c.pool.checkout_timeout), secs(d.pool.checkout_timeout), true),
        ("listen_addr", c.listen.addr.clone(), d.listen.addr.clone(), false),
        ("unix_socket_dir", c.listen.unix_socket_dir.clone().unwrap_or_default(), String::new(), false),
        ("unix_socket_mode", c.listen.unix_socket_mode.clone(), d.listen.unix_socket_mode.clone(), false),
        ("auth_type", format!("{:?}", c.auth.method).to_lowercase(), "scramsha256".into(), true),
        ("max_prepared_statements", c.pool.prepared_statements_cache.to_string(), d.pool.prepared_statements_cache.to_string(), true),
        ("cluster.primary", c.cluster.primary.clone(), d.cluster.primary.clone(), true),
        ("cluster.lag_check_interval", secs(c.cluster.lag_check_interval), secs(d.cluster.lag_check_interval), true),
        ("routing.read_write_split", c.routing.read_write_split.to_string(), d.routing.read_write_split.to_string(), true),
        ("routing.default_workload", c.routing.default_workload.clone(), d.routing.default_workload.clone(), true),
        ("routing.read_your_writes", format!("{:?}", c.routing.read_your_writes).to_lowercase(), "lsn".into(), true),
        ("pool.session_state", format!("{:?}", c.pool.session_state).to_lowercase(), "pin".into(), true),
    ];
    for (k, v, def, ch) in rows {
        t.row(vec![s(k), s(v), s(def), s(if ch { "yes" } else { "no" })]);
    }
    t
}

fn replicas(app: &App) -> Table {
    let topo = app.topology();
    let snap = topo.snapshot();
    let mut t = Table::new(&[
        ("replica", TEXT), ("addr", TEXT), ("groups", TEXT), ("state", TEXT), ("lag_bytes", NUMERIC),
        ("lag_ms", NUMERIC), ("in_flight", INT4), ("weight", INT4), ("last_check", TEXT), ("excluded_because", TEXT),
    ]);
    for (i, r) in topo.replicas.iter().enumerate() {
        let st = snap.replicas.get(i);
        let names: Vec<String> = r.groups.iter().map(|g| topo.groups[*g].name.clone()).collect();
        let state = match st {
            Some(x) if !x.reachable => "unreachable",
            Some(x) if x.groups.iter().all(|(_, ok)| *ok) => "usable",
            Some(x) if x.groups.iter().any(|(_, ok)| *ok) => "partly_excluded",
            _ => "excluded",
        };
        t.row(vec![
            s(&r.name), s(&r.addr), s(names.join(",")), s(state), s(st.map_or(0, |x| x.lag_bytes)),
            s(st.map_or(0, |x| x.lag.as_millis() as u64)), s(r.inflight.load(Ordering::Relaxed)), s(r.weight),
            ts(snap.checked_at_us), st.and_then(|x| x.excluded_because.clone()),
        ]);
    }
    t
}

fn groups(app: &App) -> Table {
    let topo = app.topology();
    let snap = topo.snapshot();
    let mut t = Table::new(&[
        ("group", TEXT), ("members", TEXT), ("usable", INT4), ("max_lag_ms", NUMERIC), ("max_lag_bytes", NUMERIC), ("fallback", TEXT),
    ]);
    for (gi, g) in topo.groups.iter().enumerate() {
        let members: Vec<&str> = g.members.iter().map(|m| topo.replicas[*m].name.as_str()).collect();
        let usable = g.members.iter().filter(|m| snap.replicas.get(**m).is_some_and(|r| r.usable_in(gi))).count();
        let fallback: Vec<String> = g
            .fallback
            .iter()
            .map(|f| match f {
                crate::router::route::Fallback::Primary => "primary".to_string(),
                crate::router::route::Fallback::Error => "error".to_string(),
                crate::router::route::Fallback::Group(x) => topo.groups[*x].name.clone(),
            })
            .collect();
        t.row(vec![
            s(&g.name), s(members.join(",")), s(usable), g.max_lag.map(|d| d.as_millis().to_string()),
            g.max_lag_bytes.map(|b| b.to_string()), s(fallback.join(",")),
        ]);
    }
    t
}

fn workloads(app: &App) -> Table {
    let mut t = Table::new(&[
        ("workload", TEXT), ("queries", NUMERIC), ("reads", NUMERIC), ("writes", NUMERIC), ("to_primary", NUMERIC),
        ("to_replica", NUMERIC), ("fallbacks", NUMERIC), ("refused", NUMERIC), ("p50_ms", TEXT), ("p99_ms", TEXT),
    ]);
    for (name, w) in app.workload_list() {
        let h = |route: &str| app.metrics.query_duration.with_label_values(&[&name, route]);
        let (p, r) = (h("primary"), h("replica"));
        let q = |x: f64| s(format!("{:.3}", quantile(&[&p, &r], x) * 1000.0));
        let l = |a: &std::sync::atomic::AtomicU64| s(a.load(Ordering::Relaxed));
        t.row(vec![
            s(if name.is_empty() { "(none)" } else { &name }), l(&w.queries), l(&w.reads), l(&w.writes), l(&w.to_primary),
            l(&w.to_replica), l(&w.fallbacks), l(&w.refused), q(0.5), q(0.99),
        ]);
    }
    t
}

/// `[[limits]]` rules with their live state.
fn limits(app: &App) -> Table {
    let mut t = Table::new(&[
        ("name", TEXT), ("max_in_flight", TEXT), ("rate", TEXT), ("burst", TEXT), ("max_wait_ms", NUMERIC),
        ("writes_only", TEXT), ("in_flight", NUMERIC), ("waiting", NUMERIC), ("admitted", NUMERIC), ("rejected", NUMERIC),
    ]);
    let opt = |v: Option<String>| s(v.unwrap_or_else(|| "-".into()));
    for l in &app.limits().rules {
        t.row(vec![
            s(&l.name),
            opt(l.rule.max_in_flight.map(|n| n.to_string())),
            opt(l.rule.rate.map(|r| r.to_string())),
            s(l.burst),
            s(l.max_wait().as_millis()),
            s(l.rule.writes_only),
            s(l.in_flight()),
            s(l.waiting.load(Ordering::Relaxed)),
            s(l.admitted.load(Ordering::Relaxed)),
            s(l.rejected.load(Ordering::Relaxed)),
        ]);
    }
    t
}

/// A client's address for SHOW CLIENTS: "unix" for Unix-socket clients (as
/// PgBouncer shows them).
fn client_addr(a: std::net::SocketAddr) -> String {
    if a.ip().is_unspecified() { "unix".into() } else { a.ip().to_string() }
}
