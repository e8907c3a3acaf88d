//! The data path of one client: read client messages, bind a server
//! connection at the first message of a transaction, forward, stream the
//! responses back, and release the connection at the ReadyForQuery(Idle)
//! that ends the transaction (transaction mode) or at disconnect (session
//! mode).
//!
//! Invariants:
//! - A server connection is released only when every message sent to it has
//!   been answered (`expect` empty), no extended-protocol batch is open, the
//!   server reported Idle, and no client bytes wait to be sent.
//! - Client statements and session settings live here, not on the server
//!   connection; they are replayed onto whichever connection serves next.
//! - All I/O uses readiness + try_read/try_write, so both directions progress
//!   independently and a slow peer cannot deadlock the other direction.

pub mod expect;
mod accounting;
mod bind;
mod dispatch;
mod forward;
pub(crate) use bind::fingerprint;
mod retry;
use retry::Replay;
mod routing;
mod scan;
mod state;
mod statements;
pub mod stmts;
mod virt;
mod wait;

use crate::app::App;
use crate::backend::ServerConn;
use crate::config::PoolMode;
use crate::frontend::cancel::{CancelSlot, CancelTarget};
use crate::pool::{Pool, PoolError};
use crate::router::route::Target;
use crate::router::{Analysis, Class, RouteHint};
use crate::stats::{ClientInfo, ClientMetrics, PoolCounters, WorkloadCounters, CLIENT_ACTIVE, CLIENT_IDLE, CLIENT_WAITING, SERVER_ACTIVE, SERVER_IDLE};
use crate::topology::Topology;
use crate::wire::{self, build, sqlstate, WireError};
use bytes::{Buf, Bytes, BytesMut};
use expect::{Expect, Kind, Pending, Synth};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use stmts::Stmt;
use crate::net::Stream;

/// Stop moving client messages to the server buffer past this many bytes.
const SOUT_HIGH: usize = 256 * 1024;
/// Stop reading the server while this many bytes wait for the client.
const COUT_HIGH: usize = 256 * 1024;
const READ_CHUNK: usize = 16 * 1024;
/// Complete client messages pgfleet holds unprocessed (pipelined while a
/// unit waits to be released, or while output backs up) before it stops
/// reading the client.
const CIN_HIGH: usize = 1024 * 1024;
/// While draining, an idle client is closed only after this much quiet, so
/// a request already on the wire (e.g. right after login) is still served.
const DRAIN_QUIET: Duration = Duration::from_millis(250);
/// Largest message accepted from a server.
pub(crate) const MAX_SERVER_MSG: usize = 1 << 30;

/// Why a session ended abnormally; `rescue` turns it into what the client sees.
#[derive(Debug)]
pub enum SessionError {
    ClientGone,
    Protocol(WireError),
    ServerLost(String),
    Pool(PoolError),
    Shutdown,
    /// KILL from the admin console.
    Killed,
    /// A proxy-enforced timeout ended the session: (SQLSTATE, message).
    Timeout(&'static str, &'static str),
}

impl From<WireError> for SessionError {
    fn from(e: WireError) -> Self {
        SessionError::Protocol(e)
    }
}

/// The parameters a client session wants on any server connection serving it.
pub type Settings = Vec<(String, String)>;

/// Whether these settings name a client encoding whose two-byte
/// characters may end in the byte of a backslash (see `state::classify_text`).
fn two_byte_backslash(settings: &Settings) -> bool {
    settings.iter().any(|(n, v)| n.eq_ignore_ascii_case("client_encoding") && state::backslash_trail_encoding(v))
}

/// Whether these settings turn `standard_conforming_strings` off.
fn backslash_strings(settings: &Settings) -> bool {
    settings.iter().any(|(n, v)| n.eq_ignore_ascii_case("standard_conforming_strings") && v.eq_ignore_ascii_case("off"))
}

/// The transaction defaults routing needs from these settings:
/// (`default_transaction_read_only` on, `default_transaction_isolation`
/// serializable).
fn tx_defaults(settings: &Settings) -> (bool, bool) {
    let (mut read_only, mut serializable) = (false, false);
    for (n, v) in settings.iter() {
        match n.as_str() {
            "default_transaction_read_only" => read_only = matches!(v.as_str(), "on" | "true" | "1" | "yes"),
            "default_transaction_isolation" => serializable = v.eq_ignore_ascii_case("serializable"),
            _ => {}
        }
    }
    (read_only, serializable)
}

