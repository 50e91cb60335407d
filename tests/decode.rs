//! Every rule of CONTRACT.md section 3, with an accepted and a rejected example at each boundary,
//! and the precedence of the reason codes.

mod common;

use common::{NOW, bytes, claim, mid, registration, set, without};
use induction_reconciler::domain::{InductionResult, Programme, Record};
use induction_reconciler::messages::{Input, MAX_BODY_BYTES, ReasonCode, decode};
use serde_json::{Value, json};

const R: fn() -> Value = || registration(1, "reg-1", "1234567");
const C: fn() -> Value = || claim(2, "ip-1", "1234567");

fn accepted(message: Value) -> Input {
    match decode(&bytes(&message), NOW) {
        Ok(input) => input,
        Err(rejection) => panic!("expected acceptance of {message}, got {rejection}"),
    }
}

/// Asserts the rejection's code and that its detail names `field` and echoes no value.
fn rejected(message: Value, code: ReasonCode, field: &str) {
    rejected_bytes(&bytes(&message), code, field);
}

fn rejected_bytes(body: &[u8], code: ReasonCode, field: &str) {
    let rejection = decode(body, NOW).expect_err("expected a rejection");
    assert_eq!(rejection.reason, code, "detail: {}", rejection.detail);
    assert!(
        rejection.detail.contains(field),
        "detail {:?} should name {field}",
        rejection.detail
    );
    for personal in ["1234567", "reg-1", "ip-1", "AB-1"] {
        assert!(
            !rejection.detail.contains(personal),
            "detail echoes a value: {}",
            rejection.detail
        );
    }
}

fn registration_of(input: Input) -> induction_reconciler::domain::Registration {
    match input.snapshot.record {
        Record::Registration(r) => r,
        Record::Claim(_) => panic!("expected a registration"),
    }
}

fn claim_of(input: Input) -> induction_reconciler::domain::Claim {
    match input.snapshot.record {
        Record::Claim(c) => c,
        Record::Registration(_) => panic!("expected a claim"),
    }
}

#[test]
fn valid_examples_are_accepted() {
    let r = registration_of(accepted(R()));
    assert_eq!(r.trn.as_str(), "1234567");
    assert_eq!(r.school_urn.get(), 123456);
    assert!(!r.deleted);
    let c = claim_of(accepted(C()));
    assert_eq!(c.training_programme, None);
    assert_eq!(c.finished_on, None);
}

