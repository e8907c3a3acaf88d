//! What statements do to session settings: `SET` / `RESET` (and the
//! `pgfleet.*` virtual settings), `set_config(...)` calls, and the custom
//! settings a block of code (a DO block, a function body) sets.

use super::classify::{is_word, Analysis, RouteHint};
use super::lex::Tok;

/// `set_config('name', value, is_local)`: session-level when is_local is false.
/// Only a plain literal name and a lone literal `is_local` are taken at
/// their word; anything else (`NOT true`, `E'search\_path'`, a name built
/// at run time, a call not closed within `SCAN` tokens) pins the client.
pub(super) fn set_config_call(args: &[Tok], a: &mut Analysis) {
    /// Tokens looked at for the closing parenthesis (a bound: nested
    /// `set_config(set_config(...` would otherwise cost quadratic time).
    const SCAN: usize = 256;
    let mut depth = 0;
    let mut commas = Vec::new();
    let mut last = None;
    for (j, x) in args.iter().enumerate().take(SCAN) {
        match x {
            Tok::Punct(b'(') => depth += 1,
            Tok::Punct(b')') if depth == 0 => {
                last = Some(j);
                break;
            }
            Tok::Punct(b')') => depth -= 1,
            Tok::Punct(b',') if depth == 0 => commas.push(j),
            _ => {}
        }
    }
    let computed = |a: &mut Analysis| {
        a.pin = a.pin.or(Some("set_config with a computed name or scope"));
        a.sticky_pin = true;
    };
    let (Some(end), &[_, second]) = (last, commas.as_slice()) else { return computed(a) };
    // The third argument, when it is one token.
    let is_local = args[second + 1..end].first().filter(|_| end == second + 2);
    let local = matches!(is_local, Some(Tok::Word(w)) if w.eq_ignore_ascii_case("true"))
        || matches!(is_local, Some(Tok::Str(s)) if matches!(s.to_ascii_lowercase().as_str(), "t" | "true" | "on" | "yes" | "1"));
    let session = matches!(is_local, Some(Tok::Word(w)) if w.eq_ignore_ascii_case("false"))
        || matches!(is_local, Some(Tok::Str(s)) if matches!(s.to_ascii_lowercase().as_str(), "f" | "false" | "off" | "no" | "0"));
    if local {
        return;
    }
    // A name read as written: not an E'' escape, a doubled quote or a
    // string continued over lines.
    let plain = |n: &str| !n.is_empty() && !n.contains(['\\', '\'', '\n', '\r']);
    match (args.first(), session) {
        (Some(Tok::Str(name)), true) if args.get(1) == Some(&Tok::Punct(b',')) && plain(name) => {
            a.set_names.push(name.to_ascii_lowercase())
        }
        _ => computed(a),
    }
}

/// A `pgfleet.<name>` setting name at position `i`.
pub(super) fn proxy_name(t: &[Tok], i: usize) -> Option<String> {
    if is_word(t.get(i), "pgfleet") && t.get(i + 1) == Some(&Tok::Punct(b'.')) {
        if let Some(Tok::Word(n)) = t.get(i + 2) {
            return Some(n.to_ascii_lowercase());
        }
    }
    if let Some(Tok::Ident(n)) = t.get(i) {
        if let Some(rest) = n.to_ascii_lowercase().strip_prefix("pgfleet.") {
            return Some(rest.to_string());
        }
    }
    None
}

/// SET ...; returns whether it can run on a replica (SET is harmless there).
pub(super) fn set_statement(t: &[Tok], a: &mut Analysis) -> bool {
    let mut i = 1;
    // `local.x`, `session.x`, `transaction.x` are custom settings, not modifiers.
    let modifier = t.get(2) != Some(&Tok::Punct(b'.'));
    if modifier && (is_word(t.get(i), "LOCAL") || is_word(t.get(i), "TRANSACTION")) {
        // Transaction-local: nothing to track, but search_path matters to
        // the statements prepared in the transaction.
        a.local_search_path = is_word(t.get(i + 1), "SCHEMA") || dotted_name(t, i + 1) == "search_path";
        // A standby refuses a serializable or read-write transaction: with
        // a `BEGIN` in the same string, it goes to the primary.
        let serializable = t.iter().any(|x| is_word(Some(x), "SERIALIZABLE") || matches!(x, Tok::Str(v) if v.eq_ignore_ascii_case("serializable")));
        let read_write = t.windows(2).any(|w| is_word(Some(&w[0]), "READ") && is_word(Some(&w[1]), "WRITE"));
        return !(serializable || read_write);
    }
    if modifier && is_word(t.get(i), "SESSION") {
        i += 1;
        if is_word(t.get(i), "CHARACTERISTICS") {
            for n in ["default_transaction_isolation", "default_transaction_read_only", "default_transaction_deferrable"] {
                a.set_names.push(n.into());
            }
            // May make the session serializable: see below.
            return false;
        }
        if is_word(t.get(i), "AUTHORIZATION") {
            // It resets the role too: both are read back.
            a.set_names.push("session_authorization".into());
            a.set_names.push("role".into());
            return true;
        }
    }
    if let Some(name) = proxy_name(t, i) {
        // `pgfleet . name` is three tokens, `"pgfleet.name"` one; then = or TO.
        let v = if matches!(t.get(i), Some(Tok::Ident(_))) { i + 2 } else { i + 4 };
        let value = match t.get(v) {
            _ if is_word(t.get(v), "DEFAULT") => None,
            Some(Tok::Str(s)) | Some(Tok::Word(s)) | Some(Tok::Ident(s)) => Some(s.to_string()),
            // Not a value pgfleet takes (an unquoted LSN is a number, a
            // slash, ...): refused as invalid, never taken for a RESET.
            _ => Some(String::new()),
        };
        a.proxy_set = Some((name, value));
        return true;
    }
    let name = if is_word(t.get(i), "TIME") && is_word(t.get(i + 1), "ZONE") {
        "timezone".to_string()
    } else if is_word(t.get(i), "SCHEMA") {
        "search_path".to_string()
    } else if is_word(t.get(i), "NAMES") {
        "client_encoding".to_string()
    } else if is_word(t.get(i), "ROLE") {
        "role".to_string()
    } else if is_word(t.get(i), "XML") && is_word(t.get(i + 1), "OPTION") {
        "xmloption".to_string()
    } else {
        dotted_name(t, i)
    };
    if !name.is_empty() {
        // `SET x TO DEFAULT` / `SET x = DEFAULT` / `SET TIME ZONE DEFAULT | LOCAL`.
        let (last, before) = (t.last(), t.len().checked_sub(2).and_then(|k| t.get(k)));
        let assigned_default = is_word(last, "DEFAULT") && (is_word(before, "TO") || before == Some(&Tok::Punct(b'=')));
        let zone = is_word(t.get(i), "TIME") && t.len() == i + 3 && (is_word(last, "DEFAULT") || is_word(last, "LOCAL"));
        if assigned_default || zone {
            a.reset_names.push(name.clone());
        }
        if routes_by(&name) {
            a.route_hint = Some(RouteHint::Primary);
        }
        a.set_names.push(name);
        return true;
    }
    true
}

