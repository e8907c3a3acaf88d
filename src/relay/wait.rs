//! What the relay waits for: socket readiness, KILL and shutdown (the
//! client's `Signal`), and one timer for the proxy-enforced timeouts and
//! housekeeping.

use super::{Event, Session, SessionError, Timeout, COUT_HIGH, DRAIN_QUIET, SOUT_HIGH};
use crate::stats::{KILL, SHUTDOWN};
use std::time::{Duration, Instant};

/// An idle client's buffers are freed after this much quiet.
const FREE_BUFFERS_AFTER: Duration = Duration::from_secs(1);

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

    /// The earliest timed event in the current state: the drain's quiet
    /// period, freeing an idle client's buffers, a proxy-enforced timeout.
    fn next_deadline(&self, shutting_down: bool) -> Option<(Instant, Event)> {
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
            consider(self.last_client_activity + FREE_BUFFERS_AFTER, Event::Idle);
        }
        if let Some((at, kind)) = self.next_timeout() {
            consider(at, Event::Timeout(kind));
        }
        deadline
    }

    /// Waits for the next thing to do. Kept small on purpose: this future
    /// lives in every idle client's task, so each socket has one readiness
    /// future for both directions. The timer lives in the session and stays
    /// armed across waits: it is re-armed only when a deadline earlier than
    /// the armed one is needed (firing early just re-evaluates), so a busy
    /// client does not insert and remove a timer on every message.
    pub(super) async fn wait(&mut self, shutting_down: bool) -> Result<Event, SessionError> {
        use tokio::io::Interest;
        let interest = |read: bool, write: bool| match (read, write) {
            (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
            (true, false) => Some(Interest::READABLE),
            (false, true) => Some(Interest::WRITABLE),
            (false, false) => None,
        };
        let read_client = self.sout.len() < SOUT_HIGH || !self.has_complete_client_message();
        let client_interest = interest(read_client, !self.cout.is_empty());
        let server_interest = self.server.as_ref().and_then(|_| interest(self.cout.len() < COUT_HIGH, !self.sout.is_empty()));
        let due = self.next_deadline(shutting_down);
        if let Some((at, _)) = due {
            let at = tokio::time::Instant::from_std(at);
            match &mut self.timer {
                Some(t) if !t.is_elapsed() && t.deadline() <= at => {}
                Some(t) => t.as_mut().reset(at),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
        let (at, timer_event) = match due {
            Some((at, ev)) => (Some(tokio::time::Instant::from_std(at)), ev),
            None => (None, Event::Tick),
        };
        let client = &self.client;
        let server = self.server.as_ref().map(|s| &s.stream);
        let signal = &self.info.signal;
        let mask = if shutting_down { KILL } else { KILL | SHUTDOWN };
        let timer = self.timer.as_mut().filter(|_| at.is_some());
        let direction = |r: tokio::io::Ready, readable: Event| {
            if r.is_readable() || r.is_read_closed() || !(r.is_writable() || r.is_write_closed()) {
                readable
            } else {
                Event::Writable
            }
        };
        tokio::select! {
            // All branches are cancel-safe.
            r = client.ready(client_interest.unwrap_or(Interest::READABLE)), if client_interest.is_some() => {
                r.map(|r| direction(r, Event::ClientReadable)).map_err(|_| SessionError::ClientGone)
            }
            r = async { server.unwrap().ready(server_interest.unwrap()).await }, if server_interest.is_some() => {
                r.map(|r| direction(r, Event::ServerReadable)).map_err(|e| SessionError::ServerLost(e.to_string()))
            }
            raised = signal.raised(mask) => {
                if raised & KILL != 0 { Err(SessionError::Killed) } else { Ok(Event::Shutdown) }
            }
            fired_at = async { let t = timer.unwrap(); let at = t.deadline(); t.as_mut().await; at }, if at.is_some() => {
                // Fired at the wanted deadline: that event; earlier: look again.
                Ok(if Some(fired_at) >= at { timer_event } else { Event::Tick })
            }
        }
    }
}
