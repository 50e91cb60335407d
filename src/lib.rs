//! induction-reconciler: reconciles school registrations and appropriate-body claims for early
//! career teacher induction, and emits `confirmed`, `provisional`, `conflict` and `closed`
//! outcomes.
//!
//! Modules, in reading order:
//! - [`domain`]: the pure core (records, the reconcile function, the emission rule).
//! - [`messages`]: the wire contract (decoding inputs, reason codes, the outcome message).
//! - [`app`]: the shell (`simulate`; the worker's delivery handler, relay and sweep).
//! - [`cli`]: the command line.

pub mod app;
pub mod broker;
pub mod cli;
pub mod config;
pub mod domain;
pub mod messages;
pub mod store;
pub mod telemetry;
