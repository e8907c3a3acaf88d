//! Statement classification: is a query string certainly a read (safe for a
//! replica), and what does it do to session state (SET/RESET, features that
//! tie a client to one server connection, statements that may release such
//! state)? Anything not certainly a read is a write.

use super::lex::{Lexer, Tok};
use super::settings::{custom_settings_in, proxy_name, reset_statement, set_config_call, set_statement};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Class {
    Read,
    #[default]
    Write,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TxControl {
    #[default]
    None,
    /// `read_only`: READ ONLY (Some(true)), READ WRITE (Some(false)), or
    /// neither (None: the session's default_transaction_read_only decides).
    Begin { read_only: Option<bool> },
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteHint {
    Primary,
    Replica,
    Auto,
}

/// Everything pgfleet needs to know about one query string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Analysis {
    pub class: Class,
    /// Transaction control of the first statement.
    pub tx: TxControl,
    /// Session-level settings changed by SET / RESET / set_config(..., false)
    /// (lower-case names); `reset_all` for RESET ALL / DISCARD ALL.
    pub set_names: Vec<String>,
    /// Of those, the ones set back to the session's start value: `RESET x`,
    /// `SET x TO DEFAULT` (and `SET TIME ZONE LOCAL`).
    pub reset_names: Vec<String>,
    pub reset_all: bool,
    /// Session-only state that ties the client to its server connection.
    pub pin: Option<&'static str>,
    /// The pinned state is of a kind the end-of-transaction check cannot
    /// see (a setting named at run time, LOAD, a dblink connection): the
    /// client stays pinned until it leaves.
    pub sticky_pin: bool,
    /// May release such state (UNLISTEN, unlock, DROP, CLOSE, DEALLOCATE, DISCARD).
    pub may_release: bool,
    /// DEALLOCATE ALL / DISCARD ALL: every prepared statement is gone.
    pub dealloc_all: bool,
    /// `DEALLOCATE [PREPARE] name`: the name.
    pub deallocate: Option<String>,
    pub route_hint: Option<RouteHint>,
    pub workload_hint: Option<String>,
    /// `SET pgfleet.<name> = value` / `RESET pgfleet.<name>` (value None).
    pub proxy_set: Option<(String, Option<String>)>,
    /// `SHOW pgfleet.<name>`.
    pub proxy_show: Option<String>,
    pub statements: usize,
    /// `name_hash` of each function name called: for a read, the routing
    /// asks the function catalog whether one may write; for any statement,
    /// whether one may change session state (settings, locks) out of sight.
    pub calls: Vec<u32>,
    /// Creates, changes or drops functions (or extensions): the function
    /// catalog is stale once its transaction ends.
    pub catalog_ddl: bool,
    /// `SET LOCAL search_path` / `SET LOCAL SCHEMA`: statements prepared
    /// in the rest of the transaction name other tables.
    pub local_search_path: bool,
    /// DO or CALL: code pgfleet cannot see into, which may change session
    /// settings (`set_config(..., false)`, `SET` in PL/pgSQL).
    pub opaque: bool,
    /// Custom settings a DO block's code sets (`custom_settings_in`).
    pub opaque_settings: Vec<String>,
}

impl Analysis {
    /// Whether running this statement changes what a session carries.
    /// Records a called function's name hash (once).
    pub fn add_call(&mut self, h: u32) {
        if self.calls.contains(&h) {
            return;
        }
        if self.calls.len() == MAX_CALLS {
            // Not worth looking each one up (and a linear `contains` over
            // thousands would cost quadratic time): code pgfleet does not
            // see into, as a DO block.
            self.class = Class::Write;
            self.opaque = true;
            return;
        }
        self.calls.push(h);
    }

    pub fn has_session_effects(&self) -> bool {
        self.pin.is_some() || !self.set_names.is_empty() || self.reset_all || self.may_release || self.dealloc_all
    }
}

/// Distinct functions recorded per query string (see `add_call`).
const MAX_CALLS: usize = 256;

/// Tokens of one statement looked at together. A longer statement (a bulk
/// INSERT, or a hostile run of parentheses) is looked at in slices of this
/// many, so memory stays bounded whatever the message size.
const MAX_TOKENS: usize = 1 << 14;

/// Functions that write, take locks or need the primary's session.
const WRITE_FUNCTIONS: &[&str] = &[
    "nextval", "setval", "currval", "lastval", "set_config", "pg_notify", "txid_current",
    "pg_current_xact_id", "txid_current_if_assigned", "pg_current_xact_id_if_assigned",
    "pg_current_wal_lsn", "pg_current_wal_insert_lsn", "pg_current_wal_flush_lsn",
    "pg_switch_wal", "pg_create_restore_point", "pg_reload_conf", "pg_rotate_logfile",
    "pg_terminate_backend", "pg_cancel_backend", "pg_logical_emit_message", "pg_promote",
    "pg_create_physical_replication_slot", "pg_create_logical_replication_slot",
    "pg_drop_replication_slot", "pg_stat_reset", "pg_stat_reset_shared",
    "pg_stat_reset_single_table_counters", "pg_stat_reset_single_function_counters",
    "pg_backup_start", "pg_backup_stop", "pg_start_backup", "pg_stop_backup",
    "dblink_exec", "dblink", "dblink_connect", "dblink_connect_u", "dblink_open", "dblink_send_query",
    "pg_import_system_collations", "pg_replication_slot_advance", "pg_copy_physical_replication_slot",
    "pg_copy_logical_replication_slot", "pg_logical_slot_get_changes", "pg_logical_slot_get_binary_changes",
    "setseed", "gin_clean_pending_list",
    // Run a query given as text: pgfleet cannot see what it does.
    "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema", "cursor_to_xml", "cursor_to_xmlschema", "ts_stat",
    "ts_rewrite",
];

const PIN_FUNCTIONS: &[&str] =
    &["pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared"];

const RELEASE_FUNCTIONS: &[&str] = &["pg_advisory_unlock", "pg_advisory_unlock_shared", "pg_advisory_unlock_all"];

pub(super) fn is_word(t: Option<&Tok>, w: &str) -> bool {
    matches!(t, Some(Tok::Word(x)) if x.eq_ignore_ascii_case(w))
}

fn word_is_write_function(name: &str, extra: &[String]) -> bool {
    // Byte-wise: a multi-byte character at the boundary must not panic.
    let lower_starts = |p: &str| name.as_bytes().get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p.as_bytes()));
    WRITE_FUNCTIONS.iter().any(|f| f.eq_ignore_ascii_case(name))
        || lower_starts("pg_advisory_")
        || lower_starts("pg_try_advisory_")
        || lower_starts("lo_")
        || lower_starts("pg_stat_reset")
        || lower_starts("pg_replication_origin_")
        || lower_starts("brin_") // brin_summarize_new_values, brin_summarize_range, ...
        || lower_starts("pg_wal_replay_") // pause/resume a standby's replay
        || lower_starts("pg_file_") // adminpack: writes files on the server
        // A schema-qualified entry ("app.charge") names the function `charge`.
        || extra.iter().any(|f| f.rsplit('.').next().unwrap_or(f).eq_ignore_ascii_case(name))
}