pub struct Session {
    /// The client's span (user, database, address, workload). The task is
    /// not instrumented with it (entering a span on every poll of every
    /// session cost ≈5 % of the relay's instructions at `info`): events
    /// name it as their parent, and the slow paths that await (checkout,
    /// the end of the session) run inside it.
    span: tracing::Span,
    app: Arc<App>,
    user: String,
    database: String,
    mode: PoolMode,
    client: Stream,
    max_msg: usize,
    cin: BytesMut,
    cout: BytesMut,
    sin: BytesMut,
    sout: BytesMut,
    server: Option<crate::pool::Conn>,
    expect: Expect,
    /// Extended-protocol messages were sent since the last Sync.
    in_batch: bool,
    /// Transaction status from the last ReadyForQuery.
    status: u8,
    /// Bytes of the current server message still to pass through unparsed.
    skip: usize,
    /// In a COPY FROM STDIN started by Execute: Syncs are ignored by the server.
    copy_in_ext: bool,
    /// The server sent CopyInResponse and waits for the client's data.
    copy_in: bool,
    /// Shared between clients with the same settings (copy on write).
    settings: Arc<Settings>,
    stmts: HashMap<Bytes, Arc<Stmt>>,
    /// The client's named Parses not answered yet, in queue order, with
    /// their proxy statement (None: a virtual one). A name exists once its
    /// ParseComplete reaches the client; a Parse that fails or is skipped
    /// after an error leaves no name behind, as on PostgreSQL.
    /// With the number of Syncs sent before it (its batch), and its place
    /// among the client's Parses and Closes (`name_seq`).
    parsing: std::collections::VecDeque<(Bytes, Option<u64>, u32, u64)>,
    /// Shared statements whose Parse or Close pgfleet sent on the bound
    /// connection on its own, unanswered yet, with their batch (`syncs_sent`):
    /// an error earlier in that batch makes the server skip them, so a later
    /// batch, already sent, cannot count on them (see `settled`).
    unsettled: Vec<(u64, u32)>,
    /// Syncs forwarded so far (wrapping): which batch a Parse is in.
    syncs_sent: u32,
    /// This transaction changed search_path (SET, SET LOCAL, RESET): until
    /// it ends (and the state check reads the value back), `settings` may
    /// not hold the value the server uses, so statements prepared meanwhile
    /// are not shared with other clients.
    search_path_unsettled: bool,
    /// Notices and ParameterStatus of a replica read not answered yet:
    /// they go out with its first answer, and a retry drops them (the
    /// retry brings its own).
    held: BytesMut,
    /// Close messages pgfleet answers itself, oldest first, with what each
    /// removed: put back if the server skips it (an error earlier in the
    /// batch), as PostgreSQL would not have run it.
    /// With its place among the client's Parses and Closes.
    closing: std::collections::VecDeque<(Bytes, Closed, u64)>,
    /// Counts the client's named Parses and Closes (see `undo_names`).
    name_seq: u64,
    /// The client's unnamed statement (transaction mode): the Parse as sent
    /// and its analysis. It outlives a Sync on PostgreSQL (Go's lib/pq
    /// sends Parse/Describe/Sync, then Bind/Execute/Sync), but the
    /// connection may change at that Sync; see `ensure_unnamed`.
    unnamed: Option<(Bytes, Analysis)>,
    /// The bound connection has `unnamed` as its unnamed statement.
    unnamed_here: bool,
    cancel: Arc<CancelSlot>,
    /// The one timer of this session (`wait`), kept armed across waits.
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// `wait` alternates which socket it looks at first.
    server_first: bool,
    terminated: bool,
    /// Why the client must keep its server connection (transaction mode).
    pinned: Option<&'static str>,
    /// Settings SQL may have changed in this transaction (to read back).
    dirty: Vec<String>,
    /// `standard_conforming_strings` is off for this client: SQL text is
    /// lexed with backslash escapes in '' strings.
    backslash_strings: bool,
    /// The client's encoding has two-byte characters that may end in 0x5C.
    two_byte_backslash: bool,
    /// process_client stopped taking requests because output to the client
    /// was backed up (taken up again once a flush makes room).
    output_backed_up: bool,
    /// The state probe failed this many times in a row.
    probe_failures: u8,
    /// The pin is of a kind the held-state check cannot see: kept until
    /// the client leaves.
    pin_sticky: bool,
    /// The settings the client's startup packet asked for (its session's
    /// start values, which RESET goes back to on PostgreSQL).
    startup: Arc<Settings>,
    /// Startup settings this transaction may have RESET (names as in
    /// `startup`): the probe puts their start value back when it did.
    resets: Vec<String>,
    /// A statement may have released pinned state (check before unpinning).
    may_release: bool,
    /// DEALLOCATE/DISCARD ALL ran: re-read which proxy statements exist.
    resync_prepared: bool,
    probe: Option<state::Probe>,
    /// Where the bound connection goes, the pool it came from, and the
    /// replica's in-flight counter (load balancing).
    bound_target: Option<Target>,
    bound_pool: Option<Arc<Pool>>,
    bound_inflight: Option<Arc<std::sync::atomic::AtomicUsize>>,
    /// Workload (group name) for reads; `login_workload` is what RESET restores.
    workload: Option<String>,
    login_workload: Option<String>,
    /// `SET pgfleet.route`.
    route_override: Option<RouteHint>,
    /// Read-your-writes floor: primary LSN at the client's last write.
    floor: Option<u64>,
    /// The floor the client raised itself (`SET pgfleet.min_lsn`, to carry
    /// another connection's writes); RESET forgets it, not its own writes.
    min_lsn: Option<u64>,
    /// The LSN of a write could not be read (the check after it failed
    /// twice): reads go to the primary until a primary position read after
    /// this instant is known, which then becomes the floor.
    floor_unknown_since: Option<Instant>,
    /// The current primary transaction wrote (learn the LSN before release).
    wrote: bool,
    /// The current transaction changes functions: the function catalog is
    /// stale when it ends.
    catalog_ddl: bool,
    /// The current transaction ran code that may change session settings
    /// out of pgfleet's sight: its end reads the connection's.
    opaque_settings: bool,
    /// Custom settings such code (a DO block) names.
    opaque_names: Vec<String>,
    /// Such code ran and the custom settings it may have set are unknown
    /// (the function catalog is not loaded): the connection is closed
    /// instead of going back to the pool.
    discard_conn: bool,
    /// Virtual (pgfleet.*) statements and portals of the extended protocol.
    virtuals: HashMap<Bytes, virt::Virtual>,
    virtual_portals: HashMap<Bytes, virt::Virtual>,
    /// A request failed before reaching a server: skip the batch to Sync.
    discard_to_sync: bool,
    info: Arc<ClientInfo>,
    /// Config and topology as of `generation` (refreshed after a reload).
    cfg: Arc<crate::config::Config>,
    topo: Arc<Topology>,
    generation: u64,
    /// A reload removed the client's database or user: the session ends
    /// once idle outside a transaction.
    removing: bool,
    /// Fingerprint of `settings`: a server connection carrying the same one
    /// needs no SET at checkout.
    settings_fp: u64,
    /// `tx_defaults(settings)`, kept with `settings_fp` (see
    /// `settings_changed`) rather than read from the list per unit.
    tx_defaults: (bool, bool),
    metrics: ClientMetrics,
    workload_stats: Arc<WorkloadCounters>,
    /// When the current request cycle (up to ReadyForQuery) and the current
    /// transaction started.
    cycle_start: Option<Instant>,
    txn_start: Option<Instant>,
    /// When the statement now running on the server started, for
    /// `timeouts.query` (see `statement_done`).
    query_clock: Option<Instant>,
    /// Last time the client sent anything (idle timeouts).
    last_client_activity: Instant,
    /// When the event being handled happened: the clock is read once per
    /// event, and every timestamp the handling needs (activity, cycle and
    /// transaction start and end, checkout and checkin) uses this reading.
    now: Instant,
    /// The query timeout already sent a cancel for the current cycle.
    cancel_sent: bool,
    /// The pool last bound from: (target, config generation, writer, pool).
    pool_cache: Option<(Target, u64, crate::topology::Writer, Arc<Pool>)>,
    /// `[[limits]]` permits of the bound transaction (released with it).
    admission: Option<crate::limits::Admission>,
    /// Read retry: the client messages sent to a replica since binding,
    /// while none of their answers has reached the client (`replay_state`).
    replay: BytesMut,
    replay_state: Replay,
}

