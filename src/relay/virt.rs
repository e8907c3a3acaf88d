//! Virtual statements: `SET pgfleet.<name>`, `RESET pgfleet.<name>` and
//! `SHOW pgfleet.<name>` are answered by pgfleet in both protocols and never
//! reach PostgreSQL, and so is `DEALLOCATE` of a client's protocol-level
//! statement (those live only in pgfleet). Names: `workload`, `route`
//! (primary | replica | auto), `lsn` (show: the client's read-your-writes
//! floor) and `min_lsn` (set: raise that floor, to carry it across
//! connections).

use super::expect::{Kind, Pending, Synth};
use super::{starts_with_word, Session};
use crate::router::{Analysis, RouteHint};
use crate::topology::{format_lsn, parse_lsn};
use crate::wire::{self, build, sqlstate};
use bytes::{Bytes, BytesMut};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Virtual {
    Set(String, Option<String>),
    Show(String),
    /// `DEALLOCATE [PREPARE] name` of one of the client's statements.
    Deallocate(String),
}

fn virtual_of(a: &Analysis) -> Option<Virtual> {
    if a.statements != 1 {
        return None;
    }
    if let Some((n, v)) = &a.proxy_set {
        return Some(Virtual::Set(n.clone(), v.clone()));
    }
    a.proxy_show.clone().map(Virtual::Show)
}

/// Could this SQL be a virtual statement? (cheap, before classifying)
fn maybe_virtual(sql: &[u8]) -> bool {
    ((starts_with_word(sql, b"set") || starts_with_word(sql, b"reset") || starts_with_word(sql, b"show"))
        && sql.windows(8).any(|w| w.eq_ignore_ascii_case(b"pgfleet.")))
        || starts_with_word(sql, b"deallocate")
}

impl Session {
    /// `sql`: raw text up to NUL; only decoded when it can be virtual.
    pub(super) fn classify_virtual(&self, sql: &[u8]) -> Option<Virtual> {
        if !maybe_virtual(sql) {
            return None;
        }
        let a = self.analyze(sql);
        if let Some(name) = a.deallocate.as_ref().filter(|_| a.statements == 1) {
            // One of the client's protocol-level statements (drivers such as
            // psycopg deallocate them with SQL, in a pipeline with the
            // extended protocol): the server has it under another name.
            // Others (SQL-level PREPARE, unknown names) go to the server, as
            // everything does in session mode; in a failed transaction the
            // server answers it (25P02), and the statement stays.
            let ours = self.stmts.contains_key(name.as_bytes()) || self.virtuals.contains_key(name.as_bytes());
            return (ours && self.tracks_state() && !self.in_failed_transaction()).then(|| Virtual::Deallocate(name.clone()));
        }
        virtual_of(&a)
    }