/// Classifies a query string. `write_functions`: the application's own.
pub fn classify(sql: &str, write_functions: &[String]) -> Analysis {
    classify_as(sql, write_functions, false)
}

/// `classify` for a session with `standard_conforming_strings = off`
/// (`backslash_strings`: a backslash escapes a quote in '' strings).
pub fn classify_as(sql: &str, write_functions: &[String], backslash_strings: bool) -> Analysis {
    let mut a = Analysis { class: Class::Read, ..Analysis::default() };
    let mut lx = Lexer::with_backslash_strings(sql, backslash_strings);
    // Tokens of one statement: on the stack, spilling to the heap only for
    // statements longer than STACK_TOKENS (no allocation in the common case).
    const STACK_TOKENS: usize = 48;
    let mut stack = [Tok::Semi; STACK_TOKENS];
    let mut heap: Vec<Tok> = Vec::new();
    loop {
        let mut n = 0;
        heap.clear();
        let mut end = true;
        // Whether this statement outgrew MAX_TOKENS: its first slice was
        // looked at as a statement, the rest as `statement_slice`s.
        let mut sliced = false;
        for t in lx.by_ref() {
            if t == Tok::Semi {
                end = false;
                break;
            }
            if n < STACK_TOKENS {
                stack[n] = t;
            } else {
                if n == STACK_TOKENS {
                    heap.extend_from_slice(&stack);
                }
                if heap.len() == MAX_TOKENS {
                    next_slice(&mut heap, &mut sliced, write_functions, &mut a);
                }
                heap.push(t);
            }
            n += 1;
        }
        if sliced {
            statement_slice(&heap, write_functions, &mut a);
        } else if n > 0 {
            a.statements += 1;
            let toks = if n <= STACK_TOKENS { &stack[..n] } else { &heap[..] };
            statement(toks, write_functions, &mut a);
        }
        if end {
            break;
        }
    }
    for h in &lx.hints {
        hint(h, &mut a);
    }
    if lx.unicode_names {
        // A U&"..." name: its escapes (and a UESCAPE clause that changes
        // them) are not decoded, so what it names, a function such as
        // `set_config` or a setting, is not known: the client keeps its
        // connection, and the string runs on the primary.
        a.class = Class::Write;
        a.pin = a.pin.or(Some("a name with Unicode escapes (U&\"...\")"));
        a.sticky_pin = true;
    }
    if a.statements == 0 {
        a.class = Class::Write;
    }
    a
}

