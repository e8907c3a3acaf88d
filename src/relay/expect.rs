//! The expected-response queue of a bound server connection. Every message
//! pgfleet sends to the server that will produce a response pushes an entry;
//! server responses pop them in order. This is what makes it safe to release
//! a connection at ReadyForQuery, to answer some messages without the server
//! (synthetic entries), and to hide the responses to messages pgfleet injected
//! itself (swallowed entries).

use std::collections::VecDeque;

/// Statement messages the server skipped after an error (up to Sync).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Proxy statements whose Parse never ran: not prepared there.
    pub not_prepared: Vec<u64>,
    /// Proxy statements whose eviction (Close) never ran: still prepared.
    pub not_closed: Vec<u64>,
    /// The client's named Parse messages among them (forwarded or answered
    /// by pgfleet): those names were never created.
    pub client_parses: usize,
    /// Close messages pgfleet answered itself among them: those names
    /// were never closed.
    pub client_closes: usize,
}

/// A client or proxy message that is waiting for its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Parse; carries the proxy statement id for named statements.
    Parse(Option<u64>),
    /// Bind; carries the proxy statement id when it binds one.
    Bind(Option<u64>),
    /// Describe; carries the proxy statement id when it describes one.
    Describe(Option<u64>),
    Execute,
    /// Close; carries the proxy statement id when pgfleet evicts one.
    Close(Option<u64>),
    Sync,
    /// Simple Query: complete at ReadyForQuery.
    Query,
    /// FunctionCall: complete at ReadyForQuery.
    FnCall,
}

impl Kind {
    /// Extended-protocol messages after which an error skips to the next Sync.
    pub fn is_extended(self) -> bool {
        matches!(self, Kind::Parse(_) | Kind::Bind(_) | Kind::Describe(_) | Kind::Execute | Kind::Close(_))
    }

    /// Does a server message with this tag complete this kind?
    pub fn completed_by(self, tag: u8) -> bool {
        match self {
            Kind::Parse(_) => tag == b'1',
            Kind::Bind(_) => tag == b'2',
            Kind::Close(_) => tag == b'3',
            Kind::Describe(_) => tag == b'T' || tag == b'n',
            Kind::Execute => matches!(tag, b'C' | b's' | b'I'),
            Kind::Sync | Kind::Query | Kind::FnCall => tag == b'Z',
        }
    }

    fn ends_cycle(self) -> bool {
        matches!(self, Kind::Sync | Kind::Query | Kind::FnCall)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// The client sent it; its responses go to the client.
    Fwd(Kind),
    /// pgfleet sent it; its success responses are hidden from the client.
    Swallow(Kind),
    /// pgfleet answers it itself, at this position in the response stream.
    Synth(Synth),
    /// pgfleet sent it to fail on purpose, so that the server's transaction
    /// fails where the client saw one of pgfleet's own answers fail; its
    /// ErrorResponse is hidden, and the server skips to the next Sync.
    Abort,
}

/// Answers pgfleet gives without asking a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synth {
    ParseComplete,
    CloseComplete,
    /// Prepared bytes (the next entry of `Expect::payloads`).
    Payload,
    /// ReadyForQuery with the transaction status at that point.
    Ready,
}

#[derive(Debug, Default)]
pub struct Expect {
    q: VecDeque<Pending>,
    /// Bytes of the `Synth::Payload` entries, in queue order.
    payloads: VecDeque<bytes::Bytes>,
}

impl Expect {
    pub fn push(&mut self, p: Pending) {
        self.q.push_back(p);
    }

    /// Queues prepared response bytes at this position.
    pub fn push_payload(&mut self, bytes: bytes::Bytes) {
        self.q.push_back(Pending::Synth(Synth::Payload));
        self.payloads.push_back(bytes);
    }

    pub fn front(&self) -> Option<Pending> {
        self.q.front().copied()
    }

