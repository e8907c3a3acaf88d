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
pub const PREFIX: &[u8] = b"_pgf_";

pub fn server_name(id: u64) -> Bytes {
    Bytes::from(format!("_pgf_{id}"))
}

/// Deduplicates statements across all clients of one pgfleet.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    /// Guards the content -> statement maps; held only for a lookup/insert.
    /// Two maps: the same text means something else to a session with
    /// `standard_conforming_strings = off` (its classification, and how a
    /// server parses it), so such sessions share statements only among
    /// themselves.
    by_content: Mutex<[HashMap<Bytes, Arc<Stmt>>; 2]>,
}

impl Registry {
    /// The shared statement for `content`; `analyze` classifies new ones.
    pub fn intern(&self, content: &[u8], backslash_strings: bool, analyze: impl FnOnce(&[u8]) -> Analysis) -> Arc<Stmt> {
        let mut maps = self.by_content.lock().unwrap();
        let map = &mut maps[usize::from(backslash_strings)];
        if let Some(s) = map.get(content) {
            return s.clone();
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let content = Bytes::copy_from_slice(content);
        let stmt = Arc::new(Stmt { id, server_name: server_name(id), content: content.clone(),
            validated: AtomicBool::new(false),
            analysis: analyze(&content),
        });
        map.insert(content, stmt.clone());
        stmt
    }

    pub fn len(&self) -> usize {
        self.by_content.lock().unwrap().iter().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_content_shares_one_statement() {
        let r = Registry::default();
        let a = r.intern(b"select 1\0\0\0", false, |_| Analysis::default());
        let b = r.intern(b"select 1\0\0\0", false, |_| Analysis::default());
        let c = r.intern(b"select 2\0\0\0", false, |_| Analysis::default());
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_eq!(&a.server_name[..], format!("_pgf_{}", a.id).as_bytes());
        assert_eq!(r.len(), 2);
        // Sessions with standard_conforming_strings off share among themselves only.
        let d = r.intern(b"select 1\0\0\0", true, |_| Analysis::default());
        assert_ne!(a.id, d.id);
        assert_eq!(r.intern(b"select 1\0\0\0", true, |_| Analysis::default()).id, d.id);
    }
}