/// Tokens a slice repeats from the one before it, so that a call (a name
/// and its parenthesis, `s.f(`) is whole in one of them.
const SLICE_OVERLAP: usize = 4;

/// A statement's tokens filled a slice (`MAX_TOKENS`): the first is
/// looked at as the statement, later ones as `statement_slice`s; the last
/// few tokens stay for the next slice. (Out of the token loop: rare.)
#[cold]
#[inline(never)]
fn next_slice<'a>(heap: &mut Vec<Tok<'a>>, sliced: &mut bool, extra: &[String], a: &mut Analysis) {
    if *sliced {
        statement_slice(heap, extra, a);
    } else {
        a.statements += 1;
        statement(heap, extra, a);
        *sliced = true;
    }
    heap.drain(..MAX_TOKENS - SLICE_OVERLAP);
}

/// A slice of an over-long statement (`MAX_TOKENS`), after its start: the
/// statement counts as a write, and the calls in the slice count as in any
/// statement (writers, pins, `set_config`).
fn statement_slice(t: &[Tok], extra: &[String], a: &mut Analysis) {
    a.class = Class::Write;
    let mut read = false;
    functions(t, extra, a, &mut read);
    if creates_temp(t) {
        a.pin = a.pin.or(Some("a temporary object (CREATE TEMP, INTO TEMP or pg_temp)"));
    }
}

/// The hash a function name is looked up by (FNV-1a). Unquoted names are
/// hashed folded to lower case, as PostgreSQL stores them; the catalog
/// hashes `pg_proc.proname` exactly.
pub fn name_hash(name: &[u8], fold: bool) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in name {
        let b = if fold { b.to_ascii_lowercase() } else { b };
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    h
}

fn hint(text: &str, a: &mut Analysis) {
    for part in text.split(|c: char| c.is_whitespace() || c == ',') {
        match part.split_once('=') {
            Some(("route", v)) => {
                a.route_hint = match v {
                    "primary" => Some(RouteHint::Primary),
                    "replica" => Some(RouteHint::Replica),
                    "auto" => Some(RouteHint::Auto),
                    _ => a.route_hint,
                }
            }
            Some(("workload", v)) if !v.is_empty() => a.workload_hint = Some(v.to_string()),
            _ => {}
        }
    }
}