    /// Answers the message if it is (or refers to) a virtual statement.
    pub(super) fn try_virtual(&mut self, tag: u8, msg: &[u8]) -> Result<bool, super::SessionError> {
        let handled = match tag {
            b'Q' => {
                let Some(v) = self.classify_virtual(wire::body(msg)) else { return Ok(false) };
                let (out, ok) = self.run_virtual(&v, true);
                self.expect.push_payload(out);
                if !ok {
                    self.fail_server_transaction(true);
                }
                self.expect.push(Pending::Synth(Synth::Ready));
                true
            }
            b'P' => {
                let (name, content) = wire::parse_parse_name(msg)?;
                if self.statement_exists(name) {
                    wire::parse_parse(msg)?; // answered here: validate it whole
                    self.duplicate_statement(name);
                    true
                } else if let Some(v) = self.classify_virtual(content) {
                    wire::parse_parse(msg)?; // answered here: validate it whole
                    let name = Bytes::copy_from_slice(name);
                    self.virtuals.insert(name.clone(), v);
                    self.name_seq += 1;
                    self.parsing.push_back((name, None, self.syncs_sent, self.name_seq));
                    self.expect.push(Pending::Synth(Synth::ParseComplete));
                    true
                } else {
                    // Guarded: removing from an empty map still hashes the key.
                    if !self.virtuals.is_empty() {
                        self.virtuals.remove(name);
                    }
                    false
                }
            }
            b'B' => {
                let (portal, stmt, _) = wire::parse_bind(msg)?;
                match self.virtuals.get(stmt).cloned() {
                    Some(v) => {
                        self.virtual_portals.insert(Bytes::copy_from_slice(portal), v);
                        let mut b = BytesMut::new();
                        build::bind_complete(&mut b);
                        self.expect.push_payload(b.freeze());
                        true
                    }
                    None => {
                        // A real Bind replaces a virtual portal of that name.
                        if !self.virtual_portals.is_empty() {
                            self.virtual_portals.remove(portal);
                        }
                        false
                    }
                }
            }
            b'D' => {
                let (kind, name) = wire::parse_target(msg)?;
                let v = if kind == b'S' { self.virtuals.get(name) } else { self.virtual_portals.get(name) };
                match v.cloned() {
                    Some(v) => {
                        let mut b = BytesMut::new();
                        if kind == b'S' {
                            build::no_parameters(&mut b);
                        }
                        describe(&mut b, &v);
                        self.expect.push_payload(b.freeze());
                        true
                    }
                    None => false,
                }
            }
            b'E' => {
                let portal = wire::Reader::new(wire::body(msg)).cstr()?;
                match self.virtual_portals.get(portal).cloned() {
                    Some(v) => {
                        let (out, ok) = self.run_virtual(&v, false);
                        self.expect.push_payload(out);
                        if !ok {
                            self.discard_to_sync = true;
                            self.fail_server_transaction(false);
                        }
                        true
                    }
                    None => false,
                }
            }
            b'C' => {
                let (kind, name) = wire::parse_target(msg)?;
                let removed = if kind == b'S' { self.virtuals.remove_entry(name) } else { self.virtual_portals.remove_entry(name) };
                let handled = removed.is_some();
                if let Some((name, v)) = removed {
                    let (name, closed) = if kind == b'S' { (name, super::Closed::Virtual(v)) } else { (Bytes::new(), super::Closed::Nothing) };
                    self.name_seq += 1;
                    self.closing.push_back((name, closed, self.name_seq));
                    self.expect.push(Pending::Synth(Synth::CloseComplete));
                }
                handled
            }
            _ => false,
        };
        if handled {
            // Kept for a read retry too: its answer is queued behind the
            // read's, and a retry starts the queue over from what it replays.
            self.record(msg);
            self.emit_synth();
        }
        Ok(handled)
    }

    /// A virtual statement failed: on PostgreSQL the error would abort the
    /// transaction it ran in (an explicit one, or the implicit one of an
    /// extended batch, whose earlier statements must not commit at its
    /// Sync). The bound server's transaction is made to fail the same way,
    /// with a Bind of a statement that cannot exist (no side effects), its
    /// error hidden. `own_sync`: a simple Query has no Sync of the client's
    /// to end the error; pgfleet sends one and hides its ReadyForQuery (the
    /// virtual's own, queued next, reports the status it leaves). Outside a
    /// transaction this is harmless: nothing is open to abort.
    pub(super) fn fail_server_transaction(&mut self, own_sync: bool) {
        if self.server.is_none() {
            return;
        }
        let mut b = BytesMut::with_capacity(48);
        build::bind(&mut b, b"", b"\x01pgfleet: a virtual statement failed", &[0, 0, 0, 0, 0, 0]);
        self.expect.push(Pending::Abort);
        if own_sync {
            build::sync(&mut b);
            self.expect.push(Pending::Swallow(Kind::Sync));
        }
        self.sout.extend_from_slice(&b);
    }

