//! Admission control: `[[limits]]` rules, each a concurrency budget
//! (transactions in flight) and/or a token bucket (transactions per second
//! with a burst), shared by every transaction the rule matches. A
//! transaction is admitted before it gets a server connection and holds its
//! concurrency permits until the connection is released.
//!
//! Over a limit a transaction waits, in a bounded FIFO queue, at most the
//! rule's `max_wait`; then the client gets an ERROR naming the rule (53300,
//! as the configuration contract says, for rate and concurrency alike) and
//! its session continues.

use crate::config::Limit;
use crate::wire::sqlstate;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// One `[[limits]]` rule and its live state.
pub struct Limiter {
    /// The rule as configured (what it matches; a reload keeps the live
    /// state of a rule that did not change).
    pub rule: Limit,
    pub name: String,
    /// `rule.burst`, or its default.
    pub burst: f64,
    /// `rule.max_wait` or the pool's checkout timeout, in µs (a reload that
    /// changes only the latter updates it in place).
    max_wait_us: AtomicU64,
    pub max_queue: usize,
    slots: Option<Arc<Semaphore>>,
    bucket: Option<TokenBucket>,
    pub waiting: AtomicUsize,
    pub admitted: AtomicU64,
    pub rejected: AtomicU64,
}

/// What a transaction is, for matching rules.
pub struct Request<'a> {
    pub workload: &'a str,
    pub user: &'a str,
    pub database: &'a str,
    pub to_primary: bool,
}

/// Permits held by an admitted transaction (released on drop).
#[derive(Default)]
pub struct Admission {
    _permits: Vec<Option<OwnedSemaphorePermit>>,
}

/// Why a transaction was refused: (SQLSTATE, message).
pub type Refusal = (&'static str, String);

impl Limiter {
    pub fn new(rule: &Limit, default_wait: Duration) -> Limiter {
        let name = rule.name.clone().unwrap_or_else(|| {
            let mut parts = Vec::new();
            if let Some(w) = &rule.workload {
                parts.push(format!("workload={w}"));
            }
            if let Some(u) = &rule.user {
                parts.push(format!("user={u}"));
            }
            if let Some(d) = &rule.database {
                parts.push(format!("database={d}"));
            }
            if rule.writes_only {
                parts.push("writes".into());
            }
            parts.join(",")
        });
        let burst = rule.burst.map(f64::from).unwrap_or_else(|| rule.rate.unwrap_or(1.0).max(1.0));
        Limiter {
            rule: rule.clone(),
            name,
            burst,
            max_wait_us: AtomicU64::new(Self::wait_us(rule, default_wait)),
            max_queue: rule.max_queue.unwrap_or(usize::MAX),
            slots: rule.max_in_flight.map(|n| Arc::new(Semaphore::new(n))),
            bucket: rule.rate.map(|r| TokenBucket::new(r, burst)),
            waiting: AtomicUsize::new(0),
            admitted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    fn wait_us(rule: &Limit, default_wait: Duration) -> u64 {
        rule.max_wait.map_or(default_wait, |d| d.0).as_micros().try_into().unwrap_or(u64::MAX)
    }

    /// How long a transaction may wait for this rule.
    pub fn max_wait(&self) -> Duration {
        Duration::from_micros(self.max_wait_us.load(Ordering::Relaxed))
    }

    /// Every field the rule sets must match.
    pub fn matches(&self, r: &Request) -> bool {
        (!self.rule.writes_only || r.to_primary)
            && self.rule.workload.as_deref().is_none_or(|w| w == r.workload)
            && self.rule.user.as_deref().is_none_or(|u| u == r.user)
            && self.rule.database.as_deref().is_none_or(|d| d == r.database)
    }

    /// Transactions admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        match (&self.slots, self.rule.max_in_flight) {
            (Some(s), Some(n)) => n - s.available_permits(),
            _ => 0,
        }
    }

    fn refuse(&self, code: &'static str, why: String) -> Refusal {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        (code, format!("pgfleet limit \"{}\" exceeded: {why}", self.name))
    }
}

/// A token bucket (`rate` per second, up to `burst` saved) that lends
/// ahead: a taker reserves the next token and is told how long to wait for
/// it, so waiters are served in order (tokens go negative meanwhile). Used
/// by `[[limits]]` rates and to pace new server connections.
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    /// (tokens, last refill).
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64) -> TokenBucket {
        TokenBucket { rate, burst, state: Mutex::new((burst, Instant::now())) }
    }

    /// Reserves a token; returns how long to wait for it, or None (nothing
    /// reserved) when that would take longer than `max_wait`.
    pub fn reserve(&self, max_wait: Duration) -> Option<Duration> {
        let mut s = self.state.lock().unwrap();
        let now = Instant::now();
        s.0 = (s.0 + now.saturating_duration_since(s.1).as_secs_f64() * self.rate).min(self.burst);
        s.1 = now;
        // A tiny rate makes the wait too long to represent: as good as never.
        let wait = if s.0 >= 1.0 { Duration::ZERO } else { Duration::try_from_secs_f64((1.0 - s.0) / self.rate).unwrap_or(Duration::MAX) };
        if wait > max_wait {
            return None;
        }
        s.0 -= 1.0;
        Some(wait)
    }

    /// Gives back a token `reserve` took (its taker will not use it).
    pub fn unreserve(&self) {
        self.state.lock().unwrap().0 += 1.0;
    }

    /// Reserves the next token and sleeps until it is due, unless it is due
    /// later than `max_wait` from now (false: nothing taken). Dropped while
    /// sleeping (its client left), it gives the token back: abandoned
    /// waits must not push everyone after them further back.
    pub async fn take_within(&self, max_wait: Duration) -> bool {
        match self.reserve(max_wait) {
            None => false,
            Some(wait) if wait.is_zero() => true,
            Some(wait) => {
                let taken = Taken(vec![self]);
                tokio::time::sleep(wait).await;
                std::mem::forget(taken);
                true
            }
        }
    }
}