/// Upper-cases a keyword into a stack buffer (longer words never match one).
fn keyword<'a>(w: &str, buf: &'a mut [u8; 12]) -> &'a [u8] {
    if w.len() > buf.len() {
        return b"";
    }
    for (d, s) in buf.iter_mut().zip(w.bytes()) {
        *d = s.to_ascii_uppercase();
    }
    &buf[..w.len()]
}

fn statement(t: &[Tok], extra: &[String], a: &mut Analysis) {
    let mut kw = [0u8; 12];
    let first = match t[0] {
        Tok::Word(w) => keyword(w, &mut kw),
        Tok::Punct(b'(') => b"SELECT", // (SELECT ...) UNION ...
        _ => {
            a.class = Class::Write;
            return;
        }
    };
    let mut read = false;
    match first {
        b"SELECT" | b"VALUES" | b"TABLE" | b"WITH" => read = !has_write_marker(t),
        b"SHOW" => {
            read = true;
            if let Some(name) = proxy_name(t, 1) {
                a.proxy_show = Some(name);
            }
        }
        b"EXPLAIN" => {
            // ANALYZE runs the statement: any spelling PostgreSQL accepts.
            let analyze = t.iter().any(|x| match x {
                Tok::Word(w) => w.eq_ignore_ascii_case("ANALYZE") || w.eq_ignore_ascii_case("ANALYSE"),
                Tok::Ident(w) => *w == "analyze" || *w == "analyse",
                _ => false,
            });
            let runs_write = || has_write_marker(t) || t.iter().any(|x| is_word(Some(x), "CREATE") || is_word(Some(x), "EXECUTE"));
            read = !(analyze && (runs_write() || !explains_a_query(t)));
        }
        b"BEGIN" | b"START" => {
            // A hot standby refuses serializable transactions (0A000).
            let serializable = t.iter().any(|x| is_word(Some(x), "SERIALIZABLE"));
            if a.statements == 1 {
                a.tx = TxControl::Begin { read_only: has_read_only(t) };
                read = !serializable;
            } else {
                // Not the string's first statement (`SET ...; BEGIN`): the
                // transaction it opens decides where the rest runs, so only a
                // read-only one may go to a replica.
                read = has_read_only(t) == Some(true) && !serializable;
            }
        }
        b"COMMIT" | b"END" | b"ROLLBACK" | b"ABORT" => {
            if a.statements == 1 && !is_word(t.get(1), "PREPARED") {
                a.tx = TxControl::End;
            }
            read = !is_word(t.get(1), "PREPARED");
        }
        b"SET" => read = set_statement(t, a),
        b"RESET" => read = reset_statement(t, a),
        b"DISCARD" => {
            if is_word(t.get(1), "ALL") {
                a.reset_all = true;
                a.dealloc_all = true;
            }
            a.may_release = true;
        }
        b"DEALLOCATE" => {
            let i = if is_word(t.get(1), "PREPARE") { 2 } else { 1 };
            a.dealloc_all |= is_word(t.get(i), "ALL");
            if !is_word(t.get(i), "ALL") {
                a.deallocate = match t.get(i) {
                    Some(Tok::Word(w)) => Some(w.to_ascii_lowercase()),
                    Some(Tok::Ident(w)) => Some(w.to_string()),
                    _ => None,
                };
            }
            a.may_release = true;
        }
        b"PREPARE" if !is_word(t.get(1), "TRANSACTION") => {
            a.pin = a.pin.or(Some("PREPARE (an SQL-level prepared statement)"));
        }
        b"LISTEN" => a.pin = a.pin.or(Some("LISTEN")),
        b"LOAD" => {
            a.pin = a.pin.or(Some("LOAD (a library loaded into the server process)"));
            a.sticky_pin = true;
        }
        b"DO" | b"CALL" => {
            a.opaque = true;
            for x in t {
                if let Tok::Str(code) = x {
                    custom_settings_in(code, &mut a.opaque_settings);
                    // `DO $$ BEGIN CREATE FUNCTION ...`: the catalog too.
                    a.catalog_ddl |= creates_functions(code);
                }
            }
        }
        b"UNLISTEN" | b"CLOSE" | b"DROP" => a.may_release = true,
        b"DECLARE" if t.windows(2).any(|w| is_word(Some(&w[0]), "WITH") && is_word(Some(&w[1]), "HOLD")) => {
            a.pin = a.pin.or(Some("DECLARE ... WITH HOLD (a cursor that outlives its transaction)"));
        }
        _ => {}
    }
    if matches!(first, b"CREATE" | b"ALTER" | b"DROP") {
        // CREATE [OR REPLACE] FUNCTION, ALTER FUNCTION ... VOLATILE, DROP
        // EXTENSION, ...: what the function catalog holds may change.
        a.catalog_ddl |= t.iter().take(5).any(|x| {
            ["FUNCTION", "PROCEDURE", "AGGREGATE", "ROUTINE", "EXTENSION", "SCHEMA"].iter().any(|w| is_word(Some(x), w))
        });
    }
    // Temporary objects: CREATE TEMP, `SELECT ... INTO TEMP x` (never a
    // read, so plain reads skip this), `CREATE TABLE pg_temp.x`,
    // `CREATE FUNCTION pg_temp.f()`, and these under EXPLAIN ANALYZE.
    let may_create = match first {
        b"CREATE" | b"EXPLAIN" => true,
        b"SELECT" | b"WITH" => !read,
        _ => false,
    };
    if may_create && creates_temp(t) {
        a.pin = a.pin.or(Some("a temporary object (CREATE TEMP, INTO TEMP or pg_temp)"));
    }
    functions(t, extra, a, &mut read);
    if !read {
        a.class = Class::Write;
    }
}

