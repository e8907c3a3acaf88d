//! Password verifiers and the server side of SCRAM-SHA-256 (RFC 5802/7677)
//! and md5 authentication. Comparisons of secrets are constant-time.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// A user's secret as stored in the configuration.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// Plaintext password; a SCRAM verifier is derived from it once at load.
    Plain { password: String, scram: ScramVerifier },
    Scram(ScramVerifier),
    /// "md5" + hex(md5(password || username)).
    Md5(String),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Secret::Plain { .. } => "Secret::Plain(<redacted>)",
            Secret::Scram(_) => "Secret::Scram(<redacted>)",
            Secret::Md5(_) => "Secret::Md5(<redacted>)",
        })
    }
}

impl Secret {
    /// Interprets a configured password: a SCRAM verifier, an md5 verifier
    /// (md5 + 32 hex digits), or plaintext.
    pub fn from_config(value: &str) -> Result<Secret, String> {
        // As PostgreSQL, which refuses an empty password: "" would let in
        // anyone who knows the name (an unset templated value, say).
        if value.is_empty() {
            return Err("empty password (leave it out and use auth.method = \"trust\" if that is meant)".into());
        }
        if value.starts_with("SCRAM-SHA-256$") {
            return ScramVerifier::parse(value)
                .map(Secret::Scram)
                .ok_or_else(|| "malformed SCRAM-SHA-256 verifier".to_string());
        }
        if is_md5_hash(value) {
            return Ok(Secret::Md5(value.to_ascii_lowercase()));
        }
        let verifier = postgres_protocol::password::scram_sha_256(value.as_bytes());
        let scram = ScramVerifier::parse(&verifier).ok_or("could not derive a SCRAM verifier")?;
        Ok(Secret::Plain { password: value.to_string(), scram })
    }

    /// Whether a configured password is stored as a verifier or hash (a
    /// SCRAM-SHA-256 verifier, an md5 hash) rather than in plain text.
    pub fn is_stored(value: &str) -> bool {
        value.starts_with("SCRAM-SHA-256$") || is_md5_hash(value)
    }

    pub fn plaintext(&self) -> Option<&str> {
        match self {
            Secret::Plain { password, .. } => Some(password),
            _ => None,
        }
    }
}

