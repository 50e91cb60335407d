//! The JSON Schema documents in `docs/contracts/` and the Rust decoder agree on the shared
//! examples, and every outcome the reconciler emits is valid against the outcome schema.

mod common;

use std::path::Path;

use common::NOW;
use induction_reconciler::app::simulate::simulate;
use induction_reconciler::messages::decode;
use serde_json::Value;

fn load(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs/contracts")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn validator(name: &str) -> jsonschema::Validator {
    jsonschema::options()
        .should_validate_formats(true)
        .build(&load(name))
        .unwrap_or_else(|e| panic!("{name} is not a valid schema: {e}"))
}

#[test]
fn schemas_and_decoder_agree_on_the_shared_examples() {
    let registration = validator("school_registration.schema.json");
    let claim = validator("ab_claim.schema.json");
    let examples = load("examples.json");
    let examples = examples["examples"].as_array().unwrap();
    assert!(examples.len() >= 60);
    let mut disagreements = Vec::new();
    for example in examples {
        let name = example["name"].as_str().unwrap();
        let message = &example["message"];
        let valid = example["valid"].as_bool().unwrap();
        let schema_cannot_express = example["schema_cannot_express"].as_bool().unwrap_or(false);
        let by_schema = match message["message_type"].as_str() {
            Some("school_registration") => registration.is_valid(message),
            Some("ab_claim") => claim.is_valid(message),
            _ => registration.is_valid(message) || claim.is_valid(message),
        };
        let by_decoder = decode(&serde_json::to_vec(message).unwrap(), NOW).is_ok();
        let schema_expected = valid || schema_cannot_express;
        if by_decoder != valid || by_schema != schema_expected {
            disagreements.push(format!(
                "{name}: expected {valid}, decoder {by_decoder}, schema {by_schema}"
            ));
        }
    }
    assert!(disagreements.is_empty(), "{disagreements:#?}");
}

#[test]
fn every_emitted_outcome_matches_the_outcome_schema() {
    let outcome = validator("outcome.schema.json");
    let examples = load("examples.json");
    let mut log = Vec::new();
    for example in examples["examples"].as_array().unwrap() {
        serde_json::to_writer(&mut log, &example["message"]).unwrap();
        log.push(b'\n');
    }
    let cases =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/contract-cases.jsonl"))
            .unwrap();
    log.extend_from_slice(&cases);
    let mut out = Vec::new();
    let summary = simulate(log.as_slice(), &mut out, Some(NOW)).unwrap();
    assert!(summary.outcomes >= 5, "{summary:?}");
    for line in String::from_utf8(out).unwrap().lines() {
        let value: Value = serde_json::from_str(line).unwrap();
        if value.get("parked").is_some() {
            continue;
        }
        let errors: Vec<String> = outcome.iter_errors(&value).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{line}\n{errors:#?}");
    }
}
