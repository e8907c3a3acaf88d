//! Named prepared statements in transaction mode. Clients name statements
//! however they like; pgfleet maps each distinct (query text + parameter
//! types) to one proxy statement (`_pgf_<id>`) shared by all clients, and
//! prepares it lazily on whichever server connection serves a client.

use crate::router::Analysis;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A proxy statement: the content a client parsed and the name it has on servers.
#[derive(Debug)]
pub struct Stmt {
    pub id: u64,
    pub server_name: Bytes,
    /// Parse body after the statement name: query text, parameter types.
    pub content: Bytes,
    /// Some server accepted this Parse once, so a later client's Parse of
    /// the same content can be answered without asking a server.
    pub validated: AtomicBool,
    /// Classification of the query text, computed once.
    pub analysis: Analysis,
}

/// How the names of pgfleet's shared statements begin on the servers.
const PREFIX_STR: &str = "_pgf_";
pub const PREFIX: &[u8] = PREFIX_STR.as_bytes();

pub fn server_name(id: u64) -> Bytes {
    Bytes::from(format!("{PREFIX_STR}{id}"))
}

/// The id in a server name `server_name` made.
pub fn server_id(name: &str) -> Option<u64> {
    name.strip_prefix(PREFIX_STR)?.parse().ok()
}

/// Deduplicates statements across all clients of one pgfleet.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    /// Guards the maps; held only for a lookup/insert (or a sweep).
    maps: Mutex<Maps>,
}

/// At this many statements (or twice as many as the last sweep kept), the
/// ones no client holds any more are forgotten.
const SWEEP_AT_LEAST: usize = 10_000;

#[derive(Default)]
struct Maps {
    /// Per database, per `search_path`, two content maps. The same text is
    /// another statement in another database (it was validated there, not
    /// here) and under another `search_path` (it names other tables: on one
    /// server connection, clients of two schemas would share a plan and
    /// get "cached plan must not change result type"). And it means
    /// something else to a session with `standard_conforming_strings =
    /// off` (its classification, and how a server parses it), so such
    /// sessions share statements only among themselves.
    spaces: HashMap<String, HashMap<String, [HashMap<Bytes, Arc<Stmt>>; 2]>>,
    total: usize,
    sweep_at: usize,
}

impl Maps {
    /// Forgets the statements only the registry holds (no client has them
    /// any more: their names are gone). Server connections that still have
    /// one prepared keep it until their LRU evicts it; the same text again
    /// becomes a new statement.
    fn sweep(&mut self) {
        for paths in self.spaces.values_mut() {
            for maps in paths.values_mut() {
                for m in maps.iter_mut() {
                    m.retain(|_, s| Arc::strong_count(s) > 1);
                }
            }
            paths.retain(|_, maps| maps.iter().any(|m| !m.is_empty()));
        }
        self.spaces.retain(|_, paths| !paths.is_empty());
        self.total = self.spaces.values().flat_map(|p| p.values()).flat_map(|m| m.iter()).map(HashMap::len).sum();
        self.sweep_at = (self.total * 2).max(SWEEP_AT_LEAST);
    }
}

impl Registry {
    /// The shared statement for `content` in `database` under `search_path`;
    /// `analyze` classifies new ones.
    pub fn intern(
        &self,
        database: &str,
        search_path: &str,
        content: &[u8],
        backslash_strings: bool,
        analyze: impl FnOnce(&[u8]) -> Analysis,
    ) -> Arc<Stmt> {
        let mut maps = self.maps.lock().unwrap();
        let found = maps.spaces.get(database).and_then(|p| p.get(search_path)).and_then(|m| m[usize::from(backslash_strings)].get(content));
        if let Some(s) = found {
            return s.clone();
        }
        if maps.total >= maps.sweep_at.max(SWEEP_AT_LEAST) {
            maps.sweep();
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let content = Bytes::copy_from_slice(content);
        let stmt = Arc::new(Stmt { id, server_name: server_name(id), content: content.clone(),
            validated: AtomicBool::new(false),
            analysis: analyze(&content),
        });
        let paths = maps.spaces.entry(database.to_string()).or_default();
        paths.entry(search_path.to_string()).or_default()[usize::from(backslash_strings)].insert(content, stmt.clone());
        maps.total += 1;
        stmt
    }

    /// Forgets `stmt`'s text: the same text again becomes a new statement
    /// (with a new server name). Clients that hold `stmt` keep it.
    pub fn retire(&self, stmt: &Stmt) {
        let mut maps = self.maps.lock().unwrap();
        let mut removed = 0;
        for m in maps.spaces.values_mut().flat_map(|p| p.values_mut()).flat_map(|m| m.iter_mut()) {
            if m.get(&stmt.content).is_some_and(|s| s.id == stmt.id) {
                m.remove(&stmt.content);
                removed += 1;
            }
        }
        maps.total -= removed;
    }

    pub fn len(&self) -> usize {
        self.maps.lock().unwrap().total
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intern(r: &Registry, sql: &[u8], backslash: bool) -> Arc<Stmt> {
        r.intern("app", "", sql, backslash, |_| Analysis::default())
    }

    #[test]
    fn identical_content_shares_one_statement() {
        let r = Registry::default();
        let a = intern(&r, b"select 1\0\0\0", false);
        let b = intern(&r, b"select 1\0\0\0", false);
        let c = intern(&r, b"select 2\0\0\0", false);
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_eq!(&a.server_name[..], format!("_pgf_{}", a.id).as_bytes());
        assert_eq!(r.len(), 2);
        // Sessions with standard_conforming_strings off share among themselves only.
        let d = intern(&r, b"select 1\0\0\0", true);
        assert_ne!(a.id, d.id);
        assert_eq!(intern(&r, b"select 1\0\0\0", true).id, d.id);
        // Another database, another search_path: another statement.
        assert_ne!(r.intern("other", "", b"select 1\0\0\0", false, |_| Analysis::default()).id, a.id);
        let t1 = r.intern("app", "tenant1", b"select 1\0\0\0", false, |_| Analysis::default());
        assert_ne!(t1.id, a.id);
        assert_eq!(r.intern("app", "tenant1", b"select 1\0\0\0", false, |_| Analysis::default()).id, t1.id);
    }

    #[test]
    fn a_retired_statement_is_not_shared_again() {
        let r = Registry::default();
        let old = intern(&r, b"select * from t\0\0\0", false);
        let other = intern(&r, b"select 2\0\0\0", false);
        r.retire(&old);
        let new = intern(&r, b"select * from t\0\0\0", false);
        assert_ne!(new.id, old.id);
        assert_eq!(intern(&r, b"select * from t\0\0\0", false).id, new.id);
        assert_eq!(intern(&r, b"select 2\0\0\0", false).id, other.id);
        assert_eq!(r.len(), 2);
        // Retired again (another client's error on the old one): the new one stays.
        r.retire(&old);
        assert_eq!(intern(&r, b"select * from t\0\0\0", false).id, new.id);
    }

    #[test]
    fn statements_no_client_holds_are_forgotten_past_the_threshold() {
        let r = Registry::default();
        let kept = intern(&r, b"select 'kept'\0\0\0", false);
        for i in 0..SWEEP_AT_LEAST * 3 {
            intern(&r, format!("select {i}\0\0\0").as_bytes(), false);
        }
        // Bounded (swept whenever it reached the threshold), and a statement
        // a client holds is the same statement still.
        assert!(r.len() <= SWEEP_AT_LEAST + 1, "{}", r.len());
        assert_eq!(intern(&r, b"select 'kept'\0\0\0", false).id, kept.id);
    }
}
