//! A client message on its way to the bound server: accounted, recorded
//! for a read retry, rewritten where pgfleet must (statements, session
//! effects), queued with the answer it expects; and the answers pgfleet
//! gives itself, written in their place.

use super::*;

impl Session {
    /// `known`: this message's analysis when already computed.
    pub(super) fn forward(&mut self, tag: u8, msg: &[u8], known: Option<Analysis>) -> Result<(), SessionError> {
        self.record(msg);
        match tag {
            b'Q' => self.on_query(msg, known)?,
            b'F' => {
                // A function call by OID (large objects, ...): may write.
                self.note_write(Class::Write, false);
                self.send(msg, Some(Kind::FnCall))
            }
            b'S' if self.copy_in_ext => self.send(msg, None),
            b'S' => {
                self.in_batch = false;
                self.syncs_sent = self.syncs_sent.wrapping_add(1);
                self.send(msg, Some(Kind::Sync));
            }
            b'H' | b'd' => self.send(msg, None),
            b'c' | b'f' => {
                self.copy_in_ext = false;
                self.copy_in = false;
                self.send(msg, None);
            }
            b'E' => {
                self.in_batch = true;
                self.send(msg, Some(Kind::Execute));
            }
            b'P' => self.on_parse(msg, known)?,
            b'B' => self.on_bind(msg)?,
            b'D' => self.on_describe(msg)?,
            b'C' => self.on_close(msg)?,
            _ => unreachable!("filtered in process_client"),
        }
        self.emit_synth();
        Ok(())
    }

    pub(super) fn send(&mut self, msg: &[u8], kind: Option<Kind>) {
        self.count_request(msg);
        self.sout.extend_from_slice(msg);
        if let Some(k) = kind {
            self.expect.push(Pending::Fwd(k));
        }
    }

    fn on_query(&mut self, msg: &[u8], known: Option<Analysis>) -> Result<(), SessionError> {
        // A simple Query ends the unnamed statement, as on PostgreSQL.
        self.unnamed = None;
        if self.tracks_state() {
            let a = match known {
                Some(a) => a,
                None => self.analyze(wire::body(msg)),
            };
            self.note_write(a.class, a.catalog_ddl);
            self.note_opaque(&a);
            if let Some(replacement) = self.note_effects(&a) {
                build::query(&mut self.sout, &replacement);
                self.expect.push(Pending::Fwd(Kind::Query));
                return Ok(());
            }
        }
        self.send(msg, Some(Kind::Query));
        Ok(())
    }

    /// A write reached the primary: learn its LSN when the transaction ends.
    pub(super) fn note_write(&mut self, class: Class, catalog_ddl: bool) {
        if class == Class::Write && self.bound_target == Some(Target::Primary) && self.routes() {
            self.wrote = true;
        }
        // The function catalog also tells which calls may change session
        // state (read split or not): it reloads when this transaction ends.
        self.catalog_ddl |= catalog_ddl && self.tracks_state();
    }

    /// Writes the synthetic answers that are now at the head of the queue.
    pub(super) fn emit_synth(&mut self) {
        // Not inside a server message still streaming to the client: the
        // server-side scan emits them once it is whole.
        if self.skip > 0 {
            return;
        }
        while let Some((s, payload)) = self.expect.pop_synth() {
            self.answered();
            match s {
                Synth::ParseComplete => {
                    self.parsing.pop_front();
                    build::parse_complete(&mut self.cout)
                }
                Synth::CloseComplete => {
                    self.closing.pop_front();
                    build::close_complete(&mut self.cout)
                }
                Synth::Payload => self.cout.extend_from_slice(&payload.unwrap_or_default()),
                Synth::Ready => build::ready_for_query(&mut self.cout, self.status),
            }
        }
    }
}