    pub fn pop(&mut self) -> Option<Pending> {
        self.q.pop_front()
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Something sent to the server since the last message that ends a
    /// cycle (Sync, Query) is still unanswered: an error in it would make
    /// the server skip what follows in the batch.
    pub fn batch_pending(&self) -> bool {
        self.q
            .iter()
            .rev()
            .take_while(|p| !matches!(p, Pending::Fwd(k) | Pending::Swallow(k) if k.ends_cycle()))
            .any(|p| !matches!(p, Pending::Synth(_)))
    }

    /// Only pgfleet's own messages are unanswered (the state check after
    /// a transaction): the client has had every answer it waits for.
    pub fn only_hidden(&self) -> bool {
        !self.q.is_empty() && self.q.iter().all(|p| matches!(p, Pending::Swallow(_)))
    }

    /// Pops the synthetic answer now at the head (with its payload).
    pub fn pop_synth(&mut self) -> Option<(Synth, Option<bytes::Bytes>)> {
        match self.q.front() {
            Some(Pending::Synth(s)) => {
                let t = *s;
                self.q.pop_front();
                let payload = if t == Synth::Payload { self.payloads.pop_front() } else { None };
                Some((t, payload))
            }
            _ => None,
        }
    }

    /// After an ErrorResponse in the extended protocol the server skips
    /// everything up to the next Sync: drop those entries. Returns the ids of
    /// Parse messages that therefore did not prepare anything.
    pub fn skip_to_sync(&mut self) -> Skipped {
        let mut skipped = Skipped::default();
        while let Some(p) = self.q.front().copied() {
            if matches!(p, Pending::Fwd(Kind::Sync) | Pending::Swallow(Kind::Sync)) {
                break;
            }
            self.q.pop_front();
            self.dropped(p, &mut skipped);
        }
        skipped
    }

    /// At ReadyForQuery: pops through the entry that ended this cycle and
    /// returns it, with what was left unanswered on the way (messages the
    /// server skipped: an error came before the client's Sync was sent).
    pub fn complete_cycle(&mut self) -> (Option<Pending>, Skipped) {
        let mut skipped = Skipped::default();
        while let Some(p) = self.q.pop_front() {
            match p {
                Pending::Fwd(k) | Pending::Swallow(k) if k.ends_cycle() => return (Some(p), skipped),
                _ => self.dropped(p, &mut skipped),
            }
        }
        (None, skipped)
    }

    /// An entry popped without its answer: what it would have done.
    fn dropped(&mut self, p: Pending, skipped: &mut Skipped) {
        match p {
            Pending::Fwd(Kind::Parse(Some(id))) => {
                skipped.not_prepared.push(id);
                skipped.client_parses += 1;
            }
            Pending::Swallow(Kind::Parse(Some(id))) => skipped.not_prepared.push(id),
            Pending::Swallow(Kind::Close(Some(id))) => skipped.not_closed.push(id),
            Pending::Synth(Synth::ParseComplete) => skipped.client_parses += 1,
            Pending::Synth(Synth::CloseComplete) => skipped.client_closes += 1,
            Pending::Synth(Synth::Payload) => {
                self.payloads.pop_front();
            }
            _ => {}
        }
    }

    /// CopyInResponse to an extended-protocol Execute: the server ignores
    /// Sync messages until the copy ends, so forget the one queued with the
    /// Execute (one sent after the copy ends is answered).
    pub fn drop_queued_syncs(&mut self) {
        if let Some(i) = self.q.iter().position(|p| matches!(p, Pending::Fwd(Kind::Sync))) {
            self.q.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_skips_to_sync_and_reports_failed_parses() {
        let mut e = Expect::default();
        e.push(Pending::Fwd(Kind::Parse(Some(7))));
        e.push(Pending::Synth(Synth::ParseComplete));
        e.push(Pending::Swallow(Kind::Close(Some(3))));
        e.push(Pending::Synth(Synth::CloseComplete));
        e.push(Pending::Fwd(Kind::Bind(None)));
        e.push(Pending::Fwd(Kind::Execute));
        e.push(Pending::Fwd(Kind::Sync));
        e.push(Pending::Fwd(Kind::Query));
        assert_eq!(
            e.skip_to_sync(),
            Skipped {
                not_prepared: vec![7],
                not_closed: vec![3],
                client_parses: 2,
                client_closes: 1,
            }
        );
        assert_eq!(e.front(), Some(Pending::Fwd(Kind::Sync)));
        assert_eq!(e.complete_cycle(), (Some(Pending::Fwd(Kind::Sync)), Skipped::default()));
        assert_eq!(e.front(), Some(Pending::Fwd(Kind::Query)));
    }

    #[test]
    fn a_batch_is_pending_while_something_sent_in_it_is_unanswered() {
        let mut e = Expect::default();
        assert!(!e.batch_pending());
        e.push(Pending::Fwd(Kind::Bind(None)));
        assert!(e.batch_pending());
        e.push(Pending::Fwd(Kind::Sync));
        // The next batch has sent nothing yet.
        assert!(!e.batch_pending());
        e.push(Pending::Synth(Synth::ParseComplete));
        assert!(!e.batch_pending());
        e.push(Pending::Abort);
        assert!(e.batch_pending());
    }

    #[test]
    fn completion_tags() {
        assert!(Kind::Describe(None).completed_by(b'n'));
        assert!(!Kind::Describe(None).completed_by(b't'));
        assert!(Kind::Execute.completed_by(b's'));
        assert!(!Kind::Query.completed_by(b'C'));
        assert!(Kind::Query.completed_by(b'Z'));
    }

    #[test]
    fn synth_at_head_only() {
        let mut e = Expect::default();
        e.push(Pending::Fwd(Kind::Bind(None)));
        e.push(Pending::Synth(Synth::CloseComplete));
        assert_eq!(e.pop_synth(), None);
        e.pop();
        assert_eq!(e.pop_synth(), Some((Synth::CloseComplete, None)));
        assert!(e.is_empty());
    }
}
