//! A hand-written SQL lexer: just enough of PostgreSQL's lexical rules to
//! never be fooled by comments, quoted identifiers, string literals (incl.
//! E'' and U&''), dollar quoting and multi-statement strings. No allocation.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tok<'a> {
    /// Unquoted identifier or keyword (compare case-insensitively).
    Word(&'a str),
    /// "Quoted identifier" (contents, quotes doubled inside).
    Ident(&'a str),
    /// Any string literal (raw text between the quotes).
    Str(&'a str),
    Num,
    /// `$1`-style parameter.
    Param,
    /// Single punctuation or operator character.
    Punct(u8),
    /// `;` at top level ends a statement.
    Semi,
}

pub struct Lexer<'a> {
    src: &'a str,
    b: &'a [u8],
    pos: usize,
    /// pgfleet hint comments seen: `/* pgfleet: ... */` bodies.
    pub hints: Vec<&'a str>,
    /// A `U&"..."` identifier was read (its escapes are not decoded).
    pub unicode_names: bool,
    /// `standard_conforming_strings = off`: a backslash escapes the next
    /// character in plain '' strings too.
    backslash_strings: bool,
}

impl<'a> Lexer<'a> {
    pub fn new(src: &'a str) -> Lexer<'a> {
        Lexer::with_backslash_strings(src, false)
    }

    /// A lexer for a session with `standard_conforming_strings = off`
    /// (`backslash_strings`), where 'O\'Brien' is one string.
    pub fn with_backslash_strings(src: &'a str, backslash_strings: bool) -> Lexer<'a> {
        Lexer { src, b: src.as_bytes(), pos: 0, hints: Vec::new(), unicode_names: false, backslash_strings }
    }

    fn skip_space_and_comments(&mut self) {
        loop {
            self.pos += run(&self.b[self.pos..], SPACE);
            let rest = &self.b[self.pos..];
            if rest.starts_with(b"--") {
                // PostgreSQL ends a comment at either newline character.
                while self.pos < self.b.len() && !matches!(self.b[self.pos], b'\n' | b'\r') {
                    self.pos += 1;
                }
            } else if rest.starts_with(b"/*") {
                let start = self.pos + 2;
                let mut depth = 1;
                self.pos += 2;
                while self.pos < self.b.len() && depth > 0 {
                    if self.b[self.pos..].starts_with(b"/*") {
                        depth += 1;
                        self.pos += 2;
                    } else if self.b[self.pos..].starts_with(b"*/") {
                        depth -= 1;
                        self.pos += 2;
                    } else {
                        self.pos += 1;
                    }
                }
                let end = if depth == 0 { self.pos - 2 } else { self.pos };
                let body = self.src[start..end].trim();
                // (A bounded number: a hostile run of hint comments must
                // not grow memory with the message.)
                if let Some(h) = body.strip_prefix("pgfleet:").filter(|_| self.hints.len() < 16) {
                    self.hints.push(h.trim());
                }
            } else {
                return;
            }
        }
    }

    /// Reads a quoted run starting at `self.pos` (the opening quote);
    /// `backslash` enables E'' escapes. Returns the inner text.
    fn quoted(&mut self, q: u8, backslash: bool) -> &'a str {
        let start = self.pos + 1;
        self.pos += 1;
        while self.pos < self.b.len() {
            let c = self.b[self.pos];
            if backslash && c == b'\\' {
                // Never past the end: a trailing backslash ends the input.
                self.pos = (self.pos + 2).min(self.b.len());
                continue;
            }
            if c == q {
                if self.b.get(self.pos + 1) == Some(&q) {
                    self.pos += 2;
                    continue;
                }
                let end = self.pos;
                self.pos += 1;
                // 'a' <newline> 'b' is one string, the second part read in
                // the first's mode (E'' escapes included), as PostgreSQL does.
                if q == b'\'' {
                    if let Some(open) = self.continued_at(self.pos) {
                        self.pos = open + 1;
                        continue;
                    }
                }
                // The text runs to the last part's end (parts and what
                // separates them; nothing reads a continued string's text).
                return &self.src[start..end];
            }
            self.pos += 1;
        }
        &self.src[start.min(self.b.len())..]
    }

    /// Where a string constant that ended just before `i` continues: after
    /// whitespace holding a newline (and `--` comments), another quote
    /// (PostgreSQL's `quotecontinue`).
    fn continued_at(&self, mut i: usize) -> Option<usize> {
        let b = self.b;
        let mut newline = false;
        loop {
            match b.get(i)? {
                b'\n' | b'\r' => {
                    newline = true;
                    i += 1;
                }
                // (A vertical tab only after the newline, as scan.l.)
                b' ' | b'\t' | b'\x0c' => i += 1,
                b'\x0b' if newline => i += 1,
                // A `--` comment runs to the newline, before it or after it.
                b'-' if b.get(i + 1) == Some(&b'-') => i += b[i..].iter().position(|c| matches!(c, b'\n' | b'\r'))?,
                b'\'' if newline => return Some(i),
                _ => return None,
            }
        }
    }

    /// `$tag$ ... $tag$` starting at `self.pos`, if it is one.
    fn dollar_quoted(&mut self) -> Option<&'a str> {
        let rest = &self.b[self.pos + 1..];
        let tag_len = rest.iter().position(|c| !(c.is_ascii_alphanumeric() || *c == b'_' || *c >= 0x80))?;
        if rest.get(tag_len) != Some(&b'$') || rest.first().is_some_and(|c| c.is_ascii_digit()) {
            return None;
        }
        let delim = &self.src[self.pos..self.pos + tag_len + 2];
        let body_start = self.pos + tag_len + 2;
        match self.src[body_start..].find(delim) {
            Some(i) => {
                self.pos = body_start + i + delim.len();
                Some(&self.src[body_start..body_start + i])
            }
            None => {
                self.pos = self.b.len();
                Some(&self.src[body_start..])
            }
        }
    }
}

// Byte classes, looked up in one table: the lexer's inner loops run once per
// byte of every query, so a load and a test beat a chain of range checks.
const SPACE: u8 = 1;
const IDENT_START: u8 = 2;
const IDENT: u8 = 4;

static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        let mut k = 0;
        // Vertical tab too (whitespace to PostgreSQL 16+): as punctuation it
        // would split `nextval\v(` from its call.
        if c.is_ascii_whitespace() || c == 0x0b {
            k |= SPACE;
        }
        if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            k |= IDENT_START | IDENT;
        }
        if c.is_ascii_digit() || c == b'$' {
            k |= IDENT;
        }
        t[i] = k;
        i += 1;
    }
    t
};

