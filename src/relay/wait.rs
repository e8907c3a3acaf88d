//! What the relay waits for: socket readiness, shutdown, KILL, and one
//! timer for the proxy-enforced timeouts and housekeeping.

use super::{Event, Session, SessionError, Timeout, COUT_HIGH, DRAIN_QUIET, SOUT_HIGH};
use std::time::{Duration, Instant};

impl Session {
    /// The next proxy-enforced timeout, if one applies in the current state.
    fn next_timeout(&self) -> Option<(Instant, Timeout)> {
        let t = &self.cfg.timeouts;
        match &self.server {
            Some(_) if !self.expect.is_empty() => {
                let limit = t.query.enabled()?;
                (!self.cancel_sent).then_some(())?;
                Some((self.cycle_start? + limit, Timeout::Query))
            }
            Some(_) if matches!(self.status, b'T' | b'E') => {
                Some((self.last_client_activity + t.idle_in_transaction.enabled()?, Timeout::IdleInTransaction))
            }
            Some(_) => None,
            None => Some((self.last_client_activity + t.client_idle.enabled()?, Timeout::ClientIdle)),
        }
    }

    /// Waits for the next thing to do. Kept small on purpose: this future
    /// lives in every idle client's task, so each socket has one readiness
    /// future for both directions and all deadlines share one timer.
    pub(super) async fn wait(&self, shutting_down: bool) -> Result<Event, SessionError> {
        use tokio::io::Interest;
        let interest = |read: bool, write: bool| match (read, write) {
            (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
            (true, false) => Some(Interest::READABLE),
            (false, true) => Some(Interest::WRITABLE),
            (false, false) => None,
        };
        let read_client = self.sout.len() < SOUT_HIGH || !self.has_complete_client_message();
        let client_interest = interest(read_client, !self.cout.is_empty());
        let server = self.server.as_ref().map(|s| &s.stream);
        let server_interest = server.and_then(|_| interest(self.cout.len() < COUT_HIGH, !self.sout.is_empty()));
        // The earliest of: the drain's quiet period, freeing an idle
        // client's buffers after a second, a proxy-enforced timeout.
        let mut deadline: Option<(Instant, Event)> = None;
        let mut consider = |at: Instant, ev: Event| {
            if deadline.as_ref().is_none_or(|(d, _)| at < *d) {
                deadline = Some((at, ev));
            }
        };
        if shutting_down && self.drain_idle() {
            consider(self.last_client_activity + DRAIN_QUIET, Event::Tick);
        }
        if self.server.is_none() && self.holds_buffers() {
            consider(Instant::now() + Duration::from_secs(1), Event::Idle);
        }
        if let Some((at, kind)) = self.next_timeout() {
            consider(at, Event::Timeout(kind));
        }
        let (at, timer_event) = match deadline {
            Some((at, ev)) => (Some(at), ev),
            None => (None, Event::Tick),
        };
        let mut shutdown = self.shutdown.clone();
        let kill = &self.info.kill;
        let direction = |r: tokio::io::Ready, readable: Event| {
            if r.is_readable() || r.is_read_closed() || !(r.is_writable() || r.is_write_closed()) {
                readable
            } else {
                Event::Writable
            }
        };
        tokio::select! {
            // All branches are cancel-safe readiness waits.
            r = self.client.ready(client_interest.unwrap_or(Interest::READABLE)), if client_interest.is_some() => {
                r.map(|r| direction(r, Event::ClientReadable)).map_err(|_| SessionError::ClientGone)
            }
            r = async { server.unwrap().ready(server_interest.unwrap()).await }, if server_interest.is_some() => {
                r.map(|r| direction(r, Event::ServerReadable)).map_err(|e| SessionError::ServerLost(e.to_string()))
            }
            _ = shutdown.changed(), if !shutting_down => Ok(Event::Shutdown),
            _ = kill.notified() => Err(SessionError::Killed),
            _ = async { tokio::time::sleep_until(at.expect("guarded").into()).await }, if at.is_some() => Ok(timer_event),
        }
    }
}
