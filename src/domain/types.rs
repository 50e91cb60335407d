//! Value types of the domain: identifiers, programmes, terms and the snapshot ordering stamp.
//!
//! Every constructor here parses: a value that exists is valid. Validation of untrusted input
//! (and the error messages an upstream team reads) lives in `messages`; these constructors return
//! `None` for anything that is not a valid value.

use std::fmt;

use time::OffsetDateTime;
use uuid::Uuid;

/// A teacher reference number: exactly seven ASCII digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Trn(String);

impl Trn {
    /// Parses a TRN, returning `None` unless it is exactly seven ASCII digits.
    pub fn parse(text: &str) -> Option<Self> {
        (text.len() == 7 && text.bytes().all(|b| b.is_ascii_digit())).then(|| Self(text.to_owned()))
    }

    /// The TRN as text. Personal data: never put it in a log line.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An upstream identifier: 1 to 64 characters of `A-Z a-z 0-9 . _ : -`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceId(String);

impl SourceId {
    /// Parses an identifier, returning `None` if it is empty, too long or has another character.
    pub fn parse(text: &str) -> Option<Self> {
        let ok = (1..=64).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        ok.then(|| Self(text.to_owned()))
    }

    /// The identifier as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A school's unique reference number, 100000 to 999999.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SchoolUrn(u32);

impl SchoolUrn {
    /// Parses a URN, returning `None` outside 100000..=999999.
    pub fn new(value: u64) -> Option<Self> {
        (100_000..=999_999)
            .contains(&value)
            .then_some(Self(value as u32))
    }

    /// The URN as a number.
    pub fn get(self) -> u32 {
        self.0
    }
}

/// The training programme, after legacy values have been mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Programme {
    /// Training delivered by a lead provider.
    ProviderLed,
    /// Training the school designs and delivers itself.
    SchoolLed,
}

impl Programme {
    /// The value as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ProviderLed => "provider_led",
            Self::SchoolLed => "school_led",
        }
    }

    /// Parses a current (non-legacy) wire value.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "provider_led" => Some(Self::ProviderLed),
            "school_led" => Some(Self::SchoolLed),
            _ => None,
        }
    }
}

/// The recorded result of a completed induction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InductionResult {
    /// The ECT passed induction.
    Pass,
    /// The ECT failed induction.
    Fail,
}

impl InductionResult {
    /// The value as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Fail => "fail",
        }
    }

    /// Parses a wire value.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "pass" => Some(Self::Pass),
            "fail" => Some(Self::Fail),
            _ => None,
        }
    }
}

/// Where a snapshot comes from: reported now, or loaded from an earlier system (the ECF1 service
/// or the TRA AB portal's history). Migrated snapshots are reconciled exactly like live ones; the
/// origin only travels onto outcomes so that consumers can tell history from news.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Origin {
    /// Reported by the source service now (the default).
    #[default]
    Live,
    /// Loaded from an earlier system's history.
    Migration,
}

impl Origin {
    /// The value as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Migration => "migration",
        }
    }

    /// Parses a wire value.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "live" => Some(Self::Live),
            "migration" => Some(Self::Migration),
            _ => None,
        }
    }
}

/// A number of terms served, 0 to 16 in steps of one tenth, held exactly as tenths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Terms(u8);

impl Terms {
    /// Builds a value from tenths of a term, returning `None` above 160 (16 terms).
    pub fn from_tenths(tenths: u32) -> Option<Self> {
        (tenths <= 160).then_some(Self(tenths as u8))
    }

    /// The number of tenths of a term.
    pub fn tenths(self) -> u8 {
        self.0
    }

    /// The value as a number of terms.
    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / 10.0
    }
}

/// The position of a snapshot in its record's history: `(occurred_at, message_id)`.
///
/// Timestamps compare as instants (the offset does not matter); ties are broken by the
/// message id, whose byte order equals the order of its lower-case hyphenated text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp {
    /// When the fact changed at the source.
    pub occurred_at: OffsetDateTime,
    /// The producer's idempotency key.
    pub message_id: Uuid,
}

impl Ord for Stamp {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.occurred_at
            .cmp(&other.occurred_at)
            .then_with(|| self.message_id.cmp(&other.message_id))
    }
}

impl PartialOrd for Stamp {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn trn_is_exactly_seven_digits() {
        assert!(Trn::parse("1234567").is_some());
        assert!(Trn::parse("123456").is_none());
        assert!(Trn::parse("12345678").is_none());
        assert!(Trn::parse("12345a7").is_none());
        assert!(Trn::parse("１２３４５６７").is_none());
    }

    #[test]
    fn source_id_boundaries() {
        assert!(SourceId::parse("").is_none());
        assert!(SourceId::parse(&"a".repeat(64)).is_some());
        assert!(SourceId::parse(&"a".repeat(65)).is_none());
        assert!(SourceId::parse("AB-1.x_y:z").is_some());
        assert!(SourceId::parse("a b").is_none());
        assert!(SourceId::parse("a/b").is_none());
    }

    #[test]
    fn urn_boundaries() {
        assert!(SchoolUrn::new(99_999).is_none());
        assert!(SchoolUrn::new(100_000).is_some());
        assert!(SchoolUrn::new(999_999).is_some());
        assert!(SchoolUrn::new(1_000_000).is_none());
    }

    #[test]
    fn stamp_compares_instants_then_message_id() {
        let a = Uuid::parse_str("00000000-0000-4000-8000-00000000000a").unwrap();
        let b = Uuid::parse_str("00000000-0000-4000-8000-00000000000b").unwrap();
        let utc = datetime!(2025-01-01 12:00 UTC);
        let same_instant = datetime!(2025-01-01 13:00 +01:00);
        let earlier_text_later_instant = datetime!(2025-01-01 11:30 -01:00);
        assert!(
            Stamp {
                occurred_at: utc,
                message_id: a
            } < Stamp {
                occurred_at: same_instant,
                message_id: b
            }
        );
        assert!(
            Stamp {
                occurred_at: same_instant,
                message_id: b
            } > Stamp {
                occurred_at: utc,
                message_id: a
            }
        );
        assert!(
            Stamp {
                occurred_at: utc,
                message_id: b
            } < Stamp {
                occurred_at: earlier_text_later_instant,
                message_id: a
            }
        );
    }

    #[test]
    fn message_id_byte_order_is_lower_case_text_order() {
        let ids = [
            "0f000000-0000-4000-8000-000000000000",
            "a0000000-0000-4000-8000-000000000000",
            "9fffffff-ffff-4fff-bfff-ffffffffffff",
        ];
        let mut by_bytes: Vec<Uuid> = ids.iter().map(|s| Uuid::parse_str(s).unwrap()).collect();
        by_bytes.sort();
        let mut by_text: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        by_text.sort();
        let rendered: Vec<String> = by_bytes
            .iter()
            .map(|u| u.hyphenated().to_string())
            .collect();
        assert_eq!(rendered, by_text);
    }
}
