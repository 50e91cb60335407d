//! Decoding an input message from its raw bytes into domain types, applying every rule of
//! CONTRACT.md section 3 in the contract's precedence order.
//!
//! Unknown fields are never read, so nothing upstream sends beyond the contract is kept.

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::macros::date;
use time::{Date, Duration, OffsetDateTime};
use uuid::Uuid;

use super::authority::{Provenance, Publishers};
use super::rejection::{ReasonCode, Rejection};
use crate::domain::{
    Cause, Claim, InductionResult, MessageKind, Origin, Programme, Record, Registration, SchoolUrn,
    Snapshot, SourceId, Stamp, Terms, Trn,
};

/// The largest body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 65_536;

/// How far ahead of the worker's clock `occurred_at` may be.
pub const MAX_CLOCK_SKEW: Duration = Duration::hours(1);

/// The earliest `started_on` of a school registration.
pub const EARLIEST_REGISTRATION_START: Date = date!(2021 - 09 - 01);

/// The earliest `started_on` of an AB claim.
pub const EARLIEST_CLAIM_START: Date = date!(1999 - 09 - 01);

/// An input message that passed every rule: the snapshot it carries and what caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// The record snapshot.
    pub snapshot: Snapshot,
    /// The envelope fields copied onto outcomes.
    pub cause: Cause,
    /// The RabbitMQ user it is judged to come from (`decode_delivery`); `None` from `decode`,
    /// which sees a body only (`simulate`).
    pub publisher: Option<String>,
}

impl Input {
    /// The producer's idempotency key.
    pub fn message_id(&self) -> Uuid {
        self.cause.message_id
    }
}

/// Decodes one message body. `now` is the worker's clock, used only for the
/// `occurred_at_in_future` rule.
pub fn decode(body: &[u8], now: OffsetDateTime) -> Result<Input, Rejection> {
    decode_checked(body, now, None)
}

/// Decodes a delivered message: every rule of [`decode`], and, in the contract's precedence
/// order (right after `unknown_message_type`), who published it under which routing key.
pub fn decode_delivery(
    body: &[u8],
    now: OffsetDateTime,
    publishers: &Publishers,
    provenance: &Provenance<'_>,
) -> Result<Input, Rejection> {
    decode_checked(body, now, Some((publishers, provenance)))
}

fn decode_checked(
    body: &[u8],
    now: OffsetDateTime,
    authority: Option<(&Publishers, &Provenance<'_>)>,
) -> Result<Input, Rejection> {
    let envelope = parse_object(body)?;
    let kind = message_kind(&envelope)?;
    let publisher = authority
        .map(|(publishers, provenance)| publishers.authorise(kind, provenance))
        .transpose()?;
    check_schema_version(&envelope)?;

    let fields = Fields::new(&envelope, "");
    let message_id = fields.required("message_id", parse_uuid, "a UUID in hyphenated form")?;
    let occurred_at = fields.required(
        "occurred_at",
        parse_timestamp,
        "an RFC 3339 timestamp with an offset",
    )?;
    let correlation_id = fields.optional(
        "correlation_id",
        |v| v.as_str().map(str::to_owned),
        "a string",
    )?;
    let origin = fields
        .optional(
            "origin",
            |v| v.as_str().and_then(Origin::parse),
            "\"live\" or \"migration\"",
        )?
        .unwrap_or_default();
    let payload = match present(&envelope, "payload") {
        Some(Value::Object(payload)) => Fields::new(payload, "payload."),
        Some(_) => return Err(Rejection::field("payload must be a JSON object")),
        None => return Err(Rejection::field("payload is required")),
    };
    let record = match kind {
        MessageKind::SchoolRegistration => Record::Registration(registration(&payload, origin)?),
        MessageKind::AbClaim => Record::Claim(claim(&payload, occurred_at.date(), origin)?),
    };

    if occurred_at > now + MAX_CLOCK_SKEW {
        return Err(Rejection::new(
            ReasonCode::OccurredAtInFuture,
            "occurred_at is more than 1 hour ahead of the worker's clock",
        ));
    }

    Ok(Input {
        snapshot: Snapshot {
            record,
            stamp: Stamp {
                occurred_at,
                message_id,
            },
        },
        cause: Cause {
            message_id,
            message_type: kind,
            occurred_at,
            correlation_id,
            origin,
        },
        publisher,
    })
}

/// The first checks, in the contract's order: size, UTF-8, JSON, an object.
fn parse_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, Rejection> {
    if body.len() > MAX_BODY_BYTES {
        return Err(Rejection::new(
            ReasonCode::TooLarge,
            format!(
                "the body is {} bytes; at most {MAX_BODY_BYTES} are accepted",
                body.len()
            ),
        ));
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        Rejection::new(
            ReasonCode::InvalidUtf8,
            format!(
                "the body is not valid UTF-8 (first bad byte at offset {})",
                e.valid_up_to()
            ),
        )
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        Rejection::new(
            ReasonCode::InvalidJson,
            format!(
                "the body is not valid JSON ({} at line {} column {})",
                json_error_kind(&e),
                e.line(),
                e.column()
            ),
        )
    })?;
    match value {
        Value::Object(envelope) => Ok(envelope),
        _ => Err(Rejection::new(
            ReasonCode::InvalidJson,
            "the body is JSON but not a JSON object",
        )),
    }
}

