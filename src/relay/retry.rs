//! Read retry: the client messages of a replica read are kept while none of
//! their answers has reached the client; if the replica's connection fails
//! (or the server announces it is going away) in that window, they are sent
//! again, once, to another replica. The failed replica is marked down.

use super::expect::Expect;
use super::{Session, SessionError};
use crate::router::route::Target;
use crate::wire;

/// Whether the current unit can be retried on another replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Replay {
    /// Not a replica read, or answers already reached the client.
    Off,
    /// Recording into `replay`; nothing answered yet.
    Recording,
    /// Already retried once: a second failure reaches the client.
    Retried,
}

/// Read units larger than this are not kept for a retry.
const REPLAY_MAX: usize = 64 * 1024;

/// What to do with an error or notice from the server while recording.
pub(super) enum WhileRecording {
    Forward,
    /// A notice about the connection itself, which a retry replaces.
    Drop,
    /// FATAL before any answer: retry instead of forwarding.
    Lost(String),
}

impl Session {
    /// Just bound: a replica read starts recording (unless it is the retry).
    pub(super) fn start_recording(&mut self) {
        if matches!(self.bound_target, Some(Target::Replica(_))) && self.replay_state == Replay::Off {
            self.replay.clear();
            self.replay_state = Replay::Recording;
        }
    }

    /// Keeps a client message sent while recording (too much: stop).
    pub(super) fn record(&mut self, msg: &[u8]) {
        if self.recording() {
            if self.replay.len() + msg.len() > REPLAY_MAX {
                self.replay_state = Replay::Off;
                self.release_held();
            } else {
                self.replay.extend_from_slice(msg);
            }
        }
    }

    pub(super) fn recording(&self) -> bool {
        self.replay_state == Replay::Recording
    }

    /// While recording, an ErrorResponse or NoticeResponse (`msg`, whole) may
    /// say the server is going away: "terminating connection due to
    /// immediate shutdown" comes as a 57P* notice, then a FATAL or EOF.
    pub(super) fn while_recording(&self, tag: u8, msg: &[u8]) -> WhileRecording {
        if !self.recording() || !matches!(tag, b'E' | b'N') {
            return WhileRecording::Forward;
        }
        let fields = wire::error_fields(msg);
        let field = |code: u8| fields.iter().find(|(c, _)| *c == code).map(|(_, v)| v.as_str());
        if tag == b'E' && (field(b'V') == Some("FATAL") || field(b'S') == Some("FATAL")) {
            return WhileRecording::Lost(format!("server terminated the connection: {}", field(b'M').unwrap_or("")));
        }
        if tag == b'N' && field(b'C').is_some_and(|c| c.starts_with("57P")) {
            return WhileRecording::Drop;
        }
        WhileRecording::Forward
    }
    /// The connection was lost while only pgfleet's own check after a
    /// write was under way (terminated, restarted, a network failure): the
    /// client has all its answers and sent nothing since, so its session
    /// goes on with another connection next time. Not when the check was
    /// to read back the client's settings or held state (those died with
    /// the connection, and the client must hear of it), nor for a pinned
    /// client.
    fn lost_during_own_check(&mut self, why: &str) -> bool {
        let own_only = self.probe.as_ref().is_some_and(|p| p.about_the_connection_only());
        if !own_only || self.pinned.is_some() || self.status != b'I' || self.in_batch || !self.expect.only_hidden() || !self.sout.is_empty() {
            return false;
        }
        tracing::warn!(parent: &self.span, error = %why, "server connection lost during pgfleet's check after a transaction; the client carries on");
        // What the check was to learn: a write's LSN is not known (reads
        // stay on the primary until it is).
        if self.probe.as_ref().is_some_and(|p| p.lsn) || std::mem::take(&mut self.wrote) {
            self.floor_unknown_since = Some(std::time::Instant::now());
        }
        self.drop_lost_connection("lost during pgfleet's check after a transaction");
        self.probe_failures = 0;
        self.discard_conn = false;
        true
    }

    /// Closes a connection that failed and forgets what was pending on it.
    fn drop_lost_connection(&mut self, why: &'static str) {
        if let Some((conn, pool)) = self.unbind() {
            pool.discard(conn, why);
        }
        self.expect = Expect::default();
        self.probe = None;
        self.skip = 0;
        self.sin.clear();
        self.sout.clear();
        self.held.clear();
    }

    /// Something from the current unit reached (or is about to reach) the
    /// client: it can no longer be retried transparently.
    pub(super) fn answered(&mut self) {
        if self.recording() {
            self.replay_state = Replay::Off;
        }
        self.release_held();
    }

    /// Notices and ParameterStatus held during a replica read go to the
    /// client (the read can no longer be retried elsewhere).
    fn release_held(&mut self) {
        if !self.held.is_empty() {
            self.cout.extend_from_slice(&self.held);
            self.held.clear();
        }
    }

    /// A server connection failed. A replica read of which the client has
    /// seen nothing is sent again, once, to another replica (the failed one
    /// is marked down at once); anything else ends the session as before.
    pub(super) fn retry_or(&mut self, e: SessionError) -> Result<(), SessionError> {
        let SessionError::ServerLost(why) = &e else { return Err(e) };
        if self.lost_during_own_check(why) {
            return Ok(());
        }
        if !self.recording() {
            return Err(e);
        }
        let target = self.bound_target;
        tracing::warn!(parent: &self.span, error = %why, "replica connection failed before answering; retrying the read elsewhere");
        if let Some(Target::Replica(i)) = target {
            self.topo.mark_down(i, why);
        }
        self.drop_lost_connection("server connection failed (read retried elsewhere)");
        self.app.metrics.errors.with_label_values(&["retried"]).inc();
        // The names its Parses create again, and its Closes close again.
        self.undo_names(self.parsing.len(), self.closing.len());
        self.in_batch = false;
        self.copy_in_ext = false;
        self.copy_in = false;
        self.status = b'I';
        let mut cin = std::mem::take(&mut self.replay);
        cin.extend_from_slice(&self.cin);
        self.cin = cin;
        self.replay_state = Replay::Retried;
        Ok(())
    }
}
