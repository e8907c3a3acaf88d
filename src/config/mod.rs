//! Configuration: the TOML schema of `shared/config-contract.toml` (strict:
//! unknown keys are errors), typed durations and sizes, and a validation
//! pass that reports every problem at once as "file: key: why".

mod units;
mod validate;

pub use units::{parse_duration, parse_size, Dur, Size};
pub use validate::ConfigError;

use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: Listen,
    pub admin: Admin,
    pub pool: PoolCfg,
    pub timeouts: Timeouts,
    pub limits: Vec<Limit>,
    pub auth: AuthCfg,
    pub users: Vec<User>,
    pub databases: Vec<Database>,
    pub cluster: Cluster,
    pub routing: Routing,
    pub log: Log,
    pub runtime: Runtime,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    /// Worker threads: 0 = one per core (multi-thread runtime); 1 = a
    /// single-threaded runtime. Needs a restart.
    pub workers: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    pub addr: String,
    pub max_client_conn: usize,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    /// Default: "prefer" when tls_cert/tls_key are set, else "disable".
    pub tls_mode: Option<TlsMode>,
    /// Largest message a client may send; larger ones get 08P01.
    pub max_message_size: Size,
    /// Also listen on `<dir>/.s.PGSQL.<port>` (libpq's `host=<dir>`), as
    /// PgBouncer's `unix_socket_dir`; unset: TCP only.
    pub unix_socket_dir: Option<String>,
    /// Permissions of the socket file, octal (PgBouncer's `unix_socket_mode`).
    pub unix_socket_mode: String,
    /// TCP keepalive on client sockets: idle time before the first probe
    /// ("0s": off). A client host that vanishes without a reset (a crash,
    /// a partition) is noticed after `tcp_keepalive` + `tcp_keepalive_count`
    /// x `tcp_keepalive_interval`, and its session, with any transaction
    /// it held open, ends.
    pub tcp_keepalive: Dur,
    pub tcp_keepalive_interval: Dur,
    pub tcp_keepalive_count: u32,
}

impl Listen {
    /// `unix_socket_mode` as permission bits (validated).
    pub fn unix_socket_mode(&self) -> Option<u32> {
        u32::from_str_radix(self.unix_socket_mode.trim_start_matches("0o"), 8).ok().filter(|m| *m <= 0o777)
    }

