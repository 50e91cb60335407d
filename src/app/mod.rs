//! The shell: everything that does IO around the core.
//!
//! Invariants: `app` may use `store`, `broker`, `messages` and `domain`; it holds no business rule
//! of its own. A delivery is acknowledged only after the transaction recording its effects has
//! committed, or after it has been parked with a broker confirm.

pub mod bench;
pub mod handler;
pub mod http;
pub mod ops;
pub mod parked;
pub mod relay;
pub mod run;
pub mod simulate;
pub mod workload;
