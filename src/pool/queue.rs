//! The pool's queue: what a waiting checkout is handed, its place in the
//! queue, the slot of a connection being opened, the expiry task that keeps
//! the waiters' deadlines, and the backoff after failed connects.

use super::{Conn, Pool};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// What a waiter is handed: a ready connection, the right to open one (a
/// slot freed by a closed connection; already counted in `total`), or the
/// news that its deadline passed first.
pub(super) enum Grant {
    Conn(Conn),
    Slot,
    Expired,
    /// The pool was retired by a reload: it will never serve this checkout.
    Retired,
}

/// A checkout waiting for a connection. Deadlines are kept by the pool's
/// expiry task (one timer per pool, armed at the earliest deadline and
/// re-armed only when it fires or an earlier one arrives) instead of a
/// timer per waiting checkout: at a few hundred clients almost every
/// transaction waits, and each per-wait timer meant a timer-wheel insert
/// and removal under the driver's lock.
pub(super) struct Waiter {
    pub(super) tx: oneshot::Sender<Grant>,
    pub(super) deadline: Instant,
    pub(super) since: Instant,
}

/// A checkout's place in the queue. Dropped before its grant arrives (the
/// client left, was killed): it leaves the queue, and a grant already sent
/// is passed on, so no connection or slot is lost with it.
pub(super) struct Queued<'a> {
    pub(super) pool: &'a Pool,
    pub(super) rx: oneshot::Receiver<Grant>,
}

impl std::future::Future for Queued<'_> {
    type Output = Result<Grant, oneshot::error::RecvError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.rx).poll(cx)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        // After close() nothing more can be sent: what is in is all there is.
        self.rx.close();
        match self.rx.try_recv() {
            Ok(Grant::Conn(c)) => self.pool.checkin(c),
            Ok(Grant::Slot) => self.pool.release_slot(),
            Ok(Grant::Expired | Grant::Retired) | Err(_) => {}
        }
    }
}

/// A slot counted in `total` while its connection is being opened; given
/// back when dropped (the connect failed, or the checkout was dropped).
pub(super) struct Slot<'a>(pub(super) &'a Pool);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.release_slot();
    }
}

/// The pool's expiry task: sleeps until the earliest waiter deadline (or
/// until told an earlier one was queued), expires what is due, repeats.
/// Ends when the pool is dropped.
pub(super) async fn expire_waiters(pool: std::sync::Weak<Pool>, wake: Arc<tokio::sync::Notify>) {
    loop {
        let next = match pool.upgrade() {
            Some(p) => p.expire(Instant::now()),
            None => return,
        };
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                    _ = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

#[derive(Default)]
pub(super) struct Backoff {
    pub(super) failures: u32,
    pub(super) until: Option<Instant>,
}

/// Delay after `failures` consecutive failed connects: 50 ms doubling up
/// to 2 s, times a random factor in [0.5, 1.5) so retries spread out.
pub(super) fn backoff_delay(failures: u32) -> Duration {
    let base = Duration::from_millis(50) * (1u32 << failures.min(7).saturating_sub(1));
    base.min(Duration::from_secs(2)).mul_f64(0.5 + rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::backoff_delay;
    use std::time::Duration;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        for _ in 0..100 {
            let first = backoff_delay(1);
            assert!(first >= Duration::from_millis(25) && first < Duration::from_millis(75), "{first:?}");
            let capped = backoff_delay(30);
            assert!(capped >= Duration::from_secs(1) && capped < Duration::from_secs(3), "{capped:?}");
        }
        let a: Vec<_> = (0..20).map(|_| backoff_delay(3)).collect();
        assert!(a.iter().any(|d| *d != a[0]), "jittered");
        // Grows: 50 ms, 100 ms, 200 ms ... (each ±50 %).
        assert!(a.iter().all(|d| *d >= Duration::from_millis(100) && *d < Duration::from_millis(300)), "{a:?}");
    }
}
