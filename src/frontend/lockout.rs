//! Failed logins per client source: after `auth.max_failed_logins` within
//! `auth.failed_login_window`, the source is refused (28000) before any
//! exchange until the window passes. Proofs being verified count too, so
//! parallel connections cannot try more passwords than the limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The limit in force: failures allowed per window (0: no limit).
#[derive(Clone, Copy)]
pub struct Limit {
    pub max: u32,
    pub window: Duration,
}

/// Failed logins of one source within its window, and the proofs being
/// checked right now.
struct Failures {
    count: u32,
    since: Instant,
    verifying: u32,
}

impl Failures {
    /// One more failure, in a new window if the last one has passed.
    fn add(&mut self, window: Duration) {
        if self.since.elapsed() >= window {
            (self.count, self.since) = (0, Instant::now());
        }
        self.count += 1;
    }
}

#[derive(Default)]
pub struct FailedLogins {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    map: HashMap<IpAddr, Failures>,
    /// When a full table was last swept of expired entries.
    swept: Option<Instant>,
}

/// One password check in flight (see `FailedLogins::attempt`).
pub struct LoginAttempt<'a> {
    logins: &'a FailedLogins,
    window: Duration,
    ip: IpAddr,
    failed: bool,
}

/// Failed logins are counted per source: an IPv4 address, or an IPv6 /64
/// (one host usually owns a whole /64, so counting per address would let
/// it try a fresh address for every password).
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

impl FailedLogins {
    /// Seconds until `ip` may try to log in again, if it failed too often.
    pub fn blocked(&self, ip: IpAddr, limit: Limit) -> Option<u64> {
        if is_unix(ip) {
            return None;
        }
        wait(&self.table.lock().unwrap().map, source(ip), limit, false)
    }

    /// A failed login of `ip` that checked no proof (see startup's Charge).
    pub fn record(&self, ip: IpAddr, window: Duration) {
        if is_unix(ip) {
            return;
        }
        let mut table = self.table.lock().unwrap();
        table.map.entry(source(ip)).or_insert(Failures { count: 0, since: Instant::now(), verifying: 0 }).add(window);
    }

    /// Called right before a password or SCRAM proof is checked: Err(seconds
    /// to wait) when `ip` has used up its failed logins, counting the checks
    /// other connections from `ip` are making at this moment. The check at
    /// accept alone let parallel connections, all past it before any had
    /// failed, try any number of passwords. The attempt counts as failed
    /// unless `succeeded` is called.
    pub fn attempt(&self, ip: IpAddr, limit: Limit) -> Result<LoginAttempt<'_>, u64> {
        let unix = is_unix(ip);
        let ip = source(ip);
        let mut table = self.table.lock().unwrap();
        if let Some(secs) = wait(&table.map, ip, limit, true).filter(|_| !unix) {
            return Err(secs);
        }
        // Swept at most once a second: a table kept full of addresses still
        // in their window must not cost a full scan per login.
        if table.map.len() > 100_000 && table.swept.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            table.swept = Some(Instant::now());
            table.map.retain(|_, f| f.verifying > 0 || f.since.elapsed() < limit.window);
        }
        table.map.entry(ip).or_insert(Failures { count: 0, since: Instant::now(), verifying: 0 }).verifying += 1;
        Ok(LoginAttempt { logins: self, window: limit.window, ip, failed: true })
    }
}

/// A Unix-socket client (its peer address is 0.0.0.0): no address to
/// hold back. Decided on the address itself: `::1` and the rest of `::/64`
/// count as `::` once grouped by /64, and must still be held back.
fn is_unix(ip: IpAddr) -> bool {
    ip == IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
}

fn wait(map: &HashMap<IpAddr, Failures>, ip: IpAddr, limit: Limit, in_flight: bool) -> Option<u64> {
    let f = map.get(&ip).filter(|_| limit.max > 0)?;
    let age = f.since.elapsed();
    // Failures of a window that has passed no longer count.
    let (count, left) = if age < limit.window { (f.count, limit.window - age) } else { (0, limit.window) };
    let pending = if in_flight { f.verifying } else { 0 };
    (count + pending >= limit.max).then(|| left.as_secs().max(1))
}

impl LoginAttempt<'_> {
    pub fn succeeded(mut self) {
        self.failed = false;
    }
}

impl Drop for LoginAttempt<'_> {
    fn drop(&mut self) {
        let mut table = self.logins.table.lock().unwrap();
        let Some(f) = table.map.get_mut(&self.ip) else { return };
        f.verifying = f.verifying.saturating_sub(1);
        if self.failed {
            f.add(self.window);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn failed_logins_count_per_ipv4_address_and_per_ipv6_64() {
        let src = |s: &str| super::source(s.parse().unwrap());
        assert_eq!(src("2001:db8:1:2:aaaa::1"), src("2001:db8:1:2:ffff::9"));
        assert_ne!(src("2001:db8:1:2::1"), src("2001:db8:1:3::1"));
        assert_eq!(src("::ffff:10.0.0.7"), src("10.0.0.7"));
        assert_ne!(src("10.0.0.7"), src("10.0.0.8"));
        assert!(src("0.0.0.0").is_unspecified() && src("::").is_unspecified());
    }

    #[test]
    fn ipv6_loopback_is_held_back_and_unix_clients_are_not() {
        let logins = super::FailedLogins::default();
        let limit = super::Limit { max: 2, window: std::time::Duration::from_secs(60) };
        for ip in ["::1", "0.0.0.0"] {
            let ip = ip.parse().unwrap();
            for _ in 0..2 {
                drop(logins.attempt(ip, limit).expect("under the limit"));
            }
        }
        assert!(logins.attempt("::1".parse().unwrap(), limit).is_err(), "::1 used up its failed logins");
        assert!(logins.blocked("::1".parse().unwrap(), limit).is_some());
        assert!(logins.attempt("0.0.0.0".parse().unwrap(), limit).is_ok(), "a Unix-socket client is never held back");
    }
}
