//! induction-reconciler: reconciles school registrations and appropriate-body claims for early
//! career teacher induction, and emits `confirmed`, `provisional`, `conflict` and `closed`
//! outcomes.
//!
//! Modules, in reading order (ARCHITECTURE.md gives each one's invariants):
//! - [`domain`]: the pure core (records, the inbox rule, the reconcile function, the emission
//!   rule, the in-memory `Ledger`).
//! - [`messages`]: the wire contract (decoding inputs, reason codes, a cheap peek at a body, the
//!   outcome message).
//! - [`store`]: PostgreSQL (batches in one transaction, the lock order, the outbox, the sweep,
//!   `explain`).
//! - [`broker`]: RabbitMQ (connections with recovery, topology, publishing with confirms,
//!   consuming, the parking headers).
//! - [`app`]: the shell (the worker, the delivery handler, parking, the relay, operator commands,
//!   `simulate`, the HTTP endpoint).
//! - [`config`]: settings from defaults, a file and the environment.
//! - [`telemetry`]: logs, traces, metrics and the typed events that are both logged and counted.
//! - [`cli`]: the command line.

pub mod app;
pub mod broker;
pub mod cli;
pub mod config;
pub mod domain;
pub mod messages;
pub mod store;
pub mod telemetry;
