//! `induction-reconciler simulate` run as a process on the contract's cases.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_induction-reconciler");

fn cases() -> String {
    format!(
        "{}/examples/contract-cases.jsonl",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn summarise(stdout: &[u8]) -> Vec<String> {
    String::from_utf8(stdout.to_vec())
        .unwrap()
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).expect("every output line is JSON");
            match v.get("parked") {
                Some(p) => format!(
                    "parked {} line {}",
                    p["reason"].as_str().unwrap(),
                    p["line"]
                ),
                None => format!(
                    "{} v{} {} {} {}",
                    v["trn"].as_str().unwrap(),
                    v["version"],
                    v["status"].as_str().unwrap(),
                    v["reason"].as_str().unwrap(),
                    v["discrepancies"]
                ),
            }
        })
        .collect()
}

#[test]
fn simulate_prints_the_outcomes_the_contract_requires() {
    let output = Command::new(BIN)
        .args(["simulate", &cases(), "--now", "2026-01-15T12:00:00Z"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        summarise(&output.stdout),
        [
            "1000001 v1 provisional awaiting_claim []",
            "1000001 v2 confirmed claim_matches_registration []",
            "1000002 v1 confirmed claimed_without_registration []",
            "1000002 v2 conflict claim_differs_from_registration [\"appropriate_body\",\"training_programme\"]",
            "1000003 v1 provisional awaiting_claim []",
            "1000003 v2 confirmed claim_matches_registration []",
            "1000003 v3 confirmed induction_completed []",
            "1000004 v1 provisional awaiting_claim []",
            "1000004 v2 closed no_open_records []",
            "parked invalid_field line 12",
            "parked message_id_reused line 13",
            "1000006 v1 provisional awaiting_claim []",
            "1000007 v1 confirmed claimed_without_registration []",
            "1000006 v2 closed no_open_records []",
            "1000007 v2 confirmed claim_matches_registration []",
        ]
    );
}

#[test]
fn simulate_output_varies_only_in_outcome_id_and_decided_at() {
    let run = || {
        let out = Command::new(BIN)
            .args(["simulate", &cases(), "--now", "2026-01-15T12:00:00Z"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: Value = serde_json::from_str(l).unwrap();
                if let Some(o) = v.as_object_mut() {
                    assert!(o.remove("outcome_id").is_some() || o.contains_key("parked"));
                }
                v
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

#[test]
fn simulate_reads_standard_input_and_parks_bad_lines_without_failing() {
    let mut child = Command::new(BIN)
        .args(["simulate", "-", "--now", "2026-01-15T12:00:00Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"not json\n\n{\"message_type\":\"x\"}\n\xff\xfe\n")
        .unwrap();
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    assert_eq!(
        summarise(&output.stdout),
        [
            "parked invalid_json line 1",
            "parked unknown_message_type line 3",
            "parked invalid_utf8 line 4"
        ]
    );
}

#[test]
fn simulate_fails_clearly_on_a_missing_file_or_bad_clock() {
    let output = Command::new(BIN)
        .args(["simulate", "/nonexistent/log.jsonl"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot open /nonexistent/log.jsonl"));
    let output = Command::new(BIN)
        .args(["simulate", "--now", "yesterday"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("RFC 3339"));
}

#[test]
fn simulate_carries_origins_onto_outcomes() {
    let migrated = r#"{"message_id":"6f1c2b1e-3d4a-4b5c-8d6e-7f8091a2b3c4","message_type":"school_registration","schema_version":1,"occurred_at":"2025-09-01T09:00:00+01:00","origin":"migration","payload":{"registration_id":"ECF1-IR-1","trn":"1234567","school_urn":123456,"started_on":"2025-09-01","appropriate_body_id":"AB-1","training_programme":"full_induction_programme","lead_provider_id":"LP-1"}}"#;
    let live = r#"{"message_id":"6f1c2b1e-3d4a-4b5c-8d6e-7f8091a2b3c5","message_type":"ab_claim","schema_version":1,"occurred_at":"2025-09-02T09:00:00Z","payload":{"induction_period_id":"IP-1","trn":"1234567","appropriate_body_id":"AB-1","started_on":"2025-09-01"}}"#;
    let mut child = Command::new(BIN)
        .args(["simulate", "-", "--now", "2026-01-15T12:00:00Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{migrated}\n{live}").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let outcomes: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(outcomes.len(), 2);
    assert_eq!(outcomes[0]["caused_by"]["origin"], "migration");
    assert_eq!(outcomes[0]["school_registration"]["origin"], "migration");
    assert_eq!(outcomes[1]["caused_by"]["origin"], "live");
    assert_eq!(outcomes[1]["school_registration"]["origin"], "migration");
    assert_eq!(outcomes[1]["induction_period"]["origin"], "live");
}