/// Decrements a waiting counter when the wait ends, however it ends.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Rate tokens taken by the rules an admission has passed so far: given
/// back unless the admission completes (a later rule refused it, or the
/// client left while it waited), so refused work spends no rate.
struct Taken<'a>(Vec<&'a TokenBucket>);

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        for b in &self.0 {
            b.unreserve();
        }
    }
}

/// The rules of one configuration.
#[derive(Default)]
pub struct Limits {
    pub rules: Vec<Arc<Limiter>>,
}

impl Limits {
    pub fn new(rules: &[Limit], default_wait: Duration) -> Limits {
        Limits { rules: rules.iter().map(|r| Arc::new(Limiter::new(r, default_wait))).collect() }
    }

    /// The rules of a reloaded configuration: a rule that did not change
    /// keeps its live state (transactions in flight, waiters, tokens,
    /// counters); a new or changed one starts fresh.
    /// Each old rule is kept at most once: two identical rules stay two
    /// (sharing one would make a transaction take two of its slots). A
    /// changed `pool.checkout_timeout` reaches the rules without a
    /// `max_wait` of their own in place.
    pub fn reloaded(rules: &[Limit], default_wait: Duration, previous: &Limits) -> Limits {
        let mut kept = vec![false; previous.rules.len()];
        let rules = rules
            .iter()
            .map(|r| match (0..previous.rules.len()).find(|&i| !kept[i] && previous.rules[i].rule == *r) {
                Some(i) => {
                    kept[i] = true;
                    let old = &previous.rules[i];
                    old.max_wait_us.store(Limiter::wait_us(r, default_wait), Ordering::Relaxed);
                    old.clone()
                }
                None => Arc::new(Limiter::new(r, default_wait)),
            })
            .collect();
        Limits { rules }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Admits a transaction under every matching rule, waiting (bounded)
    /// where a rule is at its limit. Rates first, so a transaction waiting
    /// for a token holds no slot. Concurrency slots are taken all at once:
    /// a transaction that has to wait for one rule's slot holds none of the
    /// others meanwhile (ten waiting `analytics` transactions must not hold
    /// the whole database's budget while their own rule is full).
    pub async fn admit(&self, r: &Request<'_>) -> Result<Admission, Refusal> {
        // One deadline per rule for its rate and its slot together.
        let started = Instant::now();
        let mut taken = Taken(Vec::new());
        for l in self.rules.iter().filter(|l| l.matches(r)) {
            let Some(bucket) = &l.bucket else { continue };
            match bucket.reserve(l.max_wait()) {
                Some(wait) => {
                    taken.0.push(bucket);
                    if !wait.is_zero() {
                        let _waiting = l.queue()?;
                        tokio::time::sleep(wait).await
                    }
                }
                None => {
                    let rate = l.rule.rate.unwrap_or_default();
                    return Err(l.refuse(
                        sqlstate::TOO_MANY_CONNECTIONS,
                        format!("rate {rate}/s (burst {}) would need a wait over {:?}", l.burst, l.max_wait()),
                    ));
                }
            }
        }
        let mut held = self.slot_holder(r);
        while let Some(k) = self.take_free_slots(r, &mut held) {
            // Wait for that one holding nothing else, then try the rest again.
            held.iter_mut().for_each(|h| *h = None);
            let l = &self.rules[k];
            let _waiting = l.queue()?;
            let slots = l.slots.as_ref().expect("has slots").clone();
            match tokio::time::timeout_at(started + l.max_wait(), slots.acquire_owned()).await {
                Ok(Ok(p)) => held[k] = Some(p),
                _ => {
                    return Err(l.refuse(
                        sqlstate::TOO_MANY_CONNECTIONS,
                        format!("{} transactions in flight (max_in_flight), waited {} ms", l.rule.max_in_flight.unwrap_or(0), started.elapsed().as_millis()),
                    ))
                }
            }
        }
        self.count_admitted(r);
        taken.0.clear();
        Ok(Admission { _permits: held })
    }

    /// Admission without waiting and without rates, or none: for a pinned
    /// client's transaction (its connection may hold what others wait for,
    /// a lock it is about to release: it must not wait behind them).
    pub fn try_admit(&self, r: &Request<'_>) -> Option<Admission> {
        let mut held = self.slot_holder(r);
        if self.take_free_slots(r, &mut held).is_some() {
            return None;
        }
        self.count_admitted(r);
        Some(Admission { _permits: held })
    }

    /// Where the permits of the matching rules go, by rule index (nothing
    /// allocated when no rule with slots matches).
    fn slot_holder(&self, r: &Request<'_>) -> Vec<Option<OwnedSemaphorePermit>> {
        if self.rules.iter().any(|l| l.slots.is_some() && l.matches(r)) {
            self.rules.iter().map(|_| None).collect()
        } else {
            Vec::new()
        }
    }

    /// Takes the free slots of the matching rules into `held` (by rule
    /// index); the first rule with none free, if any.
    fn take_free_slots(&self, r: &Request<'_>, held: &mut [Option<OwnedSemaphorePermit>]) -> Option<usize> {
        // (Empty: no rule with slots matches.)
        (0..held.len()).find(|&k| {
            let l = &self.rules[k];
            let Some(slots) = l.slots.as_ref().filter(|_| l.matches(r)) else { return false };
            if held[k].is_none() {
                held[k] = slots.clone().try_acquire_owned().ok();
            }
            held[k].is_none()
        })
    }

    fn count_admitted(&self, r: &Request<'_>) {
        for l in self.rules.iter().filter(|l| l.matches(r)) {
            l.admitted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Limiter {
    /// Counts a transaction as waiting under this rule while the guard
    /// lives; refused when `max_queue` transactions already wait (with
    /// `max_queue = 0` nothing ever queues, but what fits at once is
    /// admitted).
    fn queue(&self) -> Result<Waiting<'_>, Refusal> {
        let queued = self.waiting.fetch_add(1, Ordering::Relaxed);
        let w = Waiting(&self.waiting);
        if queued >= self.max_queue {
            return Err(self.refuse(sqlstate::TOO_MANY_CONNECTIONS, format!("{} transactions already waiting", self.max_queue)));
        }
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    fn rule(f: impl FnOnce(&mut Limit)) -> Limit {
        let mut l = Limit { workload: Some("w".into()), ..Default::default() };
        f(&mut l);
        l
    }

    fn req(to_primary: bool) -> Request<'static> {
        Request { workload: "w", user: "u", database: "d", to_primary }
    }

    #[test]
    fn matching_needs_every_field() {
        let l = Limiter::new(&rule(|l| l.user = Some("u".into())), Duration::from_secs(1));
        assert!(l.matches(&req(false)));
        assert!(!l.matches(&Request { user: "other", ..req(false) }));
        let w = Limiter::new(&rule(|l| l.writes_only = true), Duration::from_secs(1));
        assert!(!w.matches(&req(false)));
        assert!(w.matches(&req(true)));
        assert_eq!(w.name, "workload=w,writes");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_waits_then_refuses_with_53300() {
        let limits = Limits::new(&[rule(|l| {
            l.max_in_flight = Some(1);
            l.max_wait = Some(Dur(Duration::from_millis(100)));
        })], Duration::from_secs(5));
        let first = limits.admit(&req(false)).await.unwrap();
        let (code, msg) = limits.admit(&req(false)).await.err().unwrap();
        assert_eq!(code, "53300");
        assert!(msg.contains("\"workload=w\""), "{msg}");
        // Released before the deadline: the waiter gets the slot.
        let l2 = Arc::new(limits);
        let l3 = l2.clone();
        let waiter = tokio::spawn(async move { l3.admit(&req(false)).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(first);
        assert!(waiter.await.unwrap());
        assert_eq!(l2.rules[0].rejected.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_transaction_waiting_for_one_rule_holds_no_slot_of_another() {
        // database d: 2 in flight; workload "analytics" (within d): 1.
        let limits = Arc::new(Limits::new(
            &[
                rule(|l| {
                    l.workload = None;
                    l.database = Some("d".into());
                    l.max_in_flight = Some(2);
                }),
                rule(|l| {
                    l.workload = Some("analytics".into());
                    l.max_in_flight = Some(1);
                }),
            ],
            Duration::from_secs(5),
        ));
        let analytics = Request { workload: "analytics", ..req(false) };
        let first = limits.admit(&analytics).await.unwrap();
        let l = limits.clone();
        let second = tokio::spawn(async move { l.admit(&Request { workload: "analytics", ..req(false) }).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(10)).await;
        // The waiting analytics transaction does not hold d's second slot.
        let t0 = Instant::now();
        let other = limits.admit(&req(false)).await.unwrap();
        assert_eq!(t0.elapsed(), Duration::ZERO, "admitted at once");
        assert_eq!(limits.rules[1].waiting.load(Ordering::Relaxed), 1);
        drop(other);
        drop(first);
        assert!(second.await.unwrap(), "the waiter gets both slots once they are free");
        assert_eq!(limits.rules[0].in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_the_state_of_the_rules_it_did_not_change() {
        let kept = rule(|l| l.max_in_flight = Some(1));
        let changed = rule(|l| {
            l.workload = Some("other".into());
            l.max_in_flight = Some(1);
        });
        let old = Limits::new(&[kept.clone(), changed.clone()], Duration::from_secs(5));
        let held = old.admit(&req(false)).await.unwrap();
        let new = Limits::reloaded(&[kept, rule(|l| l.max_in_flight = Some(2))], Duration::from_secs(5), &old);
        // The unchanged rule still counts the transaction admitted before.
        assert!(Arc::ptr_eq(&new.rules[0], &old.rules[0]));
        assert_eq!(new.rules[0].in_flight(), 1);
        assert!(new.try_admit(&req(false)).is_none(), "still full");
        assert!(!Arc::ptr_eq(&new.rules[1], &old.rules[1]));
        drop(held);
        assert!(new.try_admit(&req(false)).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_two_identical_rules_apart_and_updates_the_default_wait_in_place() {
        let one = rule(|l| l.max_in_flight = Some(1));
        let old = Limits::new(&[one.clone(), one.clone()], Duration::from_secs(5));
        let held = old.admit(&req(false)).await.unwrap();
        // Only pool.checkout_timeout changed: the same rules, state kept.
        let new = Limits::reloaded(&[one.clone(), one], Duration::from_secs(1), &old);
        assert!(Arc::ptr_eq(&new.rules[0], &old.rules[0]) && Arc::ptr_eq(&new.rules[1], &old.rules[1]));
        assert_eq!(new.rules[0].max_wait(), Duration::from_secs(1));
        assert_eq!(new.rules[0].in_flight(), 1, "the transaction admitted before still counts");
        drop(held);
        // Two rules of one slot each: a transaction takes one of each and
        // is admitted at once (sharing one limiter, it would need two
        // slots of one and wait out max_wait for 53300).
        let t0 = Instant::now();
        let admitted = new.admit(&req(false)).await;
        assert!(admitted.is_ok() && t0.elapsed() == Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn token_bucket_paces_and_refuses_with_53300() {
        let limits = Limits::new(&[rule(|l| {
            l.rate = Some(10.0);
            l.burst = Some(2);
            l.max_wait = Some(Dur(Duration::from_millis(250)));
        })], Duration::from_secs(5));
        let t0 = Instant::now();
        for _ in 0..2 {
            limits.admit(&req(false)).await.unwrap();
        }
        assert_eq!(t0.elapsed(), Duration::ZERO, "the burst passes at once");
        limits.admit(&req(false)).await.unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(99), "then one per 100 ms");
        // Two reserved ahead (200 ms) and a third would wait 300 ms > 250 ms.
        let l = Arc::new(limits);
        let a = tokio::spawn({
            let l = l.clone();
            async move { l.admit(&req(false)).await.is_ok() }
        });
        let b = tokio::spawn({
            let l = l.clone();
            async move { l.admit(&req(false)).await.is_ok() }
        });
        tokio::task::yield_now().await;
        let (code, _) = l.admit(&req(false)).await.err().unwrap();
        assert_eq!(code, "53300");
        assert!(a.await.unwrap() && b.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_spreads_a_burst() {
        let p = Arc::new(TokenBucket::new(10.0, 10.0));
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..30)
            .map(|_| {
                let p = p.clone();
                tokio::spawn(async move { p.take_within(Duration::MAX).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        // 10 at once, then 20 more at 10/s.
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(1990) && took < Duration::from_millis(2100), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_queue() {
        let limits = Arc::new(Limits::new(&[rule(|l| {
            l.max_in_flight = Some(1);
            l.max_queue = Some(1);
        })], Duration::from_secs(5)));
        let _held = limits.admit(&req(false)).await.unwrap();
        let l = limits.clone();
        let _queued = tokio::spawn(async move { l.admit(&req(false)).await.is_ok() });
        tokio::task::yield_now().await;
        let (code, msg) = limits.admit(&req(false)).await.err().unwrap();
        assert_eq!(code, "53300");
        assert!(msg.contains("already waiting"), "{msg}");
    }

    #[tokio::test(start_paused = true)]
    async fn max_queue_zero_admits_what_fits_and_queues_nothing() {
        let limits = Limits::new(
            &[rule(|l| {
                l.max_in_flight = Some(2);
                l.max_queue = Some(0);
            })],
            Duration::from_secs(5),
        );
        let a = limits.admit(&req(false)).await.expect("fits");
        let b = limits.admit(&req(false)).await.expect("fits");
        let (code, msg) = limits.admit(&req(false)).await.err().unwrap();
        assert_eq!(
            (code, msg.contains("0 transactions already waiting")),
            ("53300", true),
            "{msg}"
        );
        assert_eq!(limits.rules[0].waiting.load(Ordering::Relaxed), 0);
        drop((a, b));
        limits.admit(&req(false)).await.expect("fits again");
        // Rate: a token now is fine; one that needs a wait is refused, and
        // the refused one does not use up the next token.
        let limits = Limits::new(
            &[rule(|l| {
                l.rate = Some(1.0);
                l.burst = Some(1);
                l.max_queue = Some(0);
            })],
            Duration::from_secs(5),
        );
        limits.admit(&req(false)).await.expect("a token");
        assert!(limits.admit(&req(false)).await.is_err());
        tokio::time::advance(Duration::from_millis(1001)).await;
        limits
            .admit(&req(false))
            .await
            .expect("the next token was not lost");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_by_a_later_rule_gives_the_rate_token_back() {
        // A rate rule and a concurrency rule matching the same transactions.
        let limits = Limits::new(
            &[
                rule(|l| {
                    l.rate = Some(1.0);
                    l.burst = Some(1);
                    l.max_wait = Some(Dur(Duration::from_millis(10)));
                }),
                rule(|l| {
                    l.max_in_flight = Some(1);
                    l.max_wait = Some(Dur(Duration::ZERO));
                }),
            ],
            Duration::from_secs(5),
        );
        let held = limits.admit(&req(false)).await.expect("both fit");
        tokio::time::advance(Duration::from_millis(1001)).await;
        // The rate passes, the concurrency rule refuses: the token is not spent.
        let (code, _) = limits.admit(&req(false)).await.err().unwrap();
        assert_eq!(code, "53300");
        drop(held);
        limits.admit(&req(false)).await.expect("the token the refused one took came back");
        // Dropped while waiting for its token (the client left): given back too.
        let limits = Arc::new(Limits::new(
            &[rule(|l| {
                l.rate = Some(1.0);
                l.burst = Some(1);
            })],
            Duration::from_secs(5),
        ));
        limits.admit(&req(false)).await.expect("the saved token");
        let l = limits.clone();
        let waiting = tokio::spawn(async move { l.admit(&req(false)).await.is_ok() });
        tokio::task::yield_now().await;
        waiting.abort();
        let _ = waiting.await;
        tokio::time::advance(Duration::from_millis(1001)).await;
        let t = Instant::now();
        limits.admit(&req(false)).await.unwrap();
        assert_eq!(t.elapsed(), Duration::ZERO, "the next token is this one's, not the abandoned waiter's");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pace_abandoned_while_waiting_gives_its_token_back() {
        let p = Arc::new(TokenBucket::new(10.0, 1.0));
        p.take_within(Duration::MAX).await;
        let t0 = Instant::now();
        // Nine takers give up while waiting for their turn.
        for _ in 0..9 {
            let p = p.clone();
            let t = tokio::spawn(async move { p.take_within(Duration::MAX).await });
            tokio::task::yield_now().await;
            t.abort();
            let _ = t.await;
        }
        p.take_within(Duration::MAX).await;
        let took = t0.elapsed();
        assert!(took <= Duration::from_millis(101), "the next one waits for one token, not ten: {took:?}");
    }

    #[test]
    fn a_tiny_rate_means_waits_too_long_not_a_panic() {
        let b = TokenBucket::new(1e-300, 1.0);
        assert_eq!(b.reserve(Duration::from_secs(1)), Some(Duration::ZERO));
        assert_eq!(b.reserve(Duration::from_secs(1)), None);
    }
}
