//! Cancel keys. Each client gets a random (pid, secret) from pgfleet; a
//! CancelRequest with that key cancels whatever the server connection
//! currently serving that client runs, and nothing else.

use crate::backend::ServerConn;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy)]
pub struct CancelTarget {
    pub peer: SocketAddr,
    pub pid: i32,
    pub secret: i32,
}

/// The server connection a client is bound to right now, if any.
#[derive(Default)]
pub struct CancelSlot {
    /// Guards the current target; set at bind, cleared at release.
    target: Mutex<Option<CancelTarget>>,
}

impl CancelSlot {
    pub fn set(&self, t: Option<CancelTarget>) {
        *self.target.lock().unwrap() = t;
    }

    pub fn get(&self) -> Option<CancelTarget> {
        *self.target.lock().unwrap()
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    /// Guards the key -> slot map; held only for insert/remove/lookup.
    slots: Mutex<HashMap<(i32, i32), Arc<CancelSlot>>>,
}

/// Removes the client's key when the client goes away.
pub struct CancelKey {
    pub pid: i32,
    pub secret: i32,
    pub slot: Arc<CancelSlot>,
    registry: Arc<CancelRegistry>,
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        self.registry
            .slots
            .lock()
            .unwrap()
            .remove(&(self.pid, self.secret));
    }
}

impl CancelRegistry {
    pub fn register(self: &Arc<Self>) -> CancelKey {
        let slot = Arc::new(CancelSlot::default());
        let mut slots = self.slots.lock().unwrap();
        loop {
            let key: (i32, i32) = (rand::random::<i32>() & 0x7fff_ffff, rand::random());
            if let std::collections::hash_map::Entry::Vacant(e) = slots.entry(key) {
                e.insert(slot.clone());
                return CancelKey {
                    pid: key.0,
                    secret: key.1,
                    slot,
                    registry: self.clone(),
                };
            }
        }
    }

    /// Forwards a cancel to the client's current server, if the key is known.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let target = {
            let slots = self.slots.lock().unwrap();
            slots.get(&(pid, secret)).and_then(|s| s.get())
        };
        match target {
            Some(t) => {
                tracing::info!(server = %t.peer, "forwarding cancel request");
                if let Err(e) = ServerConn::cancel(t.peer, t.pid, t.secret).await {
                    tracing::warn!(error = %e, "sending cancel request to server failed");
                }
            }
            None => tracing::debug!("cancel request with unknown key or idle client ignored"),
        }
    }
}
