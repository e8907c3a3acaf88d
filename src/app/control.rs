//! The control plane's thread. The lag monitor, pool upkeep, function
//! catalog loads and the metrics endpoint run on a current-thread runtime
//! of their own, not on the workers that relay clients.
//!
//! Measured (`pgbench -S -c 1`, two workers, `perf stat`): with the
//! upkeep's 500 ms tick on the workers, the thread relaying the client
//! changed CPU on almost every wakeup (80k CPU migrations in 5 s, against
//! about 20 with the tick moved away), which cost about 9 % of the TPS.
//! What `perf` showed: the worker waiting in `epoll_wait` changes now and
//! then (a timer task and the client's task runnable at once make tokio
//! wake the other worker, which can take over the I/O driver), and after
//! such a change the kernel often moved the relaying thread between the
//! CPUs of pgbench and PostgreSQL on every wakeup.

use tokio::runtime::Handle;

/// Starts the control thread and returns its runtime's handle. The thread
/// ends when the runtime that called this shuts down (in tests: each
/// test's runtime), cancelling what runs on it. If no thread can be
/// started, the control work runs on the calling runtime.
pub(super) fn start() -> Handle {
    let (alive, ended) = tokio::sync::oneshot::channel::<()>();
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    // The runtime is built, run and dropped on the thread itself (a runtime
    // must not be dropped inside another one).
    let thread = std::thread::Builder::new().name("pgfleet-control".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = handle_tx.send(Err(e.to_string()));
                return;
            }
        };
        let _ = handle_tx.send(Ok(rt.handle().clone()));
        rt.block_on(async {
            let _ = ended.await;
        });
    });
    let handle = match thread.map_err(|e| e.to_string()).and_then(|_| handle_rx.recv().map_err(|e| e.to_string())?) {
        Ok(handle) => handle,
        Err(e) => {
            tracing::warn!(error = %e, "no control thread: background work runs on the workers");
            return Handle::current();
        }
    };
    // Held by a task of the calling runtime: dropped, ending the control
    // thread, when that runtime shuts down.
    tokio::spawn(async move {
        let _alive = alive;
        std::future::pending::<()>().await
    });
    handle
}

/// How long a background task that panicked waits before it runs again.
const RESTART_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs the task `make` builds on `rt`, and builds and runs a new one if it
/// panics, so one bug cannot stop the lag monitor or the pool upkeep for
/// good (a frozen lag snapshot would keep routing reads by stale lag). A
/// task that returns, or is cancelled because its runtime shuts down, is
/// not run again.
/// `restarts` counts the panics.
pub(crate) fn supervise<F, Fut>(rt: &Handle, name: &'static str, restarts: prometheus::IntCounter, make: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let inner = rt.clone();
    rt.spawn(async move {
        loop {
            match inner.spawn(make()).await {
                Err(e) if e.is_panic() => {
                    restarts.inc();
                    tracing::error!(task = name, "background task panicked; it runs again in {RESTART_AFTER:?}");
                    tokio::time::sleep(RESTART_AFTER).await;
                }
                _ => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_runs_again_and_one_that_returns_does_not() {
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let restarts = prometheus::IntCounter::new("restarts", "test").unwrap();
        supervise(&Handle::current(), "test", restarts.clone(), move || {
            let r = r.clone();
            async move {
                if r.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("a bug in a background task");
                }
            }
        });
        tokio::time::sleep(RESTART_AFTER * 10).await;
        // Two panics, then a run that returned: three runs, no fourth.
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(restarts.get(), 2);
    }
}
