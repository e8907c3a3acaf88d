//! The control plane's thread. The lag monitor, pool upkeep, function
//! catalog loads and the metrics endpoint run on a current-thread runtime
//! of their own, not on the workers that relay clients.
//!
//! Measured (`pgbench -S -c 1`, two workers): the upkeep's 500 ms tick
//! alone, running on the workers, made the worker serving the client
//! change CPU on almost every wakeup (0.9 CPU migrations per wakeup
//! against none without the tick) and cost about 9 % of the TPS. A timer
//! that fires with a client's wakeup makes two tasks runnable, tokio
//! wakes the other worker, which may take over the I/O driver; the kernel
//! then keeps moving the relaying thread between the CPUs of the client
//! and of PostgreSQL.

use tokio::runtime::Handle;

/// Starts the control thread and returns its runtime's handle. The thread
/// ends when the runtime that called this shuts down (in tests: each
/// test's runtime), cancelling what runs on it. If no thread can be
/// started, the control work runs on the calling runtime.
pub(super) fn start() -> Handle {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::warn!(error = %e, "no control runtime: background work runs on the workers");
            return Handle::current();
        }
    };
    let handle = rt.handle().clone();
    let (alive, ended) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new().name("pgfleet-control".into()).spawn(move || {
        rt.block_on(async {
            let _ = ended.await;
        });
    });
    if let Err(e) = thread {
        tracing::warn!(error = %e, "no control thread: background work runs on the workers");
        return Handle::current();
    }
    // Held by a task of the calling runtime: dropped, ending the control
    // thread, when that runtime shuts down.
    tokio::spawn(async move {
        let _alive = alive;
        std::future::pending::<()>().await
    });
    handle
}
