//! The shell: everything that does IO around the core.
//!
//! Invariants: `app` may use `store`, `broker`, `messages`, `domain`, `config` and `telemetry`;
//! it holds no business rule of its own. A delivery is acknowledged only after the transaction
//! recording its effects has committed, or after it has been parked with a broker confirm.
//!
//! Reading order: `worker` (the `run` command: supervisor, consumer, lanes, watchdog, relay and
//! sweep tasks), `handler` (one batch of deliveries), `parking`, `direct` (a lane's outcomes
//! published after its commit), `relay`; then the operator
//! commands (`ops`, `parked`, `resync`, `audit` (`verify`), `simulate`, and `progress`,
//! which they share) and the HTTP endpoint (`http`). `retry` and `connect`
//! are shared by all of them.

pub mod audit;
pub mod connect;
pub mod direct;
pub mod handler;
pub mod http;
pub mod ops;
pub mod parked;
mod parking;
pub mod progress;
pub mod relay;
pub mod resync;
pub mod retry;
pub mod simulate;
pub mod worker;
