//! Why a message was parked: the contract's reason codes and a detail sentence for operators.

use std::fmt;

/// The reason codes of CONTRACT.md section 3, in the order they are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReasonCode {
    /// Body over 65,536 bytes.
    TooLarge,
    /// Body not UTF-8.
    InvalidUtf8,
    /// Not JSON, or not a JSON object.
    InvalidJson,
    /// `message_type` missing or not one of the two.
    UnknownMessageType,
    /// No AMQP `user_id`, a `user_id` not allowed for the `message_type`, or another type's
    /// routing key (CONTRACT.md section 2, "Who may say what").
    UnauthorisedPublisher,
    /// `schema_version` missing, not an integer, or not 1.
    UnsupportedSchemaVersion,
    /// A field rule broken.
    InvalidField,
    /// `occurred_at` more than one hour ahead of the worker's clock.
    OccurredAtInFuture,
    /// The `message_id` of an accepted message, with different bytes.
    MessageIdReused,
    /// Processing failed repeatedly for a reason that is not an outage.
    ProcessingFailed,
}

impl ReasonCode {
    /// Every code, in precedence order.
    pub const ALL: [ReasonCode; 10] = [
        Self::TooLarge,
        Self::InvalidUtf8,
        Self::InvalidJson,
        Self::UnknownMessageType,
        Self::UnauthorisedPublisher,
        Self::UnsupportedSchemaVersion,
        Self::InvalidField,
        Self::OccurredAtInFuture,
        Self::MessageIdReused,
        Self::ProcessingFailed,
    ];

    /// The code as it appears in `x-parked-reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::InvalidJson => "invalid_json",
            Self::UnknownMessageType => "unknown_message_type",
            Self::UnauthorisedPublisher => "unauthorised_publisher",
            Self::UnsupportedSchemaVersion => "unsupported_schema_version",
            Self::InvalidField => "invalid_field",
            Self::OccurredAtInFuture => "occurred_at_in_future",
            Self::MessageIdReused => "message_id_reused",
            Self::ProcessingFailed => "processing_failed",
        }
    }

    /// Parses a code from its wire form.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|code| code.as_str() == text)
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message that cannot be accepted: the reason code and a sentence naming the field.
///
/// The detail never contains a value taken from the message, so it is safe to log and to put
/// in the `x-parked-detail` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Rejection {
    /// The contract's reason code.
    pub reason: ReasonCode,
    /// A human sentence naming the field and the rule.
    pub detail: String,
}

impl Rejection {
    /// A rejection with the given code and detail.
    pub fn new(reason: ReasonCode, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }

    /// The `message_id_reused` rejection: the inbox accepted this id with another body.
    pub fn reused_id() -> Self {
        Self::new(
            ReasonCode::MessageIdReused,
            "message_id was already accepted with a different body",
        )
    }

    /// An `invalid_field` rejection.
    pub fn field(detail: impl Into<String>) -> Self {
        Self::new(ReasonCode::InvalidField, detail)
    }
}
