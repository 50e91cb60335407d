//! The JSON Schema documents in `docs/contracts/` and the Rust decoder agree on the shared
//! examples, every outcome the reconciler emits is valid against the outcome schema, and the
//! validators integrators use (Python's `jsonschema`, npm's `ajv`) judge all of it exactly as the
//! Rust validator and the worker do.

mod common;

use std::path::Path;

use common::NOW;
use common::tools::{node, python, repo, stdout_of};
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

/// Every outcome the suite's fixed material gives: `simulate` over the shared examples,
/// `examples/contract-cases.jsonl` and 3,000 messages of the generated workload (every status,
/// reason and origin the rules produce), and the accepted wire snapshots of
/// `tests/outcome_wire.rs`.
fn emitted_outcomes() -> Vec<Value> {
    let examples = load("examples.json");
    let mut log = Vec::new();
    for example in examples["examples"].as_array().unwrap() {
        serde_json::to_writer(&mut log, &example["message"]).unwrap();
        log.push(b'\n');
    }
    log.extend_from_slice(&std::fs::read(repo("examples/contract-cases.jsonl")).unwrap());
    for message in common::workload::generate(3_000, 400, 4_100_000, 7) {
        log.extend_from_slice(&message.body);
        log.push(b'\n');
    }
    let mut out = Vec::new();
    simulate(log.as_slice(), &mut out, Some(NOW)).unwrap();
    let mut outcomes: Vec<Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|value| value.get("parked").is_none())
        .collect();
    for entry in std::fs::read_dir(repo("tests/snapshots")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        // An insta snapshot: a `---` header block, then the JSON.
        let body = text.splitn(3, "---\n").nth(2).unwrap();
        match serde_json::from_str::<Value>(body).unwrap() {
            Value::Array(items) => outcomes.extend(items),
            one => outcomes.push(one),
        }
    }
    outcomes
}

struct Case {
    label: String,
    schema: &'static str,
    instance: Value,
    /// What every validator must say: the worker's judgement, or, where the example is marked
    /// `schema_cannot_express`, valid (the schema is knowingly looser there).
    expected: bool,
}

fn verdicts(program: &mut std::process::Command) -> Vec<bool> {
    stdout_of(program)
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["valid"]
                .as_bool()
                .unwrap()
        })
        .collect()
}

#[test]
fn python_jsonschema_and_ajv_judge_every_example_and_outcome_as_the_worker_does() {
    let mut cases = Vec::new();
    for example in load("examples.json")["examples"].as_array().unwrap() {
        let message = &example["message"];
        let valid = example["valid"].as_bool().unwrap();
        let loose = example["schema_cannot_express"].as_bool().unwrap_or(false);
        assert_eq!(
            decode(&serde_json::to_vec(message).unwrap(), NOW).is_ok(),
            valid,
            "{}",
            example["name"]
        );
        let schemas: &[&'static str] = match message["message_type"].as_str() {
            Some("school_registration") => &["school_registration.schema.json"],
            Some("ab_claim") => &["ab_claim.schema.json"],
            // No known type: invalid for both documents, whatever else it holds.
            _ => &["school_registration.schema.json", "ab_claim.schema.json"],
        };
        for schema in schemas {
            cases.push(Case {
                label: format!("{} ({schema})", example["name"].as_str().unwrap()),
                schema,
                instance: message.clone(),
                expected: valid || loose,
            });
        }
    }
    let outcomes = emitted_outcomes();
    assert!(outcomes.len() >= 1_000, "only {} outcomes", outcomes.len());
    for (i, outcome) in outcomes.into_iter().enumerate() {
        cases.push(Case {
            label: format!("outcome {i} ({} v{})", outcome["trn"], outcome["version"]),
            schema: "outcome.schema.json",
            instance: outcome,
            expected: true,
        });
    }

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cases.jsonl");
    let mut lines = String::new();
    for case in &cases {
        let line = serde_json::json!({"schema": case.schema, "instance": case.instance});
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    std::fs::write(&file, lines).unwrap();
    let contracts = repo("docs/contracts");

    let python = verdicts(
        python()
            .arg(repo("tests/tools/validate_json.py"))
            .arg(&contracts)
            .arg(&file),
    );
    let ajv = verdicts(
        node("tests/tools")
            .arg("validate-json.mjs")
            .arg(&contracts)
            .arg(&file),
    );
    assert_eq!(python.len(), cases.len());
    assert_eq!(ajv.len(), cases.len());

    let mut disagreements = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let rust = validator(case.schema).is_valid(&case.instance);
        if [rust, python[i], ajv[i]] != [case.expected; 3] {
            disagreements.push(format!(
                "{}: expected {}, Rust {rust}, Python jsonschema {}, ajv {}",
                case.label, case.expected, python[i], ajv[i]
            ));
        }
    }
    assert!(disagreements.is_empty(), "{disagreements:#?}");
}