/// Who the client is, as established at login.
pub struct ClientId {
    pub user: String,
    pub database: String,
    pub workload: Option<String>,
    pub info: Arc<ClientInfo>,
}

/// Parameters PostgreSQL reports with ParameterStatus that a client may set;
/// every client has a value for each, so connections are always brought in line.
pub const REPORTED_SETTABLE: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
];

/// What a Close pgfleet answered itself removed.
pub(super) enum Closed {
    Statement(Arc<Stmt>),
    Virtual(virt::Virtual),
    Nothing,
}

/// A session that ends without `finish` (its task panicked, or was
/// dropped mid-await): the server connection it held is closed and its pool
/// slot given back, and a pin is uncounted, instead of both leaking.
impl Drop for Session {
    fn drop(&mut self) {
        if let Some((conn, pool)) = self.unbind() {
            pool.discard(conn, "its client session ended abnormally");
        }
        self.unpin();
    }
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        app: Arc<App>,
        id: ClientId,
        client: Stream,
        leftover: BytesMut,
        settings: Arc<Settings>,
        startup: Arc<Settings>,
        cancel: Arc<CancelSlot>,
    ) -> Session {
        let cfg = app.config();
        let wl = id.workload.clone().unwrap_or_default();
        let settings_fp = fingerprint(&settings);
        let tx = tx_defaults(&settings);
        let off = backslash_strings(&settings);
        let two_byte = two_byte_backslash(&settings);
        Session {
            span: tracing::Span::current(),
            generation: app.generation(),
            // Removed by a reload while it logged in (before it was listed).
            removing: app.removed(&id.database, &id.user).is_some(),
            topo: app.topology(),
            settings_fp,
            tx_defaults: tx,
            metrics: app.metrics.for_client(&id.database, &id.user, &wl),
            workload_stats: app.workload_counters(&wl),
            info: id.info,
            cycle_start: None,
            query_clock: None,
            txn_start: None,
            last_client_activity: Instant::now(),
            now: Instant::now(),
            cancel_sent: false,
            admission: None,
            pool_cache: None,
            replay: BytesMut::new(),
            replay_state: Replay::Off,
            mode: cfg.pool.mode,
            max_msg: cfg.listen.max_message_size.0 as usize,
            cfg: cfg.clone(),
            timer: None,
            server_first: false,
            app,
            user: id.user,
            database: id.database,
            client,
            cin: leftover,
            cout: BytesMut::new(),
            sin: BytesMut::new(),
            sout: BytesMut::new(),
            server: None,
            expect: Expect::default(),
            in_batch: false,
            status: b'I',
            skip: 0,
            copy_in_ext: false,
            copy_in: false,
            settings,
            stmts: HashMap::new(),
            parsing: Default::default(),
            unsettled: Vec::new(),
            syncs_sent: 0,
            search_path_unsettled: false,
            held: BytesMut::new(),
            closing: Default::default(),
            name_seq: 0,
            unnamed: None,
            unnamed_here: false,
            cancel,
            terminated: false,
            pinned: None,
            dirty: Vec::new(),
            startup,
            resets: Vec::new(),
            pin_sticky: false,
            probe_failures: 0,
            output_backed_up: false,
            backslash_strings: off,
            two_byte_backslash: two_byte,
            may_release: false,
            resync_prepared: false,
            probe: None,
            bound_target: None,
            bound_pool: None,
            bound_inflight: None,
            login_workload: id.workload.clone(),
            workload: id.workload,
            route_override: None,
            floor: None,
            min_lsn: None,
            floor_unknown_since: None,
            wrote: false,
            opaque_settings: false,
            opaque_names: Vec::new(),
            discard_conn: false,
            catalog_ddl: false,
            virtuals: HashMap::new(),
            virtual_portals: HashMap::new(),
            discard_to_sync: false,
        }
    }

    /// Runs the session to its end and cleans up the server connection.
    /// (`&mut self`: a by-value `self` would be stored twice in the future.)
    pub async fn run(&mut self) {
        let result = self.relay().await;
        if let Err(e) = &result {
            Box::pin(self.rescue(e)).await;
        }
        Box::pin(self.finish()).await;
    }

    async fn relay(&mut self) -> Result<(), SessionError> {
        let mut shutting_down = *self.app.shutdown_signal().borrow();
        loop {
            self.process_client().await?;
            if self.terminated {
                // Terminate: what the client sent before it still runs to
                // its end, as it would on PostgreSQL (a COMMIT or an
                // autocommit write is not cancelled); nothing more goes to
                // the client, nothing more is read from it.
                self.cout.clear();
                if self.server.is_none() || (self.is_clean() && self.sin.is_empty()) {
                    return Ok(());
                }
                if self.in_batch || self.copy_in {
                    // The server waits for the client: a Sync that will
                    // never come (the batch is uncommitted; PostgreSQL rolls
                    // it back when the client leaves), or COPY data. The
                    // connection is cancelled and closed.
                    return Err(SessionError::ClientGone);
                }
            }
            let sending = !self.sout.is_empty();
            if let Err(e) = self.flush() {
                self.retry_or(e)?;
                continue;
            }
            if sending && self.sout.is_empty() {
                // The last bytes for the server went out after its
                // ReadyForQuery (e.g. CopyData a failed COPY still sent):
                // the transaction may be over with nothing more to come.
                self.maybe_release();
            }
            // Requests held back while output to the client was backed up:
            // the flush made room, so take them now (nothing else would
            // wake this session for them).
            if self.output_backed_up && self.cout.len() < COUT_HIGH {
                self.output_backed_up = false;
                continue;
            }
            self.end_if_drained(shutting_down)?;
            let event = self.wait(shutting_down).await;
            self.now = Instant::now();
            let event = match event {
                Ok(ev) => ev,
                Err(e) => {
                    self.retry_or(e)?;
                    continue;
                }
            };
            match event {
                Event::ClientReadable => self.read_client()?,
                Event::ServerReadable => {
                    if let Err(e) = self.read_server().and_then(|_| self.scan_server()) {
                        self.retry_or(e)?;
                        continue;
                    }
                    self.maybe_release();
                }
                Event::Writable | Event::Tick => {}
                Event::Idle => {
                    for b in [&mut self.cin, &mut self.sin, &mut self.cout, &mut self.sout, &mut self.replay, &mut self.held] {
                        if b.is_empty() {
                            *b = BytesMut::new();
                        }
                    }
                }
                Event::Shutdown => shutting_down = true,
                Event::Removed => self.removing = true,
                Event::Timeout(Timeout::Query) => self.cancel_query(),
                Event::Timeout(Timeout::IdleInTransaction) => {
                    return Err(SessionError::Timeout(
                        sqlstate::IDLE_IN_TRANSACTION_TIMEOUT,
                        "terminating connection due to idle-in-transaction timeout (timeouts.idle_in_transaction); the transaction was rolled back",
                    ))
                }
                Event::Timeout(Timeout::ClientIdle) => {
                    return Err(SessionError::Timeout(
                        sqlstate::IDLE_SESSION_TIMEOUT,
                        "terminating connection due to idle-session timeout (timeouts.client_idle)",
                    ))
                }
            }
        }
    }

    /// timeouts.query: cancel what runs on the server; the client gets the
    /// server's 57014 and the session goes on.
    fn cancel_query(&mut self) {
        self.cancel_sent = true;
        // Counted in flight until the server took it: if the query ends
        // first, the connection is not reused (see `CancelSlot::release`).
        if let Some((t, in_flight)) = self.cancel.begin_cancel() {
            tracing::info!(parent: &self.span, "query timeout: cancelling the running query");
            tokio::spawn(async move {
                if let Ok(false) = ServerConn::cancel(t.peer, t.pid, t.secret).await {
                    in_flight.unacknowledged(t);
                }
            });
        }
    }

    /// After a change to `settings`: what is derived from them.
    pub(super) fn settings_changed(&mut self) {
        self.settings_fp = fingerprint(&self.settings);
        self.tx_defaults = tx_defaults(&self.settings);
    }

    /// Picks up a reload: the config and topology in force now. True when
    /// they changed (a target chosen before must be chosen again: replica
    /// indexes and the writer are the old topology's).
    pub(super) fn refresh_config(&mut self) -> bool {
        let generation = self.app.generation();
        if generation == self.generation {
            return false;
        }
        self.generation = generation;
        self.cfg = self.app.config();
        self.topo = self.app.topology();
        true
    }

    /// The last ReadyForQuery said the transaction failed, and nothing sent
    /// since can have changed that.
    fn in_failed_transaction(&self) -> bool {
        self.status == b'E' && self.expect.is_empty()
    }

    /// Classification and session effects only matter in transaction mode.
    fn tracks_state(&self) -> bool {
        self.mode == PoolMode::Transaction
    }

    /// Classifies SQL text as sent (up to its NUL; see `state::classify_text`).
    fn analyze(&self, sql: &[u8]) -> crate::router::Analysis {
        state::classify_text(sql, &self.cfg.routing.write_functions, self.backslash_strings, self.two_byte_backslash)
    }

}

#[derive(Debug, Clone, Copy)]
enum Timeout {
    Query,
    IdleInTransaction,
    ClientIdle,
}

#[derive(Debug, Clone, Copy)]
enum Event {
    /// A reload removed the client's database or user.
    Removed,
    /// Nothing happened; re-check the state (drain quiet period).
    Tick,
    Timeout(Timeout),
    Idle,
    ClientReadable,
    ServerReadable,
    Writable,
    Shutdown,
}

/// Cheap check: does the SQL start (after blanks) with this lower-case word?
fn starts_with_word(sql: &[u8], word: &[u8]) -> bool {
    let start = sql.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(sql.len());
    sql.len() >= start + word.len() && sql[start..start + word.len()].eq_ignore_ascii_case(word)
}
