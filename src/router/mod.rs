//! Routing decisions, pure and synchronous. For now: statement
//! classification (read/write and session effects).

pub mod classify;
pub mod lex;
pub mod route;
pub mod settings;

pub use classify::{classify, classify_as, name_hash, Analysis, Class, RouteHint, TxControl};
