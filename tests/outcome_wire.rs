//! Snapshot tests of the outcome JSON, so that a change to the wire is deliberate, and the round
//! trip the worker relies on when it reads its last outcome back.

mod common;

use common::{NOW, bytes, claim, registration, set};
use induction_reconciler::domain::{Ledger, Outcome};
use induction_reconciler::messages::{OutcomeMessage, decode};
use serde_json::{Value, json};
use time::Duration;
use uuid::Uuid;

const OUTCOME_ID: Uuid = Uuid::from_u128(0x5a5a_0000_0000_4000_8000_0000_0000_0001);

fn outcomes(messages: &[Value]) -> (Ledger, Vec<Outcome>) {
    let mut ledger = Ledger::new();
    let mut all = Vec::new();
    for m in messages {
        let input = decode(&bytes(m), NOW).unwrap();
        all.extend(ledger.apply(input.snapshot, input.cause, NOW).outcomes);
    }
    (ledger, all)
}

fn wire(outcome: &Outcome) -> Value {
    serde_json::to_value(OutcomeMessage::new(OUTCOME_ID, outcome)).unwrap()
}

#[test]
fn provisional_outcome_json() {
    let (_, all) = outcomes(&[set(
        registration(1, "r1", "1234567"),
        "correlation_id",
        json!("corr-9"),
    )]);
    insta::assert_json_snapshot!("provisional", wire(&all[0]));
}

#[test]
fn conflict_outcome_json() {
    let school = set(
        set(
            registration(1, "r1", "1234567"),
            "payload.training_programme",
            json!("diy"),
        ),
        "payload.lead_provider_id",
        json!(null),
    );
    let ab = set(
        set(
            claim(2, "ip1", "1234567"),
            "payload.appropriate_body_id",
            json!("AB-2"),
        ),
        "payload.induction_programme",
        json!("fip"),
    );
    let (_, all) = outcomes(&[
        school,
        set(ab, "occurred_at", json!("2025-09-10T10:00:00+01:00")),
    ]);
    insta::assert_json_snapshot!("conflict", wire(&all[1]));
}

#[test]
fn completed_outcome_json() {
    let mut done = claim(2, "ip1", "1234567");
    done["payload"]["finished_on"] = json!("2025-09-09");
    done["payload"]["number_of_terms"] = json!(2.5);
    done["payload"]["outcome"] = json!("pass");
    let (_, all) = outcomes(&[registration(1, "r1", "1234567"), done]);
    insta::assert_json_snapshot!("completed", wire(&all[1]));
}

#[test]
fn overdue_and_closed_outcome_json() {
    let (mut ledger, _) = outcomes(&[registration(1, "r1", "1234567")]);
    let overdue = ledger.sweep(NOW + Duration::days(31), Duration::days(30));
    insta::assert_json_snapshot!("overdue", wire(&overdue[0]));
    let left = set(
        set(
            registration(2, "r1", "1234567"),
            "payload.finished_on",
            json!("2025-12-01"),
        ),
        "occurred_at",
        json!("2025-12-01T09:00:00Z"),
    );
    let input = decode(&bytes(&left), NOW).unwrap();
    let closed = ledger.apply(input.snapshot, input.cause, NOW).outcomes;
    insta::assert_json_snapshot!("closed", wire(&closed[0]));
}

#[test]
fn the_wire_form_reads_back_into_the_same_outcome() {
    let (mut ledger, mut all) = outcomes(&[
        registration(1, "r1", "1234567"),
        set(
            claim(2, "ip1", "1234567"),
            "payload.appropriate_body_id",
            json!("AB-2"),
        ),
        registration(3, "r2", "7654321"),
    ]);
    all.extend(ledger.sweep(NOW + Duration::days(40), Duration::days(30)));
    for outcome in all {
        let text = serde_json::to_string(&OutcomeMessage::new(OUTCOME_ID, &outcome)).unwrap();
        let back: OutcomeMessage = serde_json::from_str(&text).unwrap();
        assert_eq!(back.to_domain().unwrap(), outcome);
        assert_eq!(
            back.routing_key(),
            format!("outcome.{}", outcome.reconciliation.status.as_str())
        );
    }
}

#[test]
fn migrated_history_confirmed_by_a_live_claim_json() {
    // A registration loaded from ECF1, then the AB's live claim: the cause is live, the
    // registration's fields rest on migrated history.
    let migrated = set(
        registration(1, "r1", "1234567"),
        "origin",
        json!("migration"),
    );
    let (_, all) = outcomes(&[migrated, claim(2, "ip1", "1234567")]);
    assert_eq!(all.len(), 2);
    insta::assert_json_snapshot!("migrated_then_live", wire(&all[1]));
    let first = wire(&all[0]);
    assert_eq!(first["caused_by"]["origin"], "migration");
    assert_eq!(first["school_registration"]["origin"], "migration");
}

#[test]
fn a_record_whose_latest_snapshot_changes_only_in_origin_is_a_visible_change() {
    let migrated = set(
        registration(1, "r1", "1234567"),
        "origin",
        json!("migration"),
    );
    let live_again = set(
        registration(2, "r1", "1234567"),
        "occurred_at",
        json!("2025-09-02T09:00:00+01:00"),
    );
    let (_, all) = outcomes(&[migrated, live_again]);
    assert_eq!(all.len(), 2, "the live re-send emits a new version");
    let second = wire(&all[1]);
    assert_eq!(second["version"], 2);
    assert_eq!(second["school_registration"]["origin"], "live");
    assert_eq!(second["caused_by"]["origin"], "live");
}

#[test]
fn an_outcome_stored_before_origins_existed_reads_back_as_live() {
    let (_, all) = outcomes(&[registration(1, "r1", "1234567"), claim(2, "ip1", "1234567")]);
    let mut old = wire(&all[1]);
    for path in ["school_registration", "induction_period", "caused_by"] {
        old[path].as_object_mut().unwrap().remove("origin");
    }
    let back: OutcomeMessage = serde_json::from_value(old).unwrap();
    assert_eq!(back.to_domain().unwrap(), all[1]);
}
