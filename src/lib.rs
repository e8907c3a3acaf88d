//! pgfleet: a PostgreSQL connection pooler and read/write router.
//!
//! Layers, dependencies pointing one way:
//! `frontend -> relay -> pool -> backend -> wire`; `config` and `wire` are
//! leaves. See DESIGN.md in the repository for the data path.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod backend;
pub mod catalog;
pub mod config;
pub mod frontend;
pub mod limits;
pub mod net;
pub mod pool;
pub mod relay;
pub mod router;
pub mod stats;
pub mod tls;
pub mod topology;
pub mod wire;