fn message_kind(envelope: &serde_json::Map<String, Value>) -> Result<MessageKind, Rejection> {
    let unknown = |detail: &str| Rejection::new(ReasonCode::UnknownMessageType, detail);
    match present(envelope, "message_type") {
        Some(Value::String(s)) if s == "school_registration" => Ok(MessageKind::SchoolRegistration),
        Some(Value::String(s)) if s == "ab_claim" => Ok(MessageKind::AbClaim),
        Some(_) => Err(unknown(
            "message_type must be \"school_registration\" or \"ab_claim\"",
        )),
        None => Err(unknown("message_type is required")),
    }
}

fn check_schema_version(envelope: &serde_json::Map<String, Value>) -> Result<(), Rejection> {
    let unsupported = |detail: &str| Rejection::new(ReasonCode::UnsupportedSchemaVersion, detail);
    match present(envelope, "schema_version") {
        Some(Value::Number(n)) if n.as_u64() == Some(1) => Ok(()),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => Err(unsupported(
            "schema_version must be 1, the only version this worker supports",
        )),
        Some(_) => Err(unsupported("schema_version must be the JSON integer 1")),
        None => Err(unsupported("schema_version is required")),
    }
}

fn registration(p: &Fields<'_>, origin: Origin) -> Result<Registration, Rejection> {
    let registration_id = p.required("registration_id", parse_id, ID_RULE)?;
    let trn = p.required("trn", parse_trn, TRN_RULE)?;
    let school_urn = p.required(
        "school_urn",
        |v| v.as_u64().and_then(SchoolUrn::new),
        "an integer from 100000 to 999999",
    )?;
    let started_on = p.required("started_on", parse_date, DATE_RULE)?;
    if started_on < EARLIEST_REGISTRATION_START {
        return Err(p.broken("started_on", "must be on or after 2021-09-01"));
    }
    let finished_on = p.optional("finished_on", parse_date, DATE_RULE)?;
    if finished_on.is_some_and(|f| f < started_on) {
        return Err(p.broken("finished_on", "must be on or after payload.started_on"));
    }
    let appropriate_body_id = p.required("appropriate_body_id", parse_id, ID_RULE)?;
    let training_programme = p.required(
        "training_programme",
        |v| v.as_str().and_then(registration_programme),
        "one of provider_led, school_led or a legacy value (fip, full_induction_programme, \
         school_funded_fip, cip, diy, core_induction_programme, design_our_own)",
    )?;
    let lead_provider_id = p.optional("lead_provider_id", parse_id, ID_RULE)?;
    match (training_programme, &lead_provider_id) {
        (Programme::ProviderLed, None) => {
            return Err(p.broken(
                "lead_provider_id",
                "is required when the training programme is provider_led",
            ));
        }
        (Programme::SchoolLed, Some(_)) => {
            return Err(p.broken(
                "lead_provider_id",
                "must be null or absent when the training programme is school_led",
            ));
        }
        _ => {}
    }
    let deleted = p
        .optional("deleted", Value::as_bool, "a boolean")?
        .unwrap_or(false);
    Ok(Registration {
        registration_id,
        trn,
        school_urn,
        started_on,
        finished_on,
        appropriate_body_id,
        training_programme,
        lead_provider_id,
        deleted,
        origin,
    })
}

