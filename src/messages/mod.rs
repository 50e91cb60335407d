//! The wire contract: decoding input messages from raw bytes into domain types, the reason
//! codes a message is parked with, and the outcome message.
//!
//! Invariants: no IO and no clock (the decoder is given `now`); details of a rejection never
//! echo a value from the message.

mod authority;
mod decode;
mod outcome;
mod peek;
mod rejection;

pub use authority::{Provenance, Publishers};
pub use decode::{
    EARLIEST_CLAIM_START, EARLIEST_REGISTRATION_START, Input, MAX_BODY_BYTES, MAX_CLOCK_SKEW,
    decode, decode_delivery,
};
pub use outcome::{
    CauseMessage, InductionPeriodMessage, OriginField, OutcomeMessage, RegistrationMessage,
    ResolvedMessage, UnreadableOutcome,
};
pub use peek::{Peek, peek};
pub use rejection::{ReasonCode, Rejection};
