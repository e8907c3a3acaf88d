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

/// The server connection a client is bound to right now, if any, and how
/// many cancels for it are on their way.
#[derive(Default)]
pub struct CancelSlot {
    /// Guards (current target, cancels in flight, a cancel of the current
    /// target that the server never acknowledged); set at bind, cleared at
    /// release.
    state: Mutex<(Option<CancelTarget>, u32, bool)>,
}

impl CancelSlot {
    pub fn set(&self, t: CancelTarget) {
        self.state.lock().unwrap().0 = Some(t);
    }

    /// The client leaves its connection. True when a cancel for it may
    /// still land: the connection must then not serve anyone else (the
    /// cancel would stop their query), as PgBouncer keeps a server that is
    /// being cancelled out of the pool.
    pub fn release(&self) -> bool {
        let mut s = self.state.lock().unwrap();
        s.0 = None;
        s.1 > 0 || std::mem::take(&mut s.2)
    }

    /// The current target, counted as being cancelled until the returned
    /// guard is dropped (after the server acknowledged the cancel).
    pub fn begin_cancel(self: &Arc<Self>) -> Option<(CancelTarget, CancelInFlight)> {
        let mut s = self.state.lock().unwrap();
        let t = s.0?;
        s.1 += 1;
        Some((t, CancelInFlight(self.clone())))
    }
}

/// A cancel on its way to a server (see `CancelSlot::begin_cancel`).
pub struct CancelInFlight(Arc<CancelSlot>);

impl CancelInFlight {
    /// The server did not acknowledge the cancel of `t`: it may still land
    /// later, so if the client is still on that connection, the connection
    /// must not serve anyone else after it (see `release`).
    pub fn unacknowledged(&self, t: CancelTarget) {
        let mut s = self.0.state.lock().unwrap();
        if s.0.is_some_and(|c| c.pid == t.pid && c.peer == t.peer) {
            s.2 = true;
        }
    }
}

impl Drop for CancelInFlight {
    fn drop(&mut self) {
        self.0.state.lock().unwrap().1 -= 1;
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
        self.registry.slots.lock().unwrap().remove(&(self.pid, self.secret));
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
                return CancelKey { pid: key.0, secret: key.1, slot, registry: self.clone() };
            }
        }
    }

    /// Forwards a cancel to the client's current server, if the key is
    /// known; returns once it is sent (the wait for the server to act on
    /// it goes on in a task of its own, which keeps it counted in flight).
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let target = {
            let slots = self.slots.lock().unwrap();
            slots.get(&(pid, secret)).and_then(|s| s.begin_cancel())
        };
        match target {
            Some((t, in_flight)) => {
                tracing::info!(server = %t.peer, "forwarding cancel request");
                match ServerConn::send_cancel(t.peer, t.pid, t.secret).await {
                    Ok(s) => {
                        tokio::spawn(async move {
                            if !ServerConn::cancel_acknowledged(s).await {
                                in_flight.unacknowledged(t);
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "sending cancel request to server failed"),
                }
            }
            None => tracing::debug!("cancel request with unknown key or idle client ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_released_while_a_cancel_is_on_its_way_is_not_reused() {
        let slot = Arc::new(CancelSlot::default());
        let t = CancelTarget {
            peer: "127.0.0.1:5432".parse().unwrap(),
            pid: 7,
            secret: 9,
        };
        assert!(
            slot.begin_cancel().is_none(),
            "nothing bound: nothing to cancel"
        );
        slot.set(t);
        assert!(!slot.release(), "no cancel: reusable");
        slot.set(t);
        let (got, in_flight) = slot.begin_cancel().unwrap();
        assert_eq!((got.pid, got.secret), (7, 9));
        assert!(slot.release(), "released while the cancel is in flight");
        assert!(
            slot.begin_cancel().is_none(),
            "released: a later cancel reaches nothing"
        );
        drop(in_flight);
        slot.set(t);
        assert!(
            !slot.release(),
            "the cancel was acknowledged before this release"
        );
    }

    #[test]
    fn a_cancel_the_server_never_acknowledged_keeps_the_connection_from_others() {
        let slot = Arc::new(CancelSlot::default());
        let t = CancelTarget { peer: "127.0.0.1:5432".parse().unwrap(), pid: 7, secret: 9 };
        slot.set(t);
        let (_, in_flight) = slot.begin_cancel().unwrap();
        // No acknowledgement in time; the client is still on the connection
        // (its query ended anyway) when the wait gives up.
        in_flight.unacknowledged(t);
        drop(in_flight);
        assert!(slot.release(), "the cancel may still land: not reused");
        slot.set(t);
        assert!(!slot.release(), "only that once");
        // Given up after the client had left: its next connection is not
        // affected.
        slot.set(t);
        let (_, in_flight) = slot.begin_cancel().unwrap();
        assert!(slot.release());
        in_flight.unacknowledged(t);
        drop(in_flight);
        slot.set(CancelTarget { pid: 8, ..t });
        assert!(!slot.release());
    }
}
