//! The function catalog: which of a database's own functions are VOLATILE,
//! read from `pg_proc` on the writer. PostgreSQL does not let a STABLE or
//! IMMUTABLE function write, so a SELECT is a read only if every function
//! it calls is either built in (the classifier knows the writing built-ins)
//! or not VOLATILE. `CREATE FUNCTION` makes a function VOLATILE unless it
//! says otherwise, so an application's writing function (`SELECT
//! create_order(42)`) is caught without configuration.
//!
//! Loaded per database on first need, refreshed every
//! `routing.function_catalog_refresh`, and at once after a client changes
//! functions through pgfleet (`CREATE/ALTER/DROP FUNCTION`, extensions).
//! Until a database's catalog is loaded, reads that call functions go to
//! the primary (not sure: primary).

use crate::app::App;
use crate::router::classify::name_hash;
use crate::router::settings::custom_settings_in;
use crate::router::route::Calls;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// After a failed load, how long until the next attempt.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// A function's code: `prosrc`, or for a SQL-standard body (`BEGIN
/// ATOMIC`, `RETURN`), which leaves it empty, the definition.
macro_rules! function_code {
    () => {
        "(CASE WHEN p.prosrc = '' THEN pg_catalog.pg_get_functiondef(p.oid) ELSE p.prosrc END)"
    };
}