#[test]
fn body_size_limit_is_65536_bytes() {
    let base = bytes(&R());
    let pad = |total: usize| {
        let mut body = base.clone();
        body.pop(); // the closing brace
        let filler = total - body.len() - r#","x":""}"#.len();
        body.extend_from_slice(format!(r#","x":"{}"}}"#, "a".repeat(filler)).as_bytes());
        assert_eq!(body.len(), total);
        body
    };
    assert!(decode(&pad(MAX_BODY_BYTES), NOW).is_ok());
    rejected_bytes(&pad(MAX_BODY_BYTES + 1), ReasonCode::TooLarge, "65536");
    let mut huge = vec![0xff; 10 * 1024 * 1024];
    huge[0] = b'{';
    rejected_bytes(&huge, ReasonCode::TooLarge, "bytes");
}

#[test]
fn utf8_then_json_then_object() {
    rejected_bytes(b"{\"a\": \"\xff\"}", ReasonCode::InvalidUtf8, "UTF-8");
    rejected_bytes(b"not json", ReasonCode::InvalidJson, "JSON");
    rejected_bytes(b"", ReasonCode::InvalidJson, "JSON");
    rejected_bytes(b"[1, 2]", ReasonCode::InvalidJson, "object");
    rejected_bytes(b"\"text\"", ReasonCode::InvalidJson, "object");
    rejected_bytes(b"null", ReasonCode::InvalidJson, "object");
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    rejected_bytes(deep.as_bytes(), ReasonCode::InvalidJson, "JSON");
    let mut trailing = bytes(&R());
    trailing.extend_from_slice(b" {}");
    rejected_bytes(&trailing, ReasonCode::InvalidJson, "JSON");
}

#[test]
fn message_type_must_be_one_of_two() {
    rejected(
        without(R(), "message_type"),
        ReasonCode::UnknownMessageType,
        "message_type",
    );
    rejected(
        set(R(), "message_type", json!(null)),
        ReasonCode::UnknownMessageType,
        "message_type",
    );
    rejected(
        set(R(), "message_type", json!("school_deregistration")),
        ReasonCode::UnknownMessageType,
        "message_type",
    );
    rejected(
        set(R(), "message_type", json!("SCHOOL_REGISTRATION")),
        ReasonCode::UnknownMessageType,
        "message_type",
    );
    rejected(
        set(R(), "message_type", json!(1)),
        ReasonCode::UnknownMessageType,
        "message_type",
    );
}

#[test]
fn schema_version_must_be_the_integer_one() {
    for bad in [
        json!(null),
        json!(2),
        json!(0),
        json!(-1),
        json!("1"),
        json!(1.0),
        json!(1.5),
        json!(true),
    ] {
        rejected(
            set(R(), "schema_version", bad),
            ReasonCode::UnsupportedSchemaVersion,
            "schema_version",
        );
    }
    rejected(
        without(R(), "schema_version"),
        ReasonCode::UnsupportedSchemaVersion,
        "schema_version",
    );
    let text = String::from_utf8(bytes(&R())).unwrap();
    let exponent = text.replace("\"schema_version\":1", "\"schema_version\":1e0");
    assert_ne!(exponent, text);
    rejected_bytes(
        exponent.as_bytes(),
        ReasonCode::UnsupportedSchemaVersion,
        "schema_version",
    );
}

#[test]
fn reason_codes_follow_the_contract_precedence() {
    // Unknown type beats a bad schema version; a bad version beats a bad field; a bad field beats
    // a future occurred_at.
    let both = set(
        set(R(), "message_type", json!("x")),
        "schema_version",
        json!(2),
    );
    rejected(both, ReasonCode::UnknownMessageType, "message_type");
    let version_and_field = set(
        set(R(), "schema_version", json!(2)),
        "payload.trn",
        json!("1"),
    );
    rejected(
        version_and_field,
        ReasonCode::UnsupportedSchemaVersion,
        "schema_version",
    );
    let field_and_future = set(
        set(R(), "occurred_at", json!("2026-01-15T14:00:00Z")),
        "payload.trn",
        json!("1"),
    );
    rejected(field_and_future, ReasonCode::InvalidField, "payload.trn");
    let mut big_and_bad = vec![0xff; MAX_BODY_BYTES + 1];
    big_and_bad[0] = b'{';
    rejected_bytes(&big_and_bad, ReasonCode::TooLarge, "bytes");
}

#[test]
fn message_id_is_a_hyphenated_uuid_in_either_case() {
    let upper = accepted(set(
        R(),
        "message_id",
        json!("ABCDEF00-0000-4000-8000-00000000000A"),
    ));
    assert_eq!(
        upper.message_id().to_string(),
        "abcdef00-0000-4000-8000-00000000000a"
    );
    rejected(
        without(R(), "message_id"),
        ReasonCode::InvalidField,
        "message_id",
    );
    rejected(
        set(R(), "message_id", json!(null)),
        ReasonCode::InvalidField,
        "message_id",
    );
    for bad in [
        "abcdef00000040008000000000000000",
        "{abcdef00-0000-4000-8000-000000000000}",
        "urn:uuid:abcdef00-0000-4000-8000-000000000000",
        "abcdef00-0000-4000-8000-00000000000g",
        "abcdef00-0000-4000-8000-0000000000000",
    ] {
        rejected(
            set(R(), "message_id", json!(bad)),
            ReasonCode::InvalidField,
            "message_id",
        );
    }
    rejected(
        set(R(), "message_id", json!(7)),
        ReasonCode::InvalidField,
        "message_id",
    );
}

#[test]
fn occurred_at_is_rfc3339_with_an_offset_and_at_most_an_hour_ahead() {
    accepted(set(
        R(),
        "occurred_at",
        json!("2025-09-01T09:00:00.123+05:30"),
    ));
    accepted(set(R(), "occurred_at", json!("2026-01-15T13:00:00Z")));
    accepted(set(R(), "occurred_at", json!("2026-01-15T14:00:00+01:00")));
    rejected(
        set(R(), "occurred_at", json!("2026-01-15T13:00:01Z")),
        ReasonCode::OccurredAtInFuture,
        "occurred_at",
    );
    rejected(
        set(R(), "occurred_at", json!("2026-01-15T15:00:01+02:00")),
        ReasonCode::OccurredAtInFuture,
        "occurred_at",
    );
    for bad in [
        json!("2025-09-01T09:00:00"),
        json!("2025-09-01"),
        json!("yesterday"),
        json!(1_700_000_000),
        json!(null),
    ] {
        rejected(
            set(R(), "occurred_at", bad),
            ReasonCode::InvalidField,
            "occurred_at",
        );
    }
    rejected(
        without(R(), "occurred_at"),
        ReasonCode::InvalidField,
        "occurred_at",
    );
}

#[test]
fn correlation_id_is_an_optional_string() {
    assert_eq!(
        accepted(set(R(), "correlation_id", json!("c-1")))
            .cause
            .correlation_id
            .as_deref(),
        Some("c-1")
    );
    assert_eq!(
        accepted(set(R(), "correlation_id", json!(null)))
            .cause
            .correlation_id,
        None
    );
    rejected(
        set(R(), "correlation_id", json!(5)),
        ReasonCode::InvalidField,
        "correlation_id",
    );
}

#[test]
fn origin_is_live_or_migration_and_defaults_to_live() {
    use induction_reconciler::domain::Origin;
    let r = accepted(R());
    assert_eq!(r.cause.origin, Origin::Live);
    assert_eq!(registration_of(r).origin, Origin::Live);
    for (value, expected) in [
        (json!("live"), Origin::Live),
        (json!(null), Origin::Live),
        (json!("migration"), Origin::Migration),
    ] {
        let registration = accepted(set(R(), "origin", value.clone()));
        assert_eq!(registration.cause.origin, expected);
        assert_eq!(registration_of(registration).origin, expected);
        let claim = accepted(set(C(), "origin", value));
        assert_eq!(claim.cause.origin, expected);
        assert_eq!(claim_of(claim).origin, expected);
    }
    for bad in [
        json!("Migration"),
        json!("ecf1"),
        json!(""),
        json!(true),
        json!(1),
    ] {
        rejected(
            set(R(), "origin", bad.clone()),
            ReasonCode::InvalidField,
            "origin",
        );
        rejected(set(C(), "origin", bad), ReasonCode::InvalidField, "origin");
    }
    // An envelope field: checked before the payload's.
    rejected(
        set(without(R(), "payload.trn"), "origin", json!("x")),
        ReasonCode::InvalidField,
        "origin",
    );
}

#[test]
fn payload_is_a_required_object() {
    rejected(without(R(), "payload"), ReasonCode::InvalidField, "payload");
    rejected(
        set(R(), "payload", json!(null)),
        ReasonCode::InvalidField,
        "payload",
    );
    rejected(
        set(R(), "payload", json!([])),
        ReasonCode::InvalidField,
        "payload",
    );
}

#[test]
fn string_ids_are_1_to_64_allowed_characters() {
    for (message, field) in [
        (R(), "payload.registration_id"),
        (C(), "payload.induction_period_id"),
    ] {
        let path = field;
        accepted(set(message.clone(), path, json!("a".repeat(64))));
        accepted(set(message.clone(), path, json!("Az09._:-")));
        rejected(
            set(message.clone(), path, json!("a".repeat(65))),
            ReasonCode::InvalidField,
            field,
        );
        rejected(
            set(message.clone(), path, json!("")),
            ReasonCode::InvalidField,
            field,
        );
        rejected(
            set(message.clone(), path, json!("a b")),
            ReasonCode::InvalidField,
            field,
        );
        rejected(
            set(message.clone(), path, json!("é")),
            ReasonCode::InvalidField,
            field,
        );
        rejected(
            set(message.clone(), path, json!(12)),
            ReasonCode::InvalidField,
            field,
        );
        rejected(
            without(message.clone(), path),
            ReasonCode::InvalidField,
            field,
        );
    }
    rejected(
        set(R(), "payload.appropriate_body_id", json!("a/b")),
        ReasonCode::InvalidField,
        "payload.appropriate_body_id",
    );
    rejected(
        without(C(), "payload.appropriate_body_id"),
        ReasonCode::InvalidField,
        "payload.appropriate_body_id",
    );
    rejected(
        set(R(), "payload.lead_provider_id", json!("")),
        ReasonCode::InvalidField,
        "payload.lead_provider_id",
    );
}

#[test]
fn trn_is_a_string_of_exactly_seven_digits() {
    for message in [R(), C()] {
        accepted(set(message.clone(), "payload.trn", json!("0000000")));
        for bad in [
            json!("123456"),
            json!("12345678"),
            json!("12345a7"),
            json!(" 123456"),
            json!(1234567),
            json!(null),
        ] {
            rejected(
                set(message.clone(), "payload.trn", bad),
                ReasonCode::InvalidField,
                "payload.trn",
            );
        }
    }
}

#[test]
fn school_urn_is_a_six_digit_integer() {
    accepted(set(R(), "payload.school_urn", json!(100000)));
    accepted(set(R(), "payload.school_urn", json!(999999)));
    for bad in [
        json!(99999),
        json!(1000000),
        json!(-100000),
        json!("123456"),
        json!(123456.5),
        json!(null),
    ] {
        rejected(
            set(R(), "payload.school_urn", bad),
            ReasonCode::InvalidField,
            "payload.school_urn",
        );
    }
}

#[test]
fn registration_dates() {
    accepted(set(R(), "payload.started_on", json!("2021-09-01")));
    accepted(set(R(), "payload.started_on", json!("2030-09-01")));
    rejected(
        set(R(), "payload.started_on", json!("2021-08-31")),
        ReasonCode::InvalidField,
        "payload.started_on",
    );
    for bad in [
        "2021-9-01",
        "2025-02-30",
        "2025-09-01T00:00:00Z",
        "+2025-09-01",
        "01/09/2025",
    ] {
        rejected(
            set(R(), "payload.started_on", json!(bad)),
            ReasonCode::InvalidField,
            "payload.started_on",
        );
    }
    rejected(
        without(R(), "payload.started_on"),
        ReasonCode::InvalidField,
        "payload.started_on",
    );
    let finished = registration_of(accepted(set(
        R(),
        "payload.finished_on",
        json!("2025-09-01"),
    )));
    assert!(finished.finished_on.is_some());
    accepted(set(R(), "payload.finished_on", json!(null)));
    rejected(
        set(R(), "payload.finished_on", json!("2025-08-31")),
        ReasonCode::InvalidField,
        "payload.finished_on",
    );
    rejected(
        set(R(), "payload.finished_on", json!("soon")),
        ReasonCode::InvalidField,
        "payload.finished_on",
    );
}

#[test]
fn every_legacy_registration_programme_is_mapped() {
    for (value, expected) in [
        ("provider_led", Programme::ProviderLed),
        ("fip", Programme::ProviderLed),
        ("full_induction_programme", Programme::ProviderLed),
        ("school_funded_fip", Programme::ProviderLed),
    ] {
        let r = registration_of(accepted(set(
            R(),
            "payload.training_programme",
            json!(value),
        )));
        assert_eq!(r.training_programme, expected, "{value}");
    }
    for value in [
        "school_led",
        "cip",
        "diy",
        "core_induction_programme",
        "design_our_own",
    ] {
        let message = without(
            set(R(), "payload.training_programme", json!(value)),
            "payload.lead_provider_id",
        );
        let r = registration_of(accepted(message));
        assert_eq!(r.training_programme, Programme::SchoolLed, "{value}");
    }
    for bad in [
        json!("FIP"),
        json!("unknown"),
        json!(""),
        json!(null),
        json!(1),
    ] {
        rejected(
            set(R(), "payload.training_programme", bad),
            ReasonCode::InvalidField,
            "payload.training_programme",
        );
    }
}

#[test]
fn lead_provider_exactly_when_provider_led() {
    rejected(
        without(R(), "payload.lead_provider_id"),
        ReasonCode::InvalidField,
        "payload.lead_provider_id",
    );
    rejected(
        set(R(), "payload.lead_provider_id", json!(null)),
        ReasonCode::InvalidField,
        "payload.lead_provider_id",
    );
    let school_led = set(R(), "payload.training_programme", json!("cip"));
    rejected(
        school_led.clone(),
        ReasonCode::InvalidField,
        "payload.lead_provider_id",
    );
    let r = registration_of(accepted(set(
        school_led,
        "payload.lead_provider_id",
        json!(null),
    )));
    assert_eq!(r.lead_provider_id, None);
}

#[test]
fn deleted_is_an_optional_boolean() {
    for message in [R(), C()] {
        let input = accepted(set(message.clone(), "payload.deleted", json!(true)));
        assert!(input.snapshot.record.deleted());
        assert!(
            !accepted(set(message.clone(), "payload.deleted", json!(null)))
                .snapshot
                .record
                .deleted()
        );
        rejected(
            set(message.clone(), "payload.deleted", json!("true")),
            ReasonCode::InvalidField,
            "payload.deleted",
        );
        rejected(
            set(message, "payload.deleted", json!(1)),
            ReasonCode::InvalidField,
            "payload.deleted",
        );
    }
}

fn finished(message: Value, on: &str, terms: Value) -> Value {
    set(
        set(message, "payload.finished_on", json!(on)),
        "payload.number_of_terms",
        terms,
    )
}

#[test]
fn claim_start_is_between_1999_09_01_and_the_date_of_occurred_at() {
    accepted(set(C(), "payload.started_on", json!("1999-09-01")));
    rejected(
        set(C(), "payload.started_on", json!("1999-08-31")),
        ReasonCode::InvalidField,
        "payload.started_on",
    );
    accepted(set(C(), "payload.started_on", json!("2025-09-10")));
    rejected(
        set(C(), "payload.started_on", json!("2025-09-11")),
        ReasonCode::InvalidField,
        "payload.started_on",
    );
    // The date of occurred_at is taken in its own offset, not in UTC.
    let late_evening_west = set(
        set(C(), "occurred_at", json!("2025-09-10T23:30:00-05:00")),
        "payload.started_on",
        json!("2025-09-11"),
    );
    rejected(
        late_evening_west.clone(),
        ReasonCode::InvalidField,
        "payload.started_on",
    );
    let early_morning_east = set(
        set(C(), "occurred_at", json!("2025-09-11T00:30:00+01:00")),
        "payload.started_on",
        json!("2025-09-11"),
    );
    accepted(early_morning_east);
    rejected(
        set(C(), "payload.started_on", json!("2025-13-01")),
        ReasonCode::InvalidField,
        "payload.started_on",
    );
}

#[test]
fn claim_finish_is_between_start_and_the_date_of_occurred_at() {
    accepted(finished(C(), "2025-09-01", json!(0)));
    accepted(finished(C(), "2025-09-10", json!(1)));
    rejected(
        finished(C(), "2025-08-31", json!(1)),
        ReasonCode::InvalidField,
        "payload.finished_on",
    );
    rejected(
        finished(C(), "2025-09-11", json!(1)),
        ReasonCode::InvalidField,
        "payload.finished_on",
    );
}

#[test]
fn number_of_terms_is_required_exactly_when_finished() {
    rejected(
        set(C(), "payload.finished_on", json!("2025-09-05")),
        ReasonCode::InvalidField,
        "payload.number_of_terms",
    );
    rejected(
        finished(C(), "2025-09-05", json!(null)),
        ReasonCode::InvalidField,
        "payload.number_of_terms",
    );
    rejected(
        set(C(), "payload.number_of_terms", json!(2)),
        ReasonCode::InvalidField,
        "payload.number_of_terms",
    );
    accepted(set(C(), "payload.number_of_terms", json!(null)));
}

#[test]
fn number_of_terms_is_0_to_16_with_one_decimal_place() {
    for (value, tenths) in [
        (json!(0), 0),
        (json!(16), 160),
        (json!(16.0), 160),
        (json!(2.5), 25),
        (json!(0.1), 1),
        (json!(15.9), 159),
        (json!(2.3), 23),
    ] {
        let c = claim_of(accepted(finished(C(), "2025-09-05", value.clone())));
        assert_eq!(
            c.number_of_terms.map(|t| t.tenths()),
            Some(tenths),
            "{value}"
        );
    }
    for bad in [
        json!(16.1),
        json!(17),
        json!(-0.1),
        json!(-1),
        json!(2.55),
        json!(0.05),
        json!("3"),
        json!(1e300),
    ] {
        rejected(
            finished(C(), "2025-09-05", bad),
            ReasonCode::InvalidField,
            "payload.number_of_terms",
        );
    }
}

#[test]
fn outcome_only_with_finished_on() {
    for (value, expected) in [
        ("pass", InductionResult::Pass),
        ("fail", InductionResult::Fail),
    ] {
        let c = claim_of(accepted(set(
            finished(C(), "2025-09-05", json!(6)),
            "payload.outcome",
            json!(value),
        )));
        assert_eq!(c.outcome, Some(expected));
    }
    assert_eq!(
        claim_of(accepted(set(
            finished(C(), "2025-09-05", json!(6)),
            "payload.outcome",
            json!(null)
        )))
        .outcome,
        None
    );
    rejected(
        set(C(), "payload.outcome", json!("pass")),
        ReasonCode::InvalidField,
        "payload.outcome",
    );
    rejected(
        set(
            finished(C(), "2025-09-05", json!(6)),
            "payload.outcome",
            json!("passed"),
        ),
        ReasonCode::InvalidField,
        "payload.outcome",
    );
}

#[test]
fn claim_programme_and_its_legacy_field() {
    let programme = |message: Value| claim_of(accepted(message)).training_programme;
    assert_eq!(
        programme(set(
            C(),
            "payload.training_programme",
            json!("provider_led")
        )),
        Some(Programme::ProviderLed)
    );
    assert_eq!(
        programme(set(C(), "payload.training_programme", json!("school_led"))),
        Some(Programme::SchoolLed)
    );
    assert_eq!(
        programme(set(C(), "payload.training_programme", json!(null))),
        None
    );
    for (legacy, expected) in [
        ("fip", Some(Programme::ProviderLed)),
        ("cip", Some(Programme::SchoolLed)),
        ("diy", Some(Programme::SchoolLed)),
        ("unknown", None),
        ("pre_september_2021", None),
    ] {
        assert_eq!(
            programme(set(C(), "payload.induction_programme", json!(legacy))),
            expected,
            "{legacy}"
        );
        let with_null_current = set(
            set(C(), "payload.induction_programme", json!(legacy)),
            "payload.training_programme",
            json!(null),
        );
        assert_eq!(
            programme(with_null_current),
            expected,
            "{legacy} with null training_programme"
        );
    }
    let both = set(
        set(C(), "payload.induction_programme", json!("fip")),
        "payload.training_programme",
        json!("school_led"),
    );
    assert_eq!(programme(both), Some(Programme::SchoolLed));
    rejected(
        set(C(), "payload.training_programme", json!("fip")),
        ReasonCode::InvalidField,
        "payload.training_programme",
    );
    rejected(
        set(C(), "payload.induction_programme", json!("school_led")),
        ReasonCode::InvalidField,
        "payload.induction_programme",
    );
    rejected(
        set(C(), "payload.induction_programme", json!(3)),
        ReasonCode::InvalidField,
        "payload.induction_programme",
    );
}

#[test]
fn unknown_fields_are_ignored() {
    let noisy = set(
        set(R(), "payload.first_name", json!("Ada")),
        "date_of_birth",
        json!({"nested": [1, 2, {"deep": null}]}),
    );
    let plain = accepted(R());
    let input = accepted(noisy);
    assert_eq!(input, plain);
    assert!(!format!("{input:?}").contains("Ada"));
}

#[test]
fn a_null_optional_field_counts_as_absent() {
    let message = set(
        set(R(), "payload.finished_on", json!(null)),
        "payload.deleted",
        json!(null),
    );
    assert_eq!(accepted(message), accepted(R()));
    assert_eq!(
        accepted(set(C(), "payload.finished_on", json!(null))),
        accepted(C())
    );
}

#[test]
fn the_cause_keeps_the_envelope_fields() {
    let input = accepted(set(C(), "occurred_at", json!("2025-09-10T10:00:00+01:00")));
    assert_eq!(input.cause.message_id.to_string(), mid(2));
    assert_eq!(input.cause.message_type.as_str(), "ab_claim");
    assert_eq!(input.cause.occurred_at.offset().whole_hours(), 1);
}