/// `md5` and 32 hex digits: PostgreSQL's stored md5 password.
fn is_md5_hash(value: &str) -> bool {
    value.len() == 35 && value.starts_with("md5") && value[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramVerifier {
    /// Parses "SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>".
    pub fn parse(s: &str) -> Option<ScramVerifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iter, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let iterations: u32 = iter.parse().ok().filter(|i| *i > 0)?;
        let salt = B64.decode(salt).ok()?;
        let stored_key: [u8; 32] = B64.decode(stored).ok()?.try_into().ok()?;
        let server_key: [u8; 32] = B64.decode(server).ok()?.try_into().ok()?;
        Some(ScramVerifier { iterations, salt, stored_key, server_key })
    }
}

/// Why a client's authentication exchange failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// The client sent something that is not a valid SCRAM message.
    Protocol(&'static str),
    /// The proof did not match.
    WrongPassword,
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Constant-time equality for secrets.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Channel binding as negotiated for one exchange.
#[derive(Debug, Clone, Copy, Default)]
pub struct Binding<'a> {
    /// The client chose SCRAM-SHA-256-PLUS.
    pub plus: bool,
    /// We offered SCRAM-SHA-256-PLUS (the connection uses TLS).
    pub offered: bool,
    /// tls-server-end-point data of this connection.
    pub data: &'a [u8],
}

/// Server side of one SCRAM-SHA-256 exchange, after the client-first message.
pub struct ScramServer {
    verifier: ScramVerifier,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    /// What the client's c= attribute must decode to: gs2 header plus the
    /// channel binding data when bound.
    expected_c: Vec<u8>,
}

impl ScramServer {
    /// Consumes the client-first message; returns the state and the
    /// server-first message to send in AuthenticationSASLContinue.
    pub fn start(verifier: &ScramVerifier, client_first: &[u8], cb: Binding) -> Result<(ScramServer, String), AuthFailure> {
        let msg = std::str::from_utf8(client_first).map_err(|_| AuthFailure::Protocol("not UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = msg.split_once(',').ok_or(AuthFailure::Protocol("missing gs2 header"))?;
        match (flag, cb.plus) {
            ("p=tls-server-end-point", true) => {}
            (f, true) if f.starts_with("p=") => return Err(AuthFailure::Protocol("unsupported channel binding type")),
            (_, true) => return Err(AuthFailure::Protocol("SCRAM-SHA-256-PLUS needs channel binding")),
            ("n", false) => {}
            // "y": the client could bind but thinks we cannot; if we offered
            // PLUS, someone removed it on the way (RFC 5802 downgrade check).
            ("y", false) if !cb.offered => {}
            ("y", false) => return Err(AuthFailure::Protocol("channel binding was offered but the client thinks it was not (downgrade?)")),
            (f, false) if f.starts_with("p=") => return Err(AuthFailure::Protocol("channel binding needs SCRAM-SHA-256-PLUS")),
            _ => return Err(AuthFailure::Protocol("malformed gs2 header")),
        }
        let (authzid, bare) = rest.split_once(',').ok_or(AuthFailure::Protocol("missing gs2 header"))?;
        if !authzid.is_empty() {
            return Err(AuthFailure::Protocol("authorization identities are not supported"));
        }
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(AuthFailure::Protocol("missing client nonce"))?;
        let server_nonce: [u8; 18] = rand::random();
        let nonce = format!("{client_nonce}{}", B64.encode(server_nonce));
        let server_first =
            format!("r={nonce},s={},i={}", B64.encode(&verifier.salt), verifier.iterations);
        let state = ScramServer {
            verifier: verifier.clone(),
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            nonce,
            expected_c: {
                let mut c = format!("{flag},{authzid},").into_bytes();
                if cb.plus {
                    c.extend_from_slice(cb.data);
                }
                c
            },
        };
        Ok((state, server_first))
    }

    /// Verifies the client-final message; returns the server-final message.
    pub fn finish(self, client_final: &[u8]) -> Result<String, AuthFailure> {
        self.finish_with_key(client_final).map(|(m, _)| m)
    }

    /// `finish`, also returning the ClientKey the proof revealed (what lets
    /// pgfleet log in to PostgreSQL as this user without the password).
    pub fn finish_with_key(self, client_final: &[u8]) -> Result<(String, [u8; 32]), AuthFailure> {
        let msg = std::str::from_utf8(client_final).map_err(|_| AuthFailure::Protocol("not UTF-8"))?;
        let (without_proof, proof) =
            msg.rsplit_once(",p=").ok_or(AuthFailure::Protocol("missing proof"))?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(v) = attr.strip_prefix("c=") {
                channel = Some(v);
            } else if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            }
        }
        let channel = channel.ok_or(AuthFailure::Protocol("missing channel binding attribute"))?;
        if !B64.decode(channel).is_ok_and(|c| ct_eq(&c, &self.expected_c)) {
            return Err(AuthFailure::Protocol("channel binding data does not match"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(AuthFailure::Protocol("nonce mismatch"));
        }
        let proof = B64.decode(proof).map_err(|_| AuthFailure::Protocol("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(AuthFailure::WrongPassword);
        }
        let auth_message = format!("{},{},{}", self.client_first_bare, self.server_first, without_proof);
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ client_signature[i];
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !ct_eq(&stored, &self.verifier.stored_key) {
            return Err(AuthFailure::WrongPassword);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok((format!("v={}", B64.encode(server_signature)), client_key))
    }
}

/// Client side of SCRAM-SHA-256 from the keys alone, no password: after a
/// client proved it knows the password, its proof revealed ClientKey, and
/// with the ServerKey of the same verifier pgfleet can log in to a server
/// holding that verifier (SCRAM pass-through, as PgBouncer does).
pub struct ScramKeyClient {
    client_key: [u8; 32],
    server_key: [u8; 32],
    nonce: String,
    message: String,
    expected: Option<[u8; 32]>,
}

impl ScramKeyClient {
    pub fn new(client_key: [u8; 32], server_key: [u8; 32]) -> ScramKeyClient {
        let nonce = B64.encode(rand::random::<[u8; 18]>());
        ScramKeyClient { client_key, server_key, message: format!("n,,n=,r={nonce}"), nonce, expected: None }
    }

    /// The next message to send.
    pub fn message(&self) -> &[u8] {
        self.message.as_bytes()
    }

    /// Takes the server-first message and computes the client-final one.
    pub fn update(&mut self, server_first: &[u8]) -> Result<(), String> {
        let sf = std::str::from_utf8(server_first).map_err(|_| "server-first is not UTF-8")?;
        let nonce = sf.split(',').find_map(|a| a.strip_prefix("r=")).ok_or("server-first without a nonce")?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err("server nonce does not extend ours".into());
        }
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("n=,r={},{sf},{without_proof}", self.nonce);
        let stored: [u8; 32] = Sha256::digest(self.client_key).into();
        let signature = hmac(&stored, auth_message.as_bytes());
        let proof: Vec<u8> = self.client_key.iter().zip(signature).map(|(k, s)| k ^ s).collect();
        self.expected = Some(hmac(&self.server_key, auth_message.as_bytes()));
        self.message = format!("{without_proof},p={}", B64.encode(proof));
        Ok(())
    }

    /// Checks the server's signature (the server knows the verifier too).
    pub fn finish(&self, server_final: &[u8]) -> Result<(), String> {
        let sf = std::str::from_utf8(server_final).map_err(|_| "server-final is not UTF-8")?;
        let v = sf.strip_prefix("v=").ok_or("server-final without a signature")?;
        let sig = B64.decode(v).map_err(|_| "bad server signature")?;
        match &self.expected {
            Some(e) if ct_eq(e, &sig) => Ok(()),
            _ => Err("server signature does not match".into()),
        }
    }
}

/// The md5 answer from the stored md5 verifier alone ("md5" + hex of
/// md5(password || user)): PostgreSQL's md5 exchange needs no more.
pub fn md5_response_from_verifier(verifier: &str, salt: [u8; 4]) -> String {
    let mut h = Md5::new();
    h.update(&verifier.as_bytes()[3..]);
    h.update(salt);
    format!("md5{:x}", h.finalize())
}

/// "md5" + hex(md5(password || user)): the stored md5 verifier.
pub fn md5_verifier(user: &str, password: &str) -> String {
    let mut h = Md5::new();
    h.update(password.as_bytes());
    h.update(user.as_bytes());
    format!("md5{:x}", h.finalize())
}

/// Checks a client's md5 PasswordMessage against a stored md5 verifier.
pub fn md5_check(verifier: &str, salt: [u8; 4], response: &[u8]) -> bool {
    ct_eq(md5_response_from_verifier(verifier, salt).as_bytes(), response)
}