/// VOLATILE functions of the database's own schemas (built-ins, which the
/// classifier already knows, and trigger functions, which a query cannot
/// call, are left out), and those of any volatility whose code calls
/// `set_config` or takes advisory locks: PostgreSQL lets a STABLE function
/// do both (only data changes are refused), and either would stay on the
/// server connection.
pub const VOLATILE_SQL: &str = concat!(
    "SELECT DISTINCT p.proname::text FROM pg_catalog.pg_proc p \
     JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
     WHERE (p.provolatile = 'v' OR ",
    function_code!(),
    " ~* 'set_config|advisory') AND p.prokind <> 'p' \
     AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND p.prorettype NOT IN ('pg_catalog.trigger'::pg_catalog.regtype, 'pg_catalog.event_trigger'::pg_catalog.regtype)"
);

/// The source of the database's own functions that may set a custom
/// setting for the session (searched by `custom_settings_in`).
pub const SETTING_CODE_SQL: &str = concat!(
    "SELECT s.src FROM (SELECT ",
    function_code!(),
    " AS src FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')) s \
     WHERE s.src ~* 'set_config|\\mset\\s+(session\\s+)?[a-z_][a-z0-9_$]*\\.'"
);

/// What a load found.
#[derive(Debug, Default)]
pub struct Functions {
    /// Hashes of the VOLATILE function names.
    pub volatile: HashSet<u32>,
    /// Custom settings (`app.tenant`) the functions' code sets.
    pub settings: Vec<String>,
}

impl From<HashSet<u32>> for Functions {
    fn from(volatile: HashSet<u32>) -> Self {
        Functions { volatile, settings: Vec::new() }
    }
}

#[derive(Default)]
struct Entry {
    last: Option<Loaded>,
    loading: bool,
    failed_at: Option<Instant>,
    /// Bumped by each invalidation: a load started before it is not trusted.
    generation: u64,
}

/// The result of the last successful load.
struct Loaded {
    /// Hashes of the VOLATILE function names.
    volatile: HashSet<u32>,
    settings: Arc<[String]>,
    /// The entry's generation when the load started.
    generation: u64,
    at: Instant,
}

impl Entry {
    /// The VOLATILE names, unless a change made through pgfleet came since.
    fn trusted(&self) -> Option<&Loaded> {
        self.last.as_ref().filter(|l| l.generation == self.generation)
    }

    fn start(&mut self, database: &str) -> Load {
        self.loading = true;
        Load { database: database.to_string(), generation: self.generation }
    }
}

/// A load the caller must start: `Catalogs::finish` takes its result.
#[derive(Debug, PartialEq, Eq)]
pub struct Load {
    pub database: String,
    generation: u64,
}

#[derive(Default)]
pub struct Catalogs {
    entries: Mutex<HashMap<String, Entry>>,
}

impl Catalogs {
    /// What the catalog of `database` says of these calls (name hashes),
    /// and a load to start when it is missing, stale or due a refresh.
    pub fn verdict(&self, database: &str, calls: &[u32], refresh: Duration, now: Instant) -> (Calls, Option<Load>) {
        let mut map = self.entries.lock().unwrap();
        if !map.contains_key(database) {
            map.insert(database.to_string(), Entry::default());
        }
        let e = map.get_mut(database).expect("inserted above");
        let due = match (e.trusted(), e.failed_at) {
            _ if e.loading => false,
            (_, Some(f)) if now.saturating_duration_since(f) < RETRY_AFTER => false,
            (Some(l), _) => now.saturating_duration_since(l.at) >= refresh,
            (None, _) => true,
        };
        let verdict = match e.trusted() {
            Some(l) if calls.iter().any(|h| l.volatile.contains(h)) => Calls::Volatile,
            Some(_) => Calls::Safe,
            None => Calls::Unknown,
        };
        (verdict, due.then(|| e.start(database)))
    }

    /// A load ended: the VOLATILE function names (hashed), or why it
    /// failed. Returns the next load when the functions changed meanwhile.
    pub fn finish(&self, load: Load, result: Result<Functions, String>, now: Instant) -> Option<Load> {
        let mut map = self.entries.lock().unwrap();
        let e = map.entry(load.database.clone()).or_default();
        e.loading = false;
        match result {
            Ok(f) => {
                tracing::info!(database = %load.database, volatile_functions = f.volatile.len(), custom_settings = f.settings.len(), "function catalog loaded");
                e.last = Some(Loaded { volatile: f.volatile, settings: f.settings.into(), generation: load.generation, at: now });
                e.failed_at = None;
                (e.generation != load.generation).then(|| e.start(&load.database))
            }
            Err(why) => {
                tracing::warn!(database = %load.database, error = %why,
                    "loading the function catalog failed: reads that call functions go to the primary until it loads");
                e.failed_at = Some(now);
                None
            }
        }
    }

    /// Every catalog is distrusted (the configuration that filters them
    /// changed): each reloads on its next use.
    pub fn invalidate_all(&self) {
        for e in self.entries.lock().unwrap().values_mut() {
            e.generation += 1;
        }
    }

    /// The custom settings `database`'s functions set (the last load's).
    pub fn setting_names(&self, database: &str) -> Option<Arc<[String]>> {
        self.entries.lock().unwrap().get(database)?.last.as_ref().map(|l| l.settings.clone())
    }

    /// Whether `database`'s catalog is loaded and trusted.
    pub fn is_loaded(&self, database: &str) -> bool {
        self.entries.lock().unwrap().get(database).is_some_and(|e| e.trusted().is_some())
    }

    /// Functions of `database` changed: distrust its catalog until
    /// reloaded; the reload to start now, unless one is running (it will
    /// be followed by another).
    pub fn invalidate(&self, database: &str) -> Option<Load> {
        let mut map = self.entries.lock().unwrap();
        let e = map.get_mut(database)?;
        e.failed_at = None;
        e.generation += 1;
        (!e.loading).then(|| e.start(database))
    }
}

/// The catalogs as the rest of pgfleet uses them: loads are started here.
impl App {
    /// Routing on: loads every configured database's function catalog
    /// now, so that the first reads calling functions need not wait for it
    /// on the primary.
    pub fn preload_catalogs(self: &Arc<Self>) {
        let cfg = self.config();
        // Used by routing, and by transaction pooling's settings check.
        let routes = !self.topology().groups.is_empty() && cfg.routing.read_write_split;
        if !routes && cfg.pool.mode != crate::config::PoolMode::Transaction {
            return;
        }
        for db in &cfg.databases {
            self.function_verdict(&db.name, &[], cfg.routing.function_catalog_refresh.0, Instant::now());
        }
    }

    /// `Catalogs::verdict`, starting the load it asks for; `Safe` when the
    /// lookup is off (`refresh` 0).
    pub fn function_verdict(self: &Arc<Self>, database: &str, calls: &[u32], refresh: Duration, now: Instant) -> Calls {
        if refresh.is_zero() {
            return Calls::Safe;
        }
        let (verdict, load) = self.catalogs.verdict(database, calls, refresh, now);
        if let Some(load) = load {
            self.load_catalog(load);
        }
        verdict
    }

    /// A transaction that changed `database`'s functions ended.
    pub fn functions_changed(self: &Arc<Self>, database: &str) {
        if let Some(load) = self.catalogs.invalidate(database) {
            self.load_catalog(load);
        }
    }

    /// Loads a database's function catalog in the background (as the
    /// monitor's user, from the writer), bounded in time.
    fn load_catalog(self: &Arc<Self>, load: Load) {
        let app = self.clone();
        // On the control thread (see app::control), with its own connections.
        self.control().spawn(async move {
            let mut next = Some(load);
            while let Some(load) = next {
                // In a task of its own: a panic while reading (a bug, odd
                // data) must still end the load, or the catalog would stay
                // "loading" and never be read again.
                let reader = app.clone();
                let database = load.database.clone();
                let mut read = tokio::spawn(async move { reader.read_catalog(&database).await });
                let result = match tokio::time::timeout(Duration::from_secs(10), &mut read).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => Err(format!("the catalog reader failed: {e}")),
                    Err(_) => {
                        read.abort();
                        Err("timed out".into())
                    }
                };
                next = app.catalogs.finish(load, result, Instant::now());
            }
        });
    }

    async fn read_catalog(&self, database: &str) -> Result<Functions, String> {
        let cfg = self.config();
        let spec = self.monitor_spec().ok_or("no user with a server password to read it as (cluster.health_user)")?;
        let dbname = cfg.database(database).map_or(database, |d| d.server_name());
        let topo = self.topology();
        let addr = topo.writer_addr().ok_or("no primary")?;
        let client = crate::topology::connect_as(&spec, addr, dbname, "pgfleet-catalog").await?;
        let rows = client.query(VOLATILE_SQL, &[]).await.map_err(|e| e.to_string())?;
        // Decoded with try_get: a name that is not UTF-8 (an SQL_ASCII
        // database) fails the load (reads that call functions then go to the
        // primary, and the load is retried later) instead of panicking the
        // loader, which left the catalog "loading" for good.
        let names = rows.iter().map(|r| r.try_get::<_, String>(0)).collect::<Result<Vec<_>, _>>().map_err(|e| format!("a function name: {e}"))?;
        let volatile = volatile_set(names, &cfg.routing.read_functions);
        let mut settings = Vec::new();
        for row in client.query(SETTING_CODE_SQL, &[]).await.map_err(|e| e.to_string())? {
            // Code that is not UTF-8 is skipped: only the custom settings it
            // may set are looked for.
            custom_settings_in(row.try_get::<_, Option<&str>>(0).ok().flatten().unwrap_or(""), &mut settings);
        }
        Ok(Functions { volatile, settings })
    }
}

