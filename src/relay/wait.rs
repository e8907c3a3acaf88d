//! The relay's socket I/O, and what it waits for: socket readiness, KILL
//! and shutdown (the client's `Signal`), and one timer for the
//! proxy-enforced timeouts and housekeeping.

use super::{Event, Session, SessionError, Timeout, CIN_HIGH, COUT_HIGH, DRAIN_QUIET, READ_CHUNK, SOUT_HIGH};
use crate::backend::consume;
use crate::wire;
use crate::stats::{KILL, REMOVED, SHUTDOWN};
use crate::net::Stream;
use std::future::Future;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// An idle client's buffers are freed after this much quiet.
const FREE_BUFFERS_AFTER: Duration = Duration::from_secs(1);

impl Session {
    pub(super) fn holds_buffers(&self) -> bool {
        self.cin.capacity() + self.sin.capacity() + self.cout.capacity() + self.sout.capacity() > 0
    }

    pub(super) fn has_complete_client_message(&self) -> bool {
        matches!(wire::peek_header(&self.cin, self.max_msg), Ok(Some(h)) if self.cin.len() >= h.total)
    }

    pub(super) fn read_client(&mut self) -> Result<(), SessionError> {
        match self.client.read_some(&mut self.cin, READ_CHUNK) {
            Ok(0) => Err(SessionError::ClientGone),
            Ok(_) => {
                self.last_client_activity = self.now;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(_) => Err(SessionError::ClientGone),
        }
    }

    pub(super) fn read_server(&mut self) -> Result<(), SessionError> {
        let server = self.server.as_ref().expect("readable only when bound");
        match server.stream.read_some(&mut self.sin, READ_CHUNK) {
            Ok(0) => Err(SessionError::ServerLost("server closed the connection".into())),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(SessionError::ServerLost(e.to_string())),
        }
    }

    /// Writes as much buffered output as the sockets take without blocking.
    pub(super) fn flush(&mut self) -> Result<(), SessionError> {
        while !self.cout.is_empty() {
            match self.client.try_write(&self.cout) {
                Ok(n) => consume(&mut self.cout, n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return Err(SessionError::ClientGone),
            }
        }
        if let Some(server) = &self.server {
            while !self.sout.is_empty() {
                match server.stream.try_write(&self.sout) {
                    Ok(n) => consume(&mut self.sout, n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(SessionError::ServerLost(e.to_string())),
                }
            }
        }
        Ok(())
    }

    /// Nothing under way: no transaction, nothing sent or to send (a
    /// pinned or session-mode connection may be held; the session's end
    /// resets it). A drain or a removal may end such a session.
    fn quiet(&self) -> bool {
        self.cin.is_empty() && self.cout.is_empty() && (self.server.is_none() || self.between_transactions())
    }

    /// Ends the session once it is quiet and idle while pgfleet shuts down
    /// (57P01) or after a reload removed its database or user.
    pub(super) fn end_if_drained(&mut self, shutting_down: bool) -> Result<(), SessionError> {
        if !(shutting_down || self.removing) || self.now.saturating_duration_since(self.last_client_activity) < DRAIN_QUIET {
            return Ok(());
        }
        if shutting_down && self.quiet() {
            return Err(SessionError::Shutdown);
        }
        if self.removing && self.quiet() {
            // Lowered first: a reload removing it again meanwhile raises
            // it anew.
            self.info.signal.clear(REMOVED);
            // (A pinned connection is closed with the session.)
            match self.app.removed(&self.database, &self.user) {
                Some(e) => return Err(SessionError::Pool(crate::pool::PoolError::Connect(e))),
                // Put back by a later reload.
                None => self.removing = false,
            }
        }
        Ok(())
    }

    /// The next proxy-enforced timeout, if one applies in the current state.
    fn next_timeout(&self) -> Option<(Instant, Timeout)> {
        let t = &self.cfg.timeouts;
        match &self.server {
            Some(_) if !self.expect.is_empty() => {
                let query = t.query.enabled().filter(|_| !self.cancel_sent).and_then(|limit| Some((self.query_clock? + limit, Timeout::Query)));
                // The server waits for the client's COPY data: a client that
                // sends none holds its transaction open, idle all the same.
                // (Not while what it sent is still on its way to a server
                // that does not read it: then the server is the slow one,
                // and pgfleet may have stopped reading the client.)
                let copy_idle = t.idle_in_transaction.enabled().filter(|_| self.copy_in && self.sout.is_empty()).map(|limit| (self.last_client_activity + limit, Timeout::IdleInTransaction));
                [query, copy_idle].into_iter().flatten().min_by_key(|(at, _)| *at)
            }
            // In a transaction, or in an extended-protocol batch not yet
            // ended by Sync (its implicit transaction is open).
            Some(_) if matches!(self.status, b'T' | b'E') || self.in_batch => {
                Some((self.last_client_activity + t.idle_in_transaction.enabled()?, Timeout::IdleInTransaction))
            }
            // Idle between transactions, still holding the connection
            // (session mode, a pinned client): idle all the same.
            Some(_) | None => Some((self.last_client_activity + t.client_idle.enabled()?, Timeout::ClientIdle)),
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
        if (shutting_down || self.removing) && self.quiet() {
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

    /// Waits for the next thing to do. Kept small and cheap on purpose:
    /// this future lives in every idle client's task and runs a few times per
    /// transaction. Sockets are polled through their registration's own
    /// waker slots (no waiter node linked and unlinked per wait), KILL and
    /// shutdown through the client's `Signal`, and the timer lives in the
    /// session, armed across waits: it is re-armed only when a deadline
    /// earlier than the armed one is needed (firing early re-evaluates).
    pub(super) async fn wait(&mut self, shutting_down: bool) -> Result<Event, SessionError> {
        // A message not yet complete is always read on; past that, only
        // while what is read can be processed (a client that writes and
        // never reads must not grow pgfleet's buffers without bound).
        let client_read = !self.terminated
            && ((self.sout.len() < SOUT_HIGH && self.cout.len() < COUT_HIGH && self.cin.len() < CIN_HIGH)
                || !self.has_complete_client_message());
        let client_write = !self.cout.is_empty();
        let (server_read, server_write) = match self.server {
            Some(_) => (self.cout.len() < COUT_HIGH, !self.sout.is_empty()),
            None => (false, false),
        };
        let due = self.next_deadline(shutting_down);
        if let Some((at, _)) = due {
            let at = tokio::time::Instant::from_std(at);
            match &mut self.timer {
                Some(t) if !t.is_elapsed() && t.deadline() <= at => {}
                Some(t) => t.as_mut().reset(at),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
        // Which socket is looked at first alternates, so neither direction
        // can starve the other.
        self.server_first = !self.server_first;
        let server_first = self.server_first;
        let client = &self.client;
        let server = self.server.as_ref().map(|s| &s.stream);
        let signal = &self.info.signal;
        let mask = match (shutting_down, self.removing) {
            (true, _) => KILL,
            (false, true) => KILL | SHUTDOWN,
            (false, false) => KILL | SHUTDOWN | REMOVED,
        };
        let mut timer = self.timer.as_mut();
        std::future::poll_fn(move |cx| {
            if let Poll::Ready(raised) = signal.poll_raised(cx, mask) {
                return Poll::Ready(match raised {
                    r if r & KILL != 0 => Err(SessionError::Killed),
                    r if r & SHUTDOWN != 0 => Ok(Event::Shutdown),
                    _ => Ok(Event::Removed),
                });
            }
            let poll_client = |cx: &mut Context<'_>| {
                poll_socket(client, cx, client_read, client_write, Event::ClientReadable).map_err(|_| SessionError::ClientGone)
            };
            let poll_server = |cx: &mut Context<'_>| match server {
                Some(s) => poll_socket(s, cx, server_read, server_write, Event::ServerReadable)
                    .map_err(|e| SessionError::ServerLost(e.to_string())),
                None => Poll::Pending,
            };
            let ready = if server_first {
                match poll_server(cx) {
                    Poll::Pending => poll_client(cx),
                    r => r,
                }
            } else {
                match poll_client(cx) {
                    Poll::Pending => poll_server(cx),
                    r => r,
                }
            };
            if ready.is_ready() {
                return ready;
            }
            if let (Some(t), Some((at, event))) = (timer.as_deref_mut(), due) {
                let fired_at = t.deadline();
                if t.as_mut().poll(cx).is_ready() {
                    // Fired at the wanted deadline: that event; earlier: look again.
                    return Poll::Ready(Ok(if fired_at >= tokio::time::Instant::from_std(at) { event } else { Event::Tick }));
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// While waiting, the client's bytes read ahead are kept up to this much;
/// past it only KILL ends the wait.
const WATCH_READ_LIMIT: usize = 64 * 1024;

/// Runs `fut`, a wait for something other than the client (a pool
/// checkout, admission, a paused database, a failover), while watching
/// the client: KILL, or the client closing its connection, ends the wait
/// and drops `fut` (those waits are cancel-safe), so a client that gave up
/// leaves the queue and its statement never runs. What the client sends
/// meanwhile is read into `cin`, as the relay would have.
pub(super) async fn watching<F: Future>(
    client: &Stream,
    signal: &crate::stats::Signal,
    cin: &mut bytes::BytesMut,
    fut: F,
) -> Result<F::Output, SessionError> {
    let mut fut = std::pin::pin!(fut);
    // The client said goodbye (Terminate) after what it sent: that still
    // runs, as on PostgreSQL; only a client that just went away gave up.
    let mut said_goodbye = false;
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        if signal.poll_raised(cx, KILL).is_ready() {
            return Poll::Ready(Err(SessionError::Killed));
        }
        while !said_goodbye && cin.len() < WATCH_READ_LIMIT {
            match client.poll_read_ready(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(_)) => return Poll::Ready(Err(SessionError::ClientGone)),
                // A short read or WouldBlock clears the readiness: the next
                // poll registers for more.
                Poll::Ready(Ok(())) => match client.read_some(cin, super::READ_CHUNK) {
                    Ok(0) if has_terminate(cin) => said_goodbye = true,
                    Ok(0) => return Poll::Ready(Err(SessionError::ClientGone)),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return Poll::Ready(Err(SessionError::ClientGone)),
                },
            }
        }
        Poll::Pending
    })
    .await
}

/// Whether the messages at the start of `buf` include a Terminate.
fn has_terminate(mut buf: &[u8]) -> bool {
    while let Ok(Some(h)) = crate::wire::peek_header(buf, usize::MAX) {
        if h.tag == b'X' {
            return true;
        }
        buf = buf.get(h.total..).unwrap_or_default();
    }
    false
}

impl Session {
    /// `watching` for a wait that does not borrow the session.
    pub(super) async fn watch<F: Future>(&mut self, fut: F) -> Result<F::Output, SessionError> {
        watching(&self.client, &self.info.signal, &mut self.cin, fut).await
    }
}

/// Readiness of one socket for what is wanted of it: readable (or closed)
/// gives `readable`, writable gives `Event::Writable`.
fn poll_socket(s: &Stream, cx: &mut Context<'_>, read: bool, write: bool, readable: Event) -> Poll<std::io::Result<Event>> {
    if read {
        if let Poll::Ready(r) = s.poll_read_ready(cx) {
            return Poll::Ready(r.map(|_| readable));
        }
    }
    if write {
        if let Poll::Ready(r) = s.poll_write_ready(cx) {
            return Poll::Ready(r.map(|_| Event::Writable));
        }
    }
    Poll::Pending
}
