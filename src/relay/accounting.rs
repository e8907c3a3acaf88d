//! Counters and metrics a session feeds: requests, cycles, transactions,
//! bytes (SHOW STATS, Prometheus). Atomics only on this path.

use super::*;

impl Session {
    /// Accounts a client message going to the server.
    pub(super) fn count_request(&mut self, msg: &[u8]) {
        let now = self.now;
        // Copy data and Flush get no answer of their own: they start no
        // cycle (CopyData the server ignores after a failed COPY would
        // start the next query's clock early).
        if !matches!(msg[0], b'd' | b'c' | b'f' | b'H') {
            self.cycle_start.get_or_insert(now);
            self.txn_start.get_or_insert(now);
            self.query_clock.get_or_insert(now);
        }
        let len = msg.len() as u64;
        self.metrics.received.inc_by(len);
        if let Some(pool) = &self.bound_pool {
            let c = &pool.counters;
            PoolCounters::add(&c.received, len);
            match msg[0] {
                b'Q' | b'E' => {
                    PoolCounters::add(&c.queries, 1);
                    self.metrics.queries.inc();
                    self.workload_stats.queries.fetch_add(1, Ordering::Relaxed);
                }
                b'P' => PoolCounters::add(&c.client_parses, 1),
                b'B' => PoolCounters::add(&c.binds, 1),
                _ => {}
            }
        }
    }

    /// ReadyForQuery ended a request cycle (and maybe a transaction).
    pub(super) fn count_cycle_end(&mut self, status: u8) {
        self.statement_done();
        let Some(pool) = &self.bound_pool else { return };
        let now = self.now;
        if let Some(t) = self.cycle_start.take() {
            // Pipelined requests still pending: the next one's time (for
            // timeouts.query too) starts now.
            if !self.expect.is_empty() {
                self.cycle_start = Some(now);
            }
            let e = now.saturating_duration_since(t);
            PoolCounters::add(&pool.counters.query_us, e.as_micros() as u64);
            let h = if matches!(self.bound_target, Some(Target::Replica(_))) { &self.metrics.latency_replica } else { &self.metrics.latency_primary };
            h.observe(e.as_secs_f64());
        }
        if status == b'I' {
            if let Some(t) = self.txn_start.take() {
                PoolCounters::add(&pool.counters.xacts, 1);
                PoolCounters::add(&pool.counters.xact_us, now.saturating_duration_since(t).as_micros() as u64);
                self.metrics.transactions.inc();
            }
        }
    }

    /// A statement ended (an Execute's or a simple Query's CommandComplete,
    /// or ReadyForQuery): `timeouts.query` times the next one from now, as
    /// PostgreSQL's statement_timeout restarts per statement, or nothing
    /// while nothing is pending (a pipeline that flushed and waits for the
    /// client's next message is not running a query).
    pub(super) fn statement_done(&mut self) {
        self.query_clock = (!self.expect.is_empty()).then_some(self.now);
        self.cancel_sent = false;
    }

    /// Counts bytes that went to the client.
    pub(super) fn count_sent(&mut self, n: usize) {
        if n > 0 {
            self.metrics.sent.inc_by(n as u64);
            if let Some(pool) = &self.bound_pool {
                PoolCounters::add(&pool.counters.sent, n as u64);
            }
        }
    }

    /// A new workload (SET pgfleet.workload): metric handles follow it.
    pub(super) fn workload_changed(&mut self) {
        let wl = self.workload.clone().unwrap_or_default();
        self.metrics = self.app.metrics.for_client(&self.database, &self.user, &wl);
        self.workload_stats = self.app.workload_counters(&wl);
    }
}
