//! Semantic checks that serde cannot express. Every problem is collected so a
//! user fixes a bad config in one round.

use super::{Config, Dur};
use crate::wire::auth::Secret;
use std::collections::HashSet;
use std::net::SocketAddr;

/// A config that cannot be used, with every problem found.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<String>,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.problems.len())?;
        for p in &self.problems {
            writeln!(f, "  {}: {}", self.file, p)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

fn check_addr(p: &mut Vec<String>, key: &str, addr: &str) {
    if addr.parse::<SocketAddr>().is_err() && !looks_like_host_port(addr) {
        p.push(format!("{key}: {addr:?} is not a host:port address"));
    }
}

fn looks_like_host_port(addr: &str) -> bool {
    matches!(addr.rsplit_once(':'), Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok())
}

fn dupes<'a>(p: &mut Vec<String>, key: &str, names: impl Iterator<Item = &'a str>) {
    let mut seen = HashSet::new();
    for n in names {
        if n.is_empty() {
            p.push(format!("{key}: name must not be empty"));
        } else if !seen.insert(n) {
            p.push(format!("{key}: {n:?} is defined more than once"));
        }
    }
}

impl Config {
    /// Returns every problem found, as "key: why".
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        check_addr(&mut p, "listen.addr", &self.listen.addr);
        if self.listen.max_client_conn == 0 {
            p.push("listen.max_client_conn: must be at least 1".into());
        }
        if self.listen.unix_socket_mode().is_none() {
            p.push(format!("listen.unix_socket_mode: \"{}\" is not an octal permission like \"0777\"", self.listen.unix_socket_mode));
        }
        if self.listen.unix_socket_dir.as_deref() == Some("") {
            p.push("listen.unix_socket_dir: empty (leave it out for TCP only)".into());
        }
        // Linux takes whole seconds up to 32767 and at most 127 probes; a
        // value it refuses would silently leave its 2-hour default in place.
        let l = &self.listen;
        let whole_secs = |d: &Dur| d.0.subsec_nanos() == 0 && (1..=32767).contains(&d.0.as_secs());
        if l.tcp_keepalive.enabled().is_some()
            && (!whole_secs(&l.tcp_keepalive) || !whole_secs(&l.tcp_keepalive_interval) || !(1..=127).contains(&l.tcp_keepalive_count))
        {
            p.push("listen.tcp_keepalive and tcp_keepalive_interval: whole seconds from 1s to 32767s, tcp_keepalive_count: 1 to 127 (or tcp_keepalive = \"0s\" for off)".into());
        }
        if self.listen.max_message_size.0 < 1024 {
            p.push("listen.max_message_size: must be at least 1kB".into());
        }
        match (&self.listen.tls_cert, &self.listen.tls_key) {
            (Some(_), None) | (None, Some(_)) => {
                p.push("listen.tls_cert/tls_key: set both or neither".into())
            }
            _ => {}
        }
        if let Err(e) = crate::tls::ServerTls::from_config(&self.listen) {
            p.push(e);
        }
        if let Err(e) = crate::tls::ClientTls::new(self.cluster.server_tls_mode, self.cluster.server_tls_ca.as_deref()) {
            p.push(e);
        }
        if let Some(m) = &self.admin.metrics_addr {
            check_addr(&mut p, "admin.metrics_addr", m);
        }
        for a in &self.admin.users {
            if self.user(a).is_none() {
                p.push(format!("admin.users: {a:?} is not defined in [[users]]"));
            }
        }
        self.validate_pool(&mut p);
        self.validate_users(&mut p);
        dupes(&mut p, "databases.name", self.databases.iter().map(|d| d.name.as_str()));
        for d in self.databases.iter().filter(|d| crate::admin::is_admin_database(&d.name)) {
            p.push(format!("databases.name: {:?} is the admin console's name", d.name));
        }
        if self.databases.is_empty() {
            p.push("databases: define at least one [[databases]] entry".into());
        }
        self.validate_cluster(&mut p);
        p
    }

    fn validate_pool(&self, p: &mut Vec<String>) {
        if self.pool.size == 0 {
            p.push("pool.size: must be at least 1".into());
        }
        if self.pool.min_size > 0 && self.pool.server_lifetime.0.is_zero() {
            p.push("pool.min_size: pre-warmed connections need pool.server_lifetime above 0s (0s closes each after one transaction)".into());
        }
        if self.pool.min_size > self.pool.size {
            p.push(format!(
                "pool.min_size: {} is larger than pool.size {}",
                self.pool.min_size, self.pool.size
            ));
        }
        if self.pool.checkout_timeout.0.is_zero() {
            p.push("pool.checkout_timeout: must be greater than 0".into());
        }
        if self.pool.connect_timeout.0.is_zero() {
            p.push("pool.connect_timeout: must be greater than 0".into());
        }
    }

    fn validate_users(&self, p: &mut Vec<String>) {
        dupes(p, "users.name", self.users.iter().map(|u| u.name.as_str()));
        for u in &self.users {
            let key = format!("users[{}]", u.name);
            if let Some(pw) = &u.password {
                if let Err(e) = Secret::from_config(pw) {
                    p.push(format!("{key}.password: {e}"));
                }
            } else if self.auth.method != super::AuthMethod::Trust {
                p.push(format!("{key}.password: required unless auth.method = \"trust\""));
            }
            if u.pool_size == Some(0) {
                p.push(format!("{key}.pool_size: must be at least 1"));
            }
            if let Some(w) = &u.workload {
                self.check_workload(p, &format!("{key}.workload"), w);
            }
        }
    }

    fn check_workload(&self, p: &mut Vec<String>, key: &str, w: &str) {
        if !self.cluster.groups.is_empty() && !self.cluster.groups.iter().any(|g| g.name == w) {
            p.push(format!("{key}: workload {w:?} does not name a [[cluster.groups]] entry"));
        }
    }

    fn validate_cluster(&self, p: &mut Vec<String>) {
        check_addr(p, "cluster.primary", &self.cluster.primary);
        if self.cluster.lag_check_interval.0.is_zero() {
            p.push("cluster.lag_check_interval: must be greater than 0".into());
        }
        dupes(p, "cluster.replicas.name", self.cluster.replicas.iter().map(|r| r.name.as_str()));
        dupes(p, "cluster.groups.name", self.cluster.groups.iter().map(|g| g.name.as_str()));
        let groups: HashSet<&str> = self.cluster.groups.iter().map(|g| g.name.as_str()).collect();
        for g in &self.cluster.groups {
            if g.name == "primary" || g.name == "error" {
                p.push(format!("cluster.groups[{}].name: {:?} is reserved (a fallback of that name means the primary / an error)", g.name, g.name));
            }
        }
        let mut addrs: HashSet<&str> = HashSet::new();
        for r in &self.cluster.replicas {
            if r.addr == self.cluster.primary {
                p.push(format!("cluster.replicas[{}].addr: {:?} is the primary's address", r.name, r.addr));
            } else if !addrs.insert(r.addr.as_str()) {
                p.push(format!("cluster.replicas[{}].addr: {:?} is another replica's address too", r.name, r.addr));
            }
        }
        for r in &self.cluster.replicas {
            if r.name == "primary" || r.name == "(none)" {
                // Pools, stats and SHOW name the primary's backend so.
                p.push(format!("cluster.replicas[{}].name: {:?} is reserved for the primary", r.name, r.name));
            }
            check_addr(p, &format!("cluster.replicas[{}].addr", r.name), &r.addr);
            for g in &r.groups {
                if !groups.contains(g.as_str()) {
                    p.push(format!("cluster.replicas[{}].groups: {g:?} is not a [[cluster.groups]] name", r.name));
                }
            }
            if r.weight == 0 {
                p.push(format!("cluster.replicas[{}].weight: must be at least 1", r.name));
            }
        }
        for g in &self.cluster.groups {
            for f in &g.fallback {
                if f != "primary" && f != "error" && !groups.contains(f.as_str()) {
                    p.push(format!(
                        "cluster.groups[{}].fallback: {f:?} is not \"primary\", \"error\" or a group name",
                        g.name
                    ));
                }
            }
        }
        if !self.cluster.groups.is_empty() {
            self.check_workload(p, "routing.default_workload", &self.routing.default_workload);
        }
        for (i, r) in self.routing.rules.iter().enumerate() {
            if r.application_name.is_none() && r.user.is_none() && r.database.is_none() {
                p.push(format!("routing.rules[{i}]: needs application_name, user or database"));
            }
            self.check_workload(p, &format!("routing.rules[{i}].workload"), &r.workload);
        }
        if self.routing.transaction_reads != super::TransactionReads::Primary {
            p.push("routing.transaction_reads: only \"primary\" is supported (BEGIN READ ONLY goes to replicas)".into());
        }
        if self.cluster.health_user.is_none() && !self.cluster.replicas.is_empty() && !self.users.iter().any(|u| u.logs_in_by_itself()) {
            p.push("cluster.health_user: the lag monitor needs a user to log in as, and every user has a stored verifier only: name one with a plaintext password or server_password (without a monitor no replica would ever be used)".into());
        }
        if let Some(u) = &self.cluster.health_user {
            match self.user(u) {
                None => p.push(format!("cluster.health_user: {u:?} is not defined in [[users]]")),
                // pgfleet logs in to the servers as this user itself.
                Some(user) if !user.logs_in_by_itself() => {
                    p.push(format!("cluster.health_user: {u:?} needs a plaintext password or server_password (the monitor logs in as it)"))
                }
                _ => {}
            }
        }
        if let Some(d) = &self.cluster.health_database {
            if self.database(d).is_none() {
                p.push(format!("cluster.health_database: {d:?} is not defined in [[databases]]"));
            }
        }
        match (&self.auth.auth_query, &self.auth.auth_user) {
            (Some(_), None) => p.push("auth.auth_query: needs auth.auth_user".into()),
            (None, Some(_)) => p.push("auth.auth_user: set auth.auth_query too".into()),
            (Some(_), Some(u)) => match self.user(u) {
                None => p.push(format!("auth.auth_user: {u:?} is not defined in [[users]]")),
                Some(user) if !user.logs_in_by_itself() => {
                    p.push(format!("auth.auth_user: {u:?} needs a plaintext password or server_password (pgfleet logs in as it)"))
                }
                _ => {}
            },
            (None, None) => {}
        }
        for (i, l) in self.limits.iter().enumerate() {
            if l.workload.is_none() && l.user.is_none() && l.database.is_none() {
                p.push(format!("limits[{i}]: needs workload, user or database"));
            }
            if l.rate.is_some_and(|r| r.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)) {
                p.push(format!("limits[{i}].rate: must be greater than 0"));
            }
            if l.max_in_flight == Some(0) {
                p.push(format!("limits[{i}].max_in_flight: must be at least 1"));
            }
            if l.max_in_flight.is_some_and(|n| n > 1_000_000_000) {
                p.push(format!("limits[{i}].max_in_flight: at most 1000000000"));
            }
            if l.burst == Some(0) {
                p.push(format!("limits[{i}].burst: must be at least 1"));
            }
            if l.max_in_flight.is_none() && l.rate.is_none() {
                p.push(format!("limits[{i}]: sets neither max_in_flight nor rate"));
            }
            // A typo would make the rule silently never apply.
            if let Some(w) = &l.workload {
                self.check_workload(p, &format!("limits[{i}].workload"), w);
            }
            if let Some(d) = l.database.as_deref().filter(|d| self.database(d).is_none()) {
                p.push(format!("limits[{i}].database: {d:?} is not defined in [[databases]]"));
            }
        }
    }
}
