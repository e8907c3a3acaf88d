//! Typed durations ("250ms", "5s", "10m", "1h") and sizes ("512kB", "16MB").

use serde::{Deserialize, Deserializer};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }
    pub fn millis(ms: u64) -> Dur {
        Dur(Duration::from_millis(ms))
    }
    /// `None` when the duration is zero ("0s" means off).
    pub fn enabled(self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like \"250ms\", \"5s\", \"10m\""))?;
    let unit_ms: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "" if n == 0 => 0,
        other => return Err(format!("unknown duration unit {other:?} in {s:?} (use ms, s, m, h, d)")),
    };
    // At most a year: far beyond any timeout, and far from where a deadline
    // (now + the duration) could overflow.
    match n.checked_mul(unit_ms) {
        Some(ms) if ms <= 365 * 86_400_000 => Ok(Duration::from_millis(ms)),
        _ => Err(format!("{s:?} is too long (at most 365d)")),
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(Dur).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Size(pub u64);

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size like \"512kB\" or \"16MB\""))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" | "k" => 1024,
        "MB" | "M" => 1024 * 1024,
        "GB" | "G" => 1024 * 1024 * 1024,
        other => return Err(format!("unknown size unit {other:?} in {s:?} (use B, kB, MB, GB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
            Raw::S(s) => parse_size(&s).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("18446744073709552s").is_err(), "overflow is refused, not wrapped");
        assert!(parse_duration("366d").is_err());
        assert_eq!(parse_duration("365d").unwrap(), Duration::from_secs(365 * 86_400));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MB").unwrap(), 16 << 20);
        assert_eq!(parse_size("512kB").unwrap(), 512 << 10);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("99999999999999GB").is_err());
    }
}
