//! The pure core: records, the inbox rule, the reconcile function and the emission rule.
//!
//! Invariants: nothing here does IO, reads a clock, draws random numbers, knows serde or tokio,
//! or can fail. Time and identifiers come in as arguments.

mod emission;
mod inbox;
mod ledger;
mod reconcile;
mod records;
mod types;

pub use emission::{Cause, MessageKind, Outcome, correct, emit, sweep};
pub use inbox::{Receipt, receipt};
pub use ledger::{Applied, Ledger};
pub use reconcile::{Discrepancy, Reason, Reconciliation, Resolved, Source, Status, reconcile};
pub use records::{Admission, Claim, Record, RecordKey, Registration, Snapshot, admit};
pub use types::{InductionResult, Origin, Programme, SchoolUrn, SourceId, Stamp, Terms, Trn};