/// Length of the number at the start of `b`: digits (with `_`, PostgreSQL
/// 16), a fraction, an exponent, or a `0x`/`0o`/`0b` literal. It ends at
/// the first letter that cannot continue it, as PostgreSQL 14 and older
/// read `LIMIT 1FOR UPDATE` (`1` then `FOR`; 15 and later refuse it).
fn number_len(b: &[u8]) -> usize {
    let digits = |mut i: usize, hex: bool| {
        while b.get(i).is_some_and(|c| c.is_ascii_digit() || *c == b'_' || (hex && c.is_ascii_hexdigit())) {
            i += 1;
        }
        i
    };
    if b.len() > 2 && b[0] == b'0' && matches!(b[1], b'x' | b'X' | b'o' | b'O' | b'b' | b'B') && b[2].is_ascii_hexdigit() {
        return digits(2, true);
    }
    let mut i = digits(0, false);
    if b.get(i) == Some(&b'.') && b.get(i + 1) != Some(&b'.') {
        i = digits(i + 1, false);
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(b.get(i + 1), Some(b'+' | b'-')));
        if b.get(i + 1 + sign).is_some_and(u8::is_ascii_digit) {
            i = digits(i + 1 + sign, false);
        }
    }
    i.max(1)
}

/// Length of the leading run of bytes of class `k`.
fn run(b: &[u8], k: u8) -> usize {
    b.iter().position(|&c| CLASS[c as usize] & k == 0).unwrap_or(b.len())
}

fn is_ident_start(c: u8) -> bool {
    CLASS[c as usize] & IDENT_START != 0
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Tok<'a>;

    fn next(&mut self) -> Option<Tok<'a>> {
        self.skip_space_and_comments();
        let c = *self.b.get(self.pos)?;
        let next = self.b.get(self.pos + 1).copied();
        Some(match c {
            b'\'' => Tok::Str(self.quoted(b'\'', self.backslash_strings)),
            b'"' => Tok::Ident(self.quoted(b'"', false)),
            b'e' | b'E' if next == Some(b'\'') => {
                self.pos += 1;
                Tok::Str(self.quoted(b'\'', true))
            }
            b'u' | b'U' if next == Some(b'&') && matches!(self.b.get(self.pos + 2), Some(b'\'') | Some(b'"')) => {
                self.pos += 2;
                let q = self.b[self.pos];
                if q == b'\'' {
                    Tok::Str(self.quoted(q, false))
                } else {
                    // (Escapes not decoded; a UESCAPE clause after it may
                    // change the escape character: see `unicode_names`.)
                    self.unicode_names = true;
                    Tok::Ident(self.quoted(q, false))
                }
            }
            b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if next == Some(b'\'') => {
                self.pos += 1;
                Tok::Str(self.quoted(b'\'', self.backslash_strings))
            }
            b'$' => {
                if next.is_some_and(|d| d.is_ascii_digit()) {
                    self.pos += 1;
                    while self.b.get(self.pos).is_some_and(|d| d.is_ascii_digit()) {
                        self.pos += 1;
                    }
                    Tok::Param
                } else if let Some(body) = self.dollar_quoted() {
                    Tok::Str(body)
                } else {
                    self.pos += 1;
                    Tok::Punct(b'$')
                }
            }
            b';' => {
                self.pos += 1;
                Tok::Semi
            }
            c if is_ident_start(c) => {
                let start = self.pos;
                self.pos += 1 + run(&self.b[start + 1..], IDENT);
                Tok::Word(&self.src[start..self.pos])
            }
            c if c.is_ascii_digit() || (c == b'.' && next.is_some_and(|d| d.is_ascii_digit())) => {
                self.pos += number_len(&self.b[self.pos..]);
                Tok::Num
            }
            c => {
                self.pos += 1;
                Tok::Punct(c)
            }
        })
    }
}