    /// Executes a virtual statement: (response bytes, success).
    fn run_virtual(&mut self, v: &Virtual, with_description: bool) -> (Bytes, bool) {
        let mut b = BytesMut::new();
        let result = match v {
            Virtual::Set(name, value) => self.set_virtual(name, value.as_deref()).map(|()| {
                build::command_complete(&mut b, if value.is_some() { "SET" } else { "RESET" });
            }),
            Virtual::Show(name) => self.show_virtual(name).map(|value| {
                if with_description {
                    describe(&mut b, v);
                }
                build::data_row(&mut b, &[Some(&value)]);
                build::command_complete(&mut b, "SHOW");
            }),
            Virtual::Deallocate(name) => {
                let gone = self.stmts.remove(name.as_bytes()).is_some() | self.virtuals.remove(name.as_bytes()).is_some();
                if gone {
                    build::command_complete(&mut b, "DEALLOCATE");
                    Ok(())
                } else {
                    // Gone since its Parse (a second Execute of the portal).
                    Err((sqlstate::UNDEFINED_PREPARED_STATEMENT, format!("prepared statement \"{name}\" does not exist")))
                }
            }
        };
        match result {
            Ok(()) => (b.freeze(), true),
            Err((code, msg)) => {
                let mut e = BytesMut::new();
                build::error_response(&mut e, "ERROR", code, &msg);
                (e.freeze(), false)
            }
        }
    }

    fn set_virtual(&mut self, name: &str, value: Option<&str>) -> Result<(), (&'static str, String)> {
        match (name, value) {
            ("workload", None) => {
                self.workload = self.login_workload.clone();
                self.workload_changed();
            }
            ("workload", Some(w)) => {
                super::routing::group_index(&self.app.topology(), w)?;
                self.workload = Some(w.to_string());
                self.workload_changed();
            }
            ("route", None) => self.route_override = None,
            ("route", Some(r)) => {
                self.route_override = match r.to_ascii_lowercase().as_str() {
                    "primary" => Some(RouteHint::Primary),
                    "replica" => Some(RouteHint::Replica),
                    "auto" => None,
                    _ => {
                        return Err((
                            sqlstate::INVALID_PARAMETER_VALUE,
                            format!("invalid value for pgfleet.route: \"{r}\" (use primary, replica or auto)"),
                        ))
                    }
                }
            }
            ("min_lsn", Some(l)) => {
                let lsn = parse_lsn(l).ok_or_else(|| {
                    (sqlstate::INVALID_PARAMETER_VALUE, format!("invalid value for pgfleet.min_lsn: \"{l}\" (use a quoted LSN like '0/16B3748')"))
                })?;
                self.min_lsn = Some(self.min_lsn.unwrap_or(0).max(lsn));
            }
            // The floor of the client's own writes stays.
            ("min_lsn", None) => self.min_lsn = None,
            (other, _) => return Err((sqlstate::UNDEFINED_OBJECT, format!("unrecognized pgfleet setting \"pgfleet.{other}\""))),
        }
        Ok(())
    }

    fn show_virtual(&self, name: &str) -> Result<String, (&'static str, String)> {
        Ok(match name {
            "workload" => self.workload.clone().unwrap_or_default(),
            "route" => match self.route_override {
                Some(RouteHint::Primary) => "primary",
                Some(RouteHint::Replica) => "replica",
                _ => "auto",
            }
            .to_string(),
            "lsn" | "min_lsn" => {
                let floor = match self.floor_unknown_since {
                    // The last write's position could not be read.
                    Some(since) => self.resolved_floor(since).ok_or((
                        sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
                        "the position of this session's last write is not known yet (reading it failed); ask again in a few seconds".to_string(),
                    ))?,
                    None => self.floor.unwrap_or(0),
                };
                format_lsn(floor.max(self.min_lsn.unwrap_or(0)))
            }
            other => return Err((sqlstate::UNDEFINED_OBJECT, format!("unrecognized pgfleet setting \"pgfleet.{other}\""))),
        })
    }
}

fn describe(b: &mut BytesMut, v: &Virtual) {
    match v {
        Virtual::Show(name) => build::row_description(b, &[&format!("pgfleet.{name}")]),
        Virtual::Set(..) | Virtual::Deallocate(_) => build::no_data(b),
    }
}