fn claim(p: &Fields<'_>, occurred_on: Date, origin: Origin) -> Result<Claim, Rejection> {
    let induction_period_id = p.required("induction_period_id", parse_id, ID_RULE)?;
    let trn = p.required("trn", parse_trn, TRN_RULE)?;
    let appropriate_body_id = p.required("appropriate_body_id", parse_id, ID_RULE)?;
    let started_on = p.required("started_on", parse_date, DATE_RULE)?;
    if started_on < EARLIEST_CLAIM_START {
        return Err(p.broken("started_on", "must be on or after 1999-09-01"));
    }
    if started_on > occurred_on {
        return Err(p.broken("started_on", "must not be after the date of occurred_at"));
    }
    let finished_on = p.optional("finished_on", parse_date, DATE_RULE)?;
    if let Some(finished_on) = finished_on {
        if finished_on < started_on {
            return Err(p.broken("finished_on", "must be on or after payload.started_on"));
        }
        if finished_on > occurred_on {
            return Err(p.broken("finished_on", "must not be after the date of occurred_at"));
        }
    }
    let current = p.optional(
        "training_programme",
        |v| v.as_str().and_then(Programme::parse),
        "provider_led, school_led or null",
    )?;
    let legacy = p.optional(
        "induction_programme",
        |v| v.as_str().and_then(claim_legacy_programme),
        "fip, cip, diy, unknown, pre_september_2021 or null",
    )?;
    let training_programme = current.or(legacy.flatten());
    let number_of_terms = p.optional(
        "number_of_terms",
        parse_terms,
        "a number from 0 to 16 with at most one decimal place",
    )?;
    match (finished_on, number_of_terms) {
        (Some(_), None) => {
            return Err(p.broken(
                "number_of_terms",
                "is required when payload.finished_on is set",
            ));
        }
        (None, Some(_)) => {
            return Err(p.broken(
                "number_of_terms",
                "must be null or absent while payload.finished_on is not set",
            ));
        }
        _ => {}
    }
    let outcome = p.optional(
        "outcome",
        |v| v.as_str().and_then(InductionResult::parse),
        "\"pass\", \"fail\" or null",
    )?;
    if outcome.is_some() && finished_on.is_none() {
        return Err(p.broken("outcome", "may be set only when payload.finished_on is set"));
    }
    let deleted = p
        .optional("deleted", Value::as_bool, "a boolean")?
        .unwrap_or(false);
    Ok(Claim {
        induction_period_id,
        trn,
        appropriate_body_id,
        started_on,
        finished_on,
        training_programme,
        number_of_terms,
        outcome,
        deleted,
        origin,
    })
}

const ID_RULE: &str = "a string of 1 to 64 characters from A-Z a-z 0-9 . _ : -";
const TRN_RULE: &str = "a string of exactly 7 digits";
const DATE_RULE: &str = "a date in the form YYYY-MM-DD";

/// Maps a school registration's programme, legacy values included.
fn registration_programme(text: &str) -> Option<Programme> {
    match text {
        "provider_led" | "fip" | "full_induction_programme" | "school_funded_fip" => {
            Some(Programme::ProviderLed)
        }
        "school_led" | "cip" | "diy" | "core_induction_programme" | "design_our_own" => {
            Some(Programme::SchoolLed)
        }
        _ => None,
    }
}

/// Maps an AB claim's legacy `induction_programme`; `Some(None)` means "not reported".
fn claim_legacy_programme(text: &str) -> Option<Option<Programme>> {
    match text {
        "fip" => Some(Some(Programme::ProviderLed)),
        "cip" | "diy" => Some(Some(Programme::SchoolLed)),
        "unknown" | "pre_september_2021" => Some(None),
        _ => None,
    }
}

/// A field's value, treating an explicit `null` as absent.
fn present<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    object.get(name).filter(|v| !v.is_null())
}