/// Whether code (a DO block's) creates or replaces functions.
fn creates_functions(code: &str) -> bool {
    let lower = code.to_ascii_lowercase();
    lower.contains("create") && ["function", "procedure", "aggregate", "extension"].iter().any(|w| lower.contains(w))
}

/// Whether the statement an EXPLAIN explains (after its options) is a
/// query: `EXPLAIN ANALYZE REFRESH MATERIALIZED VIEW ...` runs a write.
fn explains_a_query(t: &[Tok]) -> bool {
    let mut i = 1;
    if t.get(i) == Some(&Tok::Punct(b'(')) {
        let mut depth = 0;
        while let Some(x) = t.get(i) {
            match x {
                Tok::Punct(b'(') => depth += 1,
                Tok::Punct(b')') => {
                    depth -= 1;
                    if depth == 0 {
                        i += 1;
                        break;
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }
    while ["ANALYZE", "ANALYSE", "VERBOSE"].iter().any(|w| is_word(t.get(i), w)) {
        i += 1;
    }
    match t.get(i) {
        Some(Tok::Punct(b'(')) => true,
        Some(Tok::Word(w)) => ["SELECT", "WITH", "VALUES", "TABLE"].iter().any(|k| w.eq_ignore_ascii_case(k)),
        _ => false,
    }
}

/// Looks at every function call: writers, session pins, releases, set_config.
fn functions(t: &[Tok], extra: &[String], a: &mut Analysis, read: &mut bool) {
    for i in 0..t.len().saturating_sub(1) {
        if t[i + 1] != Tok::Punct(b'(') || names_a_table(t, i) {
            continue;
        }
        let name = match t[i] {
            Tok::Word(name) => name,
            // A quoted name ("nextval", jOOQ's "public"."f") is exact: only
            // an all-lower-case one names a built-in (compared as a word).
            Tok::Ident(name) if !name.bytes().any(|c| c.is_ascii_uppercase() || c == b'"') => name,
            Tok::Ident(name) => {
                // `"a""b"` names the function a"b.
                let h = if name.contains('"') {
                    name_hash(name.replace("\"\"", "\"").as_bytes(), false)
                } else {
                    name_hash(name.as_bytes(), false)
                };
                a.add_call(h);
                continue;
            }
            _ => continue,
        };
        if word_is_write_function(name, extra) {
            *read = false;
        }
        // (`cache.set(`, `jobs.check(`: a schema's function, whatever its name.)
        let qualified = i > 0 && t[i - 1] == Tok::Punct(b'.');
        if qualified || !(matches!(t[i], Tok::Word(_)) && grammar_word(name)) {
            a.add_call(name_hash(name.as_bytes(), matches!(t[i], Tok::Word(_))));
        }
        if PIN_FUNCTIONS.iter().any(|f| f.eq_ignore_ascii_case(name)) {
            a.pin = a.pin.or(Some("a session-level advisory lock (pg_advisory_lock)"));
        }
        if RELEASE_FUNCTIONS.iter().any(|f| f.eq_ignore_ascii_case(name)) {
            a.may_release = true;
        }
        if name.eq_ignore_ascii_case("dblink_connect") || name.eq_ignore_ascii_case("dblink_connect_u") {
            // The connection lives on in the server process, named or not.
            a.pin = a.pin.or(Some("dblink_connect (a connection kept by the server process)"));
            a.sticky_pin = true;
        }
        if name.eq_ignore_ascii_case("set_config") {
            set_config_call(&t[i + 2..], a);
        }
    }
}

/// Whether the name at `i`, before a parenthesis, is a table's (with its
/// column list): `INSERT INTO [s.]t (a, b)`, `CREATE TABLE t (`, ...
fn names_a_table(t: &[Tok], i: usize) -> bool {
    let before = match i.checked_sub(1).map(|j| &t[j]) {
        Some(Tok::Punct(b'.')) => i.checked_sub(3).map(|j| &t[j]),
        other => other,
    };
    let mut buf = [0u8; 12];
    matches!(before, Some(Tok::Word(w)) if matches!(keyword(w, &mut buf), b"INTO" | b"TABLE" | b"ONLY" | b"REFERENCES" | b"UPDATE" | b"EXISTS"))
}

/// Words the grammar puts before a parenthesis that are not calls of the
/// application's functions (`IN (`, `EXISTS (`, `numeric(10, 2)`, ...).
fn grammar_word(w: &str) -> bool {
    let mut buf = [0u8; 12];
    matches!(
        keyword(w, &mut buf),
        b"IN" | b"VALUES" | b"EXISTS" | b"ANY" | b"ALL" | b"SOME" | b"FROM" | b"OVER" | b"AS" | b"ON" | b"AND"
            | b"OR" | b"NOT" | b"WHERE" | b"SELECT" | b"JOIN" | b"USING" | b"FILTER" | b"WITHIN" | b"ROW"
            | b"ARRAY" | b"CAST" | b"COALESCE" | b"NULLIF" | b"GREATEST" | b"LEAST" | b"LATERAL" | b"WITH"
            | b"UNION" | b"INTERSECT" | b"EXCEPT" | b"BY" | b"WHEN" | b"THEN" | b"ELSE" | b"CASE" | b"IS"
            | b"LIKE" | b"ILIKE" | b"BETWEEN" | b"DISTINCT" | b"INTO" | b"TABLE" | b"GROUPING" | b"ROWS"
            | b"RANGE" | b"PARTITION" | b"OF" | b"HAVING" | b"LIMIT" | b"OFFSET" | b"NUMERIC" | b"DECIMAL"
            | b"VARCHAR" | b"CHAR" | b"CHARACTER" | b"VARYING" | b"TIMESTAMP" | b"TIME" | b"INTERVAL"
            | b"BIT" | b"FLOAT" | b"POSITION" | b"SUBSTRING" | b"TRIM" | b"OVERLAY" | b"EXTRACT"
            | b"XMLELEMENT" | b"XMLFOREST" | b"XMLPARSE" | b"XMLSERIALIZE" | b"NORMALIZE" | b"TREAT"
            | b"SET" | b"CONFLICT" | b"KEY" | b"UNIQUE" | b"CHECK" | b"RETURNING" | b"DEFAULT"
    )
}

/// Locking clauses (FOR UPDATE/SHARE/NO KEY UPDATE/KEY SHARE), SELECT INTO,
/// and data-modifying statements nested anywhere (CTEs).
fn has_write_marker(t: &[Tok]) -> bool {
    let mut after_for = false;
    for x in t {
        let Tok::Word(w) = x else {
            after_for = false;
            continue;
        };
        let hit = match w.len() {
            2 => after_for && w.eq_ignore_ascii_case("NO"),
            3 => after_for && w.eq_ignore_ascii_case("KEY"),
            4 => w.eq_ignore_ascii_case("INTO"),
            5 => w.eq_ignore_ascii_case("MERGE") || (after_for && w.eq_ignore_ascii_case("SHARE")),
            6 => w.eq_ignore_ascii_case("INSERT") || w.eq_ignore_ascii_case("UPDATE") || w.eq_ignore_ascii_case("DELETE"),
            8 => w.eq_ignore_ascii_case("TRUNCATE"),
            _ => false,
        };
        if hit {
            return true;
        }
        after_for = w.len() == 3 && w.eq_ignore_ascii_case("FOR");
    }
    false
}

/// The access mode a BEGIN / START TRANSACTION asks for: Some(true) for READ
/// ONLY, Some(false) for READ WRITE (the last one wins, as in PostgreSQL),
/// None when it names neither.
fn has_read_only(t: &[Tok]) -> Option<bool> {
    let mut mode = None;
    for w in t.windows(2) {
        if is_word(Some(&w[0]), "READ") {
            if is_word(Some(&w[1]), "ONLY") {
                mode = Some(true);
            } else if is_word(Some(&w[1]), "WRITE") {
                mode = Some(false);
            }
        }
    }
    mode
}

/// `INTO TEMP|TEMPORARY`, `CREATE [GLOBAL|LOCAL] TEMP` anywhere (under
/// EXPLAIN ANALYZE), or a `pg_temp.` (or `pg_temp_N.`) qualified name.
fn creates_temp(t: &[Tok]) -> bool {
    let temp = |x: &Tok| is_word(Some(x), "TEMP") || is_word(Some(x), "TEMPORARY");
    // CREATE [OR REPLACE] [LOCAL | GLOBAL] TEMP ...
    let create_temp = (0..t.len()).any(|i| is_word(t.get(i), "CREATE") && t[i + 1..].iter().take(4).any(temp));
    // INTO [LOCAL | GLOBAL] TEMP x
    let scope = |x: &Tok| is_word(Some(x), "LOCAL") || is_word(Some(x), "GLOBAL");
    let into_temp = t.windows(3).any(|w| is_word(Some(&w[0]), "INTO") && scope(&w[1]) && temp(&w[2]));
    create_temp || into_temp || t.windows(2).any(|w| {
        (is_word(Some(&w[0]), "INTO") && (is_word(Some(&w[1]), "TEMP") || is_word(Some(&w[1]), "TEMPORARY")))
            || (w[1] == Tok::Punct(b'.')
                && match w[0] {
                    Tok::Word(n) => n.len() >= 7 && n.as_bytes()[..7].eq_ignore_ascii_case(b"pg_temp"),
                    Tok::Ident(n) => n.starts_with("pg_temp"),
                    _ => false,
                })
    })
}

#[cfg(test)]
#[path = "classify_tests.rs"]
mod tests;
