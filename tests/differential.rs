//! The decoder and an independent JSON Schema validator (the `jsonschema` crate on the published
//! schemas in `docs/contracts/`) agree on many generated messages: valid ones drawn across every
//! field's range, and each of them mutated once so that it breaks one rule the schema can
//! express. Rules the schema documents it cannot express (date order, `occurred_at` against the
//! clock, integers written as decimals, the size limit, `message_id` reuse) are kept valid by the
//! generator, so every disagreement is a real one.

mod common;

use std::path::Path;

use common::NOW;
use induction_reconciler::messages::decode;
use proptest::prelude::*;
use serde_json::{Value, json};

fn validator(name: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs/contracts")
        .join(name);
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap()
}

fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._:-]{1,64}"
}

fn trn() -> impl Strategy<Value = String> {
    "[0-9]{7}"
}

fn uuid() -> impl Strategy<Value = String> {
    any::<u128>().prop_map(|n| {
        let text = uuid::Uuid::from_u128(n).hyphenated().to_string();
        if n % 2 == 0 {
            text
        } else {
            text.to_uppercase()
        }
    })
}

/// A day as `YYYY-MM-DD`, `offset` days after 1999-09-01.
fn day(offset: i64) -> String {
    (time::macros::date!(1999 - 09 - 01) + time::Duration::days(offset)).to_string()
}

/// An `occurred_at` before the test clock: its day offset (from 1999-09-01) and its text, in
/// one of the shapes RFC 3339 allows.
fn occurred_at() -> impl Strategy<Value = (i64, String)> {
    (8_000i64..9_600, 0u32..24, 0u32..60, 0u32..60, 0usize..4).prop_map(|(d, h, m, s, shape)| {
        let date = day(d);
        let text = match shape {
            0 => format!("{date}T{h:02}:{m:02}:{s:02}Z"),
            1 => format!("{date}t{h:02}:{m:02}:{s:02}.5z"),
            2 => format!("{date}T{h:02}:{m:02}:{s:02}.123456+00:00"),
            _ => format!("{date}T{h:02}:{m:02}:{s:02}-00:00"),
        };
        (d, text)
    })
}

fn envelope(
    kind: &str,
    message_id: String,
    occurred_at: String,
    payload: Value,
    correlation: Option<String>,
) -> Value {
    let mut message = json!({
        "message_id": message_id, "message_type": kind, "schema_version": 1,
        "occurred_at": occurred_at, "payload": payload,
    });
    if let Some(c) = correlation {
        message["correlation_id"] = json!(c);
    }
    message
}

fn registration() -> impl Strategy<Value = Value> {
    let programme = prop::sample::select(vec![
        "provider_led",
        "school_led",
        "fip",
        "full_induction_programme",
        "school_funded_fip",
        "cip",
        "diy",
        "core_induction_programme",
        "design_our_own",
    ]);
    (
        (uuid(), occurred_at(), prop::option::of("[a-z]{1,8}")),
        (
            id(),
            trn(),
            100_000u32..=999_999,
            8_036i64..9_800,
            prop::option::of(0i64..400),
        ),
        (id(), programme, id(), prop::option::of(any::<bool>())),
    )
        .prop_map(
            |(
                (mid, (_, at), corr),
                (rid, trn, urn, start, length),
                (ab, programme, lp, deleted),
            )| {
                let provider_led = matches!(
                    programme,
                    "provider_led" | "fip" | "full_induction_programme" | "school_funded_fip"
                );
                let mut payload = json!({
                    "registration_id": rid, "trn": trn, "school_urn": urn, "started_on": day(start),
                    "appropriate_body_id": ab, "training_programme": programme,
                });
                if provider_led {
                    payload["lead_provider_id"] = json!(lp);
                }
                if let Some(length) = length {
                    payload["finished_on"] = json!(day(start + length));
                }
                if let Some(deleted) = deleted {
                    payload["deleted"] = json!(deleted);
                }
                envelope("school_registration", mid, at, payload, corr)
            },
        )
}