    pub fn tls_mode(&self) -> TlsMode {
        self.tls_mode.unwrap_or(if self.tls_cert.is_some() { TlsMode::Prefer } else { TlsMode::Disable })
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            addr: "127.0.0.1:6432".into(),
            max_client_conn: 10_000,
            tls_cert: None,
            tls_key: None,
            tls_mode: None,
            max_message_size: Size(64 << 20),
            unix_socket_dir: None,
            unix_socket_mode: "0777".into(),
            tcp_keepalive: Dur::secs(60),
            tcp_keepalive_interval: Dur::secs(10),
            tcp_keepalive_count: 5,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    #[default]
    Disable,
    Prefer,
    Require,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    pub users: Vec<String>,
    pub metrics_addr: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    #[default]
    Transaction,
    Session,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolCfg {
    pub mode: PoolMode,
    pub size: usize,
    pub min_size: usize,
    pub checkout_timeout: Dur,
    pub server_idle_timeout: Dur,
    pub server_lifetime: Dur,
    pub connect_timeout: Dur,
    /// Prepared statements kept per server connection (LRU; 0 = unlimited).
    pub prepared_statements_cache: usize,
    /// Transaction mode: what LISTEN, session advisory locks, temp tables,
    /// WITH HOLD cursors and SQL PREPARE do: pin the client or fail (0A000).
    pub session_state: SessionStateMode,
    /// New server connections per second per server (all pools together);
    /// 0 = unlimited. Protects a server from connection storms.
    pub max_connects_per_second: u32,
    /// After a server refused pgfleet's login (28P01, 3D000, ...), new
    /// connections of that pool fail with the same error, without asking
    /// the server, for this long (PgBouncer's `server_login_retry`).
    pub server_login_retry: Dur,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SessionStateMode {
    #[default]
    Pin,
    Reject,
}

impl Default for PoolCfg {
    fn default() -> Self {
        PoolCfg {
            mode: PoolMode::Transaction,
            size: 20,
            min_size: 0,
            checkout_timeout: Dur::secs(5),
            server_idle_timeout: Dur::secs(600),
            server_lifetime: Dur::secs(3600),
            connect_timeout: Dur::secs(3),
            prepared_statements_cache: 500,
            session_state: SessionStateMode::Pin,
            max_connects_per_second: 100,
            server_login_retry: Dur::secs(15),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    pub startup: Dur,
    pub query: Dur,
    pub idle_in_transaction: Dur,
    pub client_idle: Dur,
    /// SIGTERM: how long in-flight transactions may take to finish.
    pub shutdown_grace: Dur,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            startup: Dur::secs(10),
            query: Dur::default(),
            idle_in_transaction: Dur::default(),
            client_idle: Dur::default(),
            shutdown_grace: Dur::secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Shown in errors, SHOW LIMITS and metrics (default: the matching fields).
    pub name: Option<String>,
    pub workload: Option<String>,
    pub user: Option<String>,
    pub database: Option<String>,
    pub max_in_flight: Option<usize>,
    pub rate: Option<f64>,
    pub burst: Option<u32>,
    pub max_wait: Option<Dur>,
    /// Transactions that may wait for this rule at once (default: unbounded
    /// up to max_client_conn); more are refused at once.
    pub max_queue: Option<usize>,
    #[serde(default)]
    pub writes_only: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    Md5,
    Trust,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthCfg {
    pub method: AuthMethod,
    /// Failed logins allowed per client address within `failed_login_window`;
    /// then that address is refused (28000) until the window passes. 0 = off.
    pub max_failed_logins: u32,
    pub failed_login_window: Dur,
    /// Users not in [[users]] are looked up with this query (one parameter:
    /// the user name; the last column is the password or verifier), run on
    /// the primary as `auth_user`, e.g. PgBouncer's
    /// "SELECT usename, passwd FROM pg_shadow WHERE usename = $1".
    pub auth_query: Option<String>,
    /// The [[users]] entry that runs auth_query (needs a known password).
    pub auth_user: Option<String>,
}

impl Default for AuthCfg {
    fn default() -> Self {
        AuthCfg {
            method: AuthMethod::default(),
            max_failed_logins: 20,
            failed_login_window: Dur::secs(60),
            auth_query: None,
            auth_user: None,
        }
    }
}

#[derive(Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub server_password: Option<String>,
    #[serde(default)]
    pub pool_size: Option<usize>,
    #[serde(default)]
    pub workload: Option<String>,
}

impl User {
    /// The password pgfleet logs in to the servers with: `server_password`,
    /// else `password` when it is plain text (not a verifier or hash).
    pub fn server_login_password(&self) -> Option<&str> {
        self.server_password.as_deref().or_else(|| self.password.as_deref().filter(|p| !crate::wire::auth::Secret::is_stored(p)))
    }

    /// Whether pgfleet can log in to the servers as this user on its own,
    /// without a client's proof: with a plaintext password or
    /// `server_password`, or with no password at all (`auth.method =
    /// "trust"`, servers that trust pgfleet).
    pub fn logs_in_by_itself(&self) -> bool {
        self.server_login_password().is_some() || (self.password.is_none() && self.server_password.is_none())
    }
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Passwords never reach logs, not even through Debug.
        f.debug_struct("User")
            .field("name", &self.name)
            .field("pool_size", &self.pool_size)
            .field("workload", &self.workload)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Database {
    pub name: String,
    #[serde(default)]
    pub dbname: Option<String>,
}

impl Database {
    pub fn server_name(&self) -> &str {
        self.dbname.as_deref().unwrap_or(&self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cluster {
    pub primary: String,
    pub lag_check_interval: Dur,
    pub server_tls_mode: ServerTlsMode,
    /// PEM file of the CAs server certificates must chain to (verify-full).
    pub server_tls_ca: Option<String>,
    pub replicas: Vec<Replica>,
    pub groups: Vec<Group>,
    /// Who the lag monitor connects as (default: the first [[users]] entry
    /// with a known server password) and to which database (default: the
    /// first [[databases]] entry).
    pub health_user: Option<String>,
    pub health_database: Option<String>,
    /// How long a write waits for a usable primary (failover, restart)
    /// before the client gets an error.
    pub failover_timeout: Dur,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            primary: "127.0.0.1:5432".into(),
            lag_check_interval: Dur::millis(100),
            server_tls_mode: ServerTlsMode::Disable,
            server_tls_ca: None,
            replicas: vec![],
            groups: vec![],
            health_user: None,
            health_database: None,
            failover_timeout: Dur::secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTlsMode {
    #[default]
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replica {
    pub name: String,
    pub addr: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    #[serde(default)]
    pub max_lag: Option<Dur>,
    #[serde(default)]
    pub max_lag_bytes: Option<Size>,
    #[serde(default)]
    pub fallback: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReadYourWrites {
    Off,
    #[default]
    Lsn,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TransactionReads {
    #[default]
    Primary,
    Replica,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Routing {
    pub read_write_split: bool,
    pub default_workload: String,
    pub read_your_writes: ReadYourWrites,
    pub transaction_reads: TransactionReads,
    /// The application's own functions that write (reads calling them go to the primary).
    pub write_functions: Vec<String>,
    /// VOLATILE functions that never write (reads calling them may still go
    /// to a replica), e.g. an extension's `uuid_generate_v4`.
    pub read_functions: Vec<String>,
    /// How often each database's VOLATILE functions are re-read from
    /// `pg_proc` (a read calling one goes to the primary); 0 turns the
    /// lookup off (only built-ins and `write_functions` count as writes).
    pub function_catalog_refresh: Dur,
    pub rules: Vec<Rule>,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            read_write_split: true,
            default_workload: "default".into(),
            read_your_writes: ReadYourWrites::Lsn,
            transaction_reads: TransactionReads::Primary,
            write_functions: vec![],
            read_functions: vec![],
            function_catalog_refresh: Dur(std::time::Duration::from_secs(30)),
            rules: vec![],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub application_name: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub database: Option<String>,
    pub workload: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// tracing filter (RUST_LOG syntax); the RUST_LOG variable overrides it.
    pub level: String,
    pub format: LogFormat,
}

impl Default for Log {
    fn default() -> Self {
        Log { level: "info".into(), format: LogFormat::Text }
    }
}

/// A TOML error as "line L, column C: message", without the source line
/// toml's own text quotes, and without the message either when that line
/// holds a password (`invalid type: integer `123456``, a bad escape):
/// config errors go to the log and to the admin console.
fn parse_problem(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else { return e.message().trim().replace('\n', " ") };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    let line_text = text[before.rfind('\n').map_or(0, |i| i + 1)..].lines().next().unwrap_or("");
    let message = if line_text.to_ascii_lowercase().contains("password") {
        "invalid value for a password (not shown)".to_string()
    } else {
        e.message().trim().replace('\n', " ")
    };
    format!("TOML parse error at line {line}, column {column}: {message}")
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            problems: vec![format!("cannot read: {e}")],
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError { file: file.to_string(), problems: vec![parse_problem(text, &e)] })?;
        let problems = cfg.validate();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError { file: file.to_string(), problems })
        }
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn database(&self, name: &str) -> Option<&Database> {
        self.databases.iter().find(|d| d.name == name)
    }

    pub fn pool_size_for(&self, user: &str) -> usize {
        self.user(user).and_then(|u| u.pool_size).unwrap_or(self.pool.size)
    }
}

#[cfg(test)]
mod tests;
