//! Integration tests: real PostgreSQL primary + streaming replicas, pgfleet
//! in-process, real clients (tokio-postgres, psql, pgbench, raw protocol).

mod harness;

mod admin;
mod auth;
mod basic;
mod drivers;
mod failover;
mod lifecycle;
mod limits;
mod ops;
mod pgbench;
mod pooling;
mod routing;
mod protocol;
mod psql;
mod session_state;
mod storm;
mod timeouts;
mod tls;