fn claim() -> impl Strategy<Value = Value> {
    let programme = prop::sample::select(vec![None, Some("provider_led"), Some("school_led")]);
    (
        (uuid(), occurred_at(), prop::option::of("[a-z]{1,8}")),
        (id(), trn(), id(), 0u32..1000, programme),
        (
            prop::option::of((0u32..=1000, 0u32..=160, prop::option::of(any::<bool>()))),
            prop::option::of(any::<bool>()),
        ),
    )
        .prop_map(
            |((mid, (today, at), corr), (ipid, trn, ab, back, programme), (finished, deleted))| {
                // Started on or before the date of occurred_at, and on or after 1999-09-01.
                let start = (today - i64::from(back)).max(0);
                let mut payload = json!({
                    "induction_period_id": ipid, "trn": trn, "appropriate_body_id": ab,
                    "started_on": day(start), "training_programme": programme,
                });
                if let Some((length, tenths, passed)) = finished {
                    payload["finished_on"] = json!(day((start + i64::from(length)).min(today)));
                    payload["number_of_terms"] = if tenths % 10 == 0 {
                        json!(tenths / 10)
                    } else {
                        json!(f64::from(tenths) / 10.0)
                    };
                    payload["outcome"] = match passed {
                        Some(true) => json!("pass"),
                        Some(false) => json!("fail"),
                        None => Value::Null,
                    };
                }
                if let Some(deleted) = deleted {
                    payload["deleted"] = json!(deleted);
                }
                envelope("ab_claim", mid, at, payload, corr)
            },
        )
}

/// One break of a rule the schema expresses, chosen by `which`.
fn mutate(mut message: Value, which: usize) -> Value {
    let payload_keys: Vec<String> = message["payload"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    match which % 10 {
        0 => {
            let key = [
                "message_id",
                "message_type",
                "occurred_at",
                "payload",
                "schema_version",
            ][which / 10 % 5];
            message.as_object_mut().unwrap().remove(key);
        }
        1 => message["payload"]["trn"] = json!("12345"),
        2 => message["message_id"] = json!("not-a-uuid"),
        3 => {
            message["occurred_at"] = json!(message["occurred_at"].as_str().unwrap().replacen(
                ['T', 't'],
                " ",
                1
            ))
        }
        4 => message["payload"]["appropriate_body_id"] = json!("x".repeat(65)),
        5 => message["payload"]["training_programme"] = json!("waterfall"),
        6 => message["payload"]["started_on"] = json!("2025-13-01"),
        7 => message["payload"]["deleted"] = json!("yes"),
        8 => {
            let key = &payload_keys[which / 10 % payload_keys.len()];
            message["payload"][key] = json!({"unexpected": "object"});
        }
        _ => message["correlation_id"] = json!(42),
    }
    message
}

fn agree(message: &Value, validator: &jsonschema::Validator) -> Result<(), TestCaseError> {
    let by_decoder = decode(&serde_json::to_vec(message).unwrap(), NOW);
    let by_schema = validator.is_valid(message);
    prop_assert_eq!(
        by_decoder.is_ok(),
        by_schema,
        "decoder {:?}, schema {}: {}",
        by_decoder.err(),
        by_schema,
        message
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn decoder_and_schema_agree_on_registrations(message in registration(), which in 0usize..1000) {
        let schema = validator("school_registration.schema.json");
        agree(&message, &schema)?;
        prop_assert!(schema.is_valid(&message), "the generator draws valid registrations: {}", message);
        agree(&mutate(message, which), &schema)?;
    }

    #[test]
    fn decoder_and_schema_agree_on_claims(message in claim(), which in 0usize..1000) {
        let schema = validator("ab_claim.schema.json");
        agree(&message, &schema)?;
        prop_assert!(schema.is_valid(&message), "the generator draws valid claims: {}", message);
        agree(&mutate(message, which), &schema)?;
    }
}