/// The hashed names of a load's rows, less the functions configured as
/// reads (`routing.read_functions`, optionally schema-qualified).
pub fn volatile_set(names: impl IntoIterator<Item = String>, read_functions: &[String]) -> HashSet<u32> {
    // Folded (as an unquoted name) and exact (a mixed-case quoted one).
    let reads: HashSet<u32> = read_functions
        .iter()
        .map(|f| f.rsplit('.').next().unwrap_or(f).as_bytes())
        .flat_map(|n| [name_hash(n, true), name_hash(n, false)])
        .collect();
    names.into_iter().map(|n| name_hash(n.as_bytes(), false)).filter(|h| !reads.contains(h)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: &str) -> u32 {
        name_hash(n.as_bytes(), false)
    }

    #[test]
    fn unknown_until_loaded_then_exact() {
        let c = Catalogs::default();
        let t0 = Instant::now();
        let refresh = Duration::from_secs(30);
        let (v, load) = c.verdict("app", &[h("f")], refresh, t0);
        assert_eq!(v, Calls::Unknown);
        let load = load.expect("first use loads");
        // One load at a time.
        assert_eq!(c.verdict("app", &[h("f")], refresh, t0), (Calls::Unknown, None));
        c.finish(load, Ok(volatile_set(["f".to_string()], &[]).into()), t0);
        assert_eq!(c.verdict("app", &[h("g"), h("f")], refresh, t0), (Calls::Volatile, None));
        assert_eq!(c.verdict("app", &[h("g")], refresh, t0), (Calls::Safe, None));
        // Other databases have catalogs of their own.
        assert_eq!(c.verdict("other", &[h("g")], refresh, t0).0, Calls::Unknown);
        // Due a refresh: the old catalog answers meanwhile.
        let later = t0 + refresh;
        let (v, load) = c.verdict("app", &[h("f")], refresh, later);
        assert_eq!(v, Calls::Volatile);
        assert!(load.is_some());
    }

    #[test]
    fn invalidation_distrusts_until_a_later_load() {
        let c = Catalogs::default();
        let t0 = Instant::now();
        let refresh = Duration::from_secs(30);
        let load = c.verdict("app", &[], refresh, t0).1.unwrap();
        c.finish(load, Ok(HashSet::new().into()), t0);
        assert_eq!(c.verdict("app", &[h("f")], refresh, t0), (Calls::Safe, None));
        let first = c.invalidate("app").expect("reloads at once");
        assert_eq!(c.verdict("app", &[h("f")], refresh, t0), (Calls::Unknown, None));
        // Invalidated again while that load runs: its result may predate
        // the change, so the catalog stays distrusted and loads again.
        assert_eq!(c.invalidate("app"), None);
        let second = c.finish(first, Ok(HashSet::new().into()), t0).expect("loads again");
        assert_eq!(c.verdict("app", &[h("f")], refresh, t0), (Calls::Unknown, None));
        assert_eq!(c.finish(second, Ok(volatile_set(["f".into()], &[]).into()), t0), None);
        assert_eq!(c.verdict("app", &[h("f")], refresh, t0).0, Calls::Volatile);
        // A reload after a change that fails waits before the next attempt
        // (not one connection attempt per read).
        let load = c.invalidate("app").unwrap();
        assert_eq!(c.finish(load, Err("no primary".into()), t0), None);
        assert_eq!(c.verdict("app", &[h("f")], refresh, t0), (Calls::Unknown, None));
        assert!(c.verdict("app", &[h("f")], refresh, t0 + RETRY_AFTER).1.is_some());
    }

    #[test]
    fn failures_retry_after_a_pause_and_read_functions_are_exempt() {
        let c = Catalogs::default();
        let t0 = Instant::now();
        let refresh = Duration::from_secs(30);
        let load = c.verdict("app", &[], refresh, t0).1.unwrap();
        c.finish(load, Err("connection refused".into()), t0);
        assert_eq!(c.verdict("app", &[h("f")], refresh, t0), (Calls::Unknown, None));
        let load = c.verdict("app", &[h("f")], refresh, t0 + RETRY_AFTER).1.expect("retried");
        c.finish(load, Ok(volatile_set(["f".into(), "uuid_generate_v4".into()], &["public.uuid_generate_v4".into()]).into()), t0);
        assert_eq!(c.verdict("app", &[h("uuid_generate_v4")], refresh, t0).0, Calls::Safe);
        assert_eq!(c.verdict("app", &[h("f")], refresh, t0).0, Calls::Volatile);
    }

    #[test]
    fn custom_settings_set_by_code() {
        let mut out = Vec::new();
        custom_settings_in(
            "BEGIN PERFORM set_config('App.Tenant', t, false); SET session my.role = 'x'; \
             SET LOCAL tx.only = 1; SET search_path = a; UPDATE t SET a = 1; \
             SELECT pg_catalog.set_config( 'x.y.z' , '1', false), set_config(name, v, false), \
             reset_config('no.pe', 1), set_config('bad.', 1), set_config('1a.b', 1); END",
            &mut out,
        );
        assert_eq!(out, ["app.tenant", "my.role", "x.y.z"]);
        custom_settings_in("select set_config('app.tenant', '1', false)", &mut out);
        assert_eq!(out.len(), 3, "no duplicates");
    }
}