/// Reads fields of one JSON object, producing errors that name the field by its full path.
struct Fields<'a> {
    object: &'a Map<String, Value>,
    prefix: &'static str,
}

impl<'a> Fields<'a> {
    fn new(object: &'a Map<String, Value>, prefix: &'static str) -> Self {
        Self { object, prefix }
    }

    fn broken(&self, name: &str, rule: &str) -> Rejection {
        Rejection::field(format!("{}{name} {rule}", self.prefix))
    }

    fn required<T>(
        &self,
        name: &str,
        parse: impl Fn(&Value) -> Option<T>,
        expected: &str,
    ) -> Result<T, Rejection> {
        match present(self.object, name) {
            None => Err(self.broken(name, "is required")),
            Some(value) => {
                parse(value).ok_or_else(|| self.broken(name, &format!("must be {expected}")))
            }
        }
    }

    fn optional<T>(
        &self,
        name: &str,
        parse: impl Fn(&Value) -> Option<T>,
        expected: &str,
    ) -> Result<Option<T>, Rejection> {
        match present(self.object, name) {
            None => Ok(None),
            Some(value) => parse(value)
                .map(Some)
                .ok_or_else(|| self.broken(name, &format!("must be {expected}"))),
        }
    }
}

fn parse_uuid(value: &Value) -> Option<Uuid> {
    let text = value.as_str()?;
    let hyphenated = text.len() == 36
        && text.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    hyphenated.then(|| Uuid::parse_str(text).ok()).flatten()
}

/// Exactly RFC 3339 section 5.6 `date-time` (CONTRACT.md section 3, revised 2026-12-01): the
/// separator is `T` or `t`, never a space, and seconds run 00 to 59 (a leap second `:60` is
/// refused; `time` would read it as 59.999999999).
fn parse_timestamp(value: &Value) -> Option<OffsetDateTime> {
    let text = value.as_str()?;
    let b = text.as_bytes();
    let shaped = b.len() >= 20 && matches!(b[10], b'T' | b't') && &b[17..19] != b"60";
    if !shaped {
        return None;
    }
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

fn parse_date(value: &Value) -> Option<Date> {
    let text = value.as_str()?;
    let b = text.as_bytes();
    let shaped = b.len() == 10
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        });
    if !shaped {
        return None;
    }
    let year: i32 = text[0..4].parse().ok()?;
    let month: u8 = text[5..7].parse().ok()?;
    let day: u8 = text[8..10].parse().ok()?;
    Date::from_calendar_date(year, time::Month::try_from(month).ok()?, day).ok()
}

fn parse_trn(value: &Value) -> Option<Trn> {
    Trn::parse(value.as_str()?)
}

fn parse_id(value: &Value) -> Option<SourceId> {
    SourceId::parse(value.as_str()?)
}

/// Terms are judged on the number as written in decimal, never rounded: `2.50` is two and a
/// half terms; `2.55` and `14.700000000000001` have more than one decimal place and are refused.
/// The number is read as a double and written back as the shortest decimal that reads as the
/// same double, so a number written with more significant digits than a double holds (over 17)
/// is judged by its nearest double (ARCHITECTURE.md, decision 3).
fn parse_terms(value: &Value) -> Option<Terms> {
    let number = value.as_number()?;
    if let Some(whole) = number.as_u64() {
        return u32::try_from(whole.checked_mul(10)?)
            .ok()
            .and_then(Terms::from_tenths);
    }
    let terms = number.as_f64()?;
    if !(0.0..=16.0).contains(&terms) {
        return None;
    }
    let written = terms.to_string();
    let decimals = written
        .split_once('.')
        .map_or(0, |(_, fraction)| fraction.len());
    if decimals > 1 || written.contains(['e', 'E']) {
        return None;
    }
    let tenths = (terms * 10.0).round();
    Terms::from_tenths(tenths as u32)
}

/// A short, value-free description of a JSON syntax error.
fn json_error_kind(error: &serde_json::Error) -> &'static str {
    match error.classify() {
        serde_json::error::Category::Eof => "unexpected end of input",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "unrepresentable value",
        serde_json::error::Category::Io => "read error",
    }
}