fn dotted_name(t: &[Tok], mut i: usize) -> String {
    let mut name = String::new();
    loop {
        match t.get(i) {
            Some(Tok::Word(w)) => name.push_str(&w.to_ascii_lowercase()),
            // Setting names are case-insensitive, quoted or not.
            Some(Tok::Ident(w)) => name.push_str(&w.to_ascii_lowercase()),
            _ => break,
        }
        if t.get(i + 1) == Some(&Tok::Punct(b'.')) {
            name.push('.');
            i += 2;
        } else {
            break;
        }
    }
    name
}

pub(super) fn reset_statement(t: &[Tok], a: &mut Analysis) -> bool {
    if is_word(t.get(1), "ALL") {
        a.reset_all = true;
        // default_transaction_read_only and _isolation among them.
        a.route_hint = Some(RouteHint::Primary);
    } else if let Some(name) = proxy_name(t, 1) {
        a.proxy_set = Some((name, None));
    } else if is_word(t.get(1), "SESSION") && is_word(t.get(2), "AUTHORIZATION") {
        a.set_names.push("session_authorization".into());
        a.set_names.push("role".into());
    } else if is_word(t.get(1), "TIME") {
        a.set_names.push("timezone".into());
        a.reset_names.push("timezone".into());
    } else {
        let n = dotted_name(t, 1);
        if !n.is_empty() {
            if routes_by(&n) {
                a.route_hint = Some(RouteHint::Primary);
            }
            a.set_names.push(n.clone());
            a.reset_names.push(n);
        }
    }
    true
}

/// Settings that decide where the session's transactions go: a session
/// made serializable reads on the primary (a standby refuses it), one made
/// read-only sends its transactions to replicas. Set (or reset) on the
/// primary, their value is known before the next statement is routed: set
/// on a replica, a BEGIN pipelined behind would be routed, and bound to that
/// replica, by the old value. (Sent there as a read, with a hint, not as
/// a write: a write would make the client's next reads wait for its
/// position on the replicas.)
fn routes_by(name: &str) -> bool {
    matches!(name, "default_transaction_isolation" | "default_transaction_read_only")
}

/// Adds the custom settings (`a.b`, lower-cased) that this code sets for the
/// session to `out`: `set_config('a.b', ...)` and `SET [SESSION] a.b`, the
/// ways functions and DO blocks set a tenant id. A name computed at run time
/// is not seen. (Built-in settings need no search: `pg_settings` lists the
/// ones a session changed; it does not list custom ones.)
pub fn custom_settings_in(code: &str, out: &mut Vec<String>) {
    let lower = code.to_ascii_lowercase();
    let b = lower.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$';
    let blanks = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    // A dotted name at `i` (each part starting with a letter or `_`).
    let name_at = |i: usize| {
        let mut j = i;
        while j < b.len() && (ident(b[j]) || b[j] == b'.') {
            j += 1;
        }
        let name = &lower[i..j];
        let ok = name.contains('.')
            && name.split('.').all(|p| p.bytes().next().is_some_and(|c| c.is_ascii_alphabetic() || c == b'_'));
        ok.then(|| name.to_string())
    };
    let mut found = |name: Option<String>| {
        if let Some(n) = name {
            if !out.contains(&n) {
                out.push(n);
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        let word_start = i == 0 || !ident(b[i - 1]);
        if word_start && b[i..].starts_with(b"set_config") {
            let mut j = blanks(i + 10);
            if b.get(j) == Some(&b'(') {
                j = blanks(j + 1);
                if b.get(j) == Some(&b'\'') {
                    found(name_at(j + 1).filter(|n| b.get(j + 1 + n.len()) == Some(&b'\'')));
                }
            }
            i += 10;
        } else if word_start && b[i..].starts_with(b"set") && b.get(i + 3).is_some_and(|c| c.is_ascii_whitespace()) {
            let mut j = blanks(i + 3);
            if b[j..].starts_with(b"session") && b.get(j + 7).is_some_and(|c| c.is_ascii_whitespace()) {
                j = blanks(j + 7);
            }
            found(name_at(j));
            i += 3;
        } else {
            i += 1;
        }
    }
}
