//! Property tests over generated message sets: order, duplicates and stale snapshots never change
//! a teacher's final status; versions are gap-free; duplicates and stale snapshots emit nothing.

mod common;

use std::collections::BTreeMap;

use common::{NOW, mid};
use induction_reconciler::domain::{Admission, Ledger, Origin, Reconciliation, Status, Trn};
use induction_reconciler::messages::{Input, decode};
use proptest::prelude::*;
use serde_json::{Value, json};

const TRNS: [&str; 3] = ["1000001", "1000002", "1000003"];
const ABS: [&str; 2] = ["AB-1", "AB-2"];

#[derive(Debug, Clone)]
struct Spec {
    claim: bool,
    record: u8,
    trn: usize,
    ab: usize,
    programme: u8,
    start_day: u8,
    finished: bool,
    outcome: u8,
    deleted: bool,
    occurred_hour: u8,
    migrated: bool,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        any::<bool>(),
        0u8..4,
        0..TRNS.len(),
        0..ABS.len(),
        0u8..3,
        1u8..4,
        prop::bool::weighted(0.3),
        0u8..3,
        prop::bool::weighted(0.1),
        0u8..3,
        prop::bool::weighted(0.4),
    )
        .prop_map(
            |(
                claim,
                record,
                trn,
                ab,
                programme,
                start_day,
                finished,
                outcome,
                deleted,
                occurred_hour,
                migrated,
            )| Spec {
                claim,
                record,
                trn,
                ab,
                programme,
                start_day,
                finished,
                outcome,
                deleted,
                occurred_hour,
                migrated,
            },
        )
}

fn message(n: u64, s: &Spec) -> Value {
    let occurred_at = format!("2025-09-10T{:02}:00:00Z", 9 + s.occurred_hour);
    let started_on = format!("2025-09-0{}", s.start_day);
    let finished_on = s.finished.then_some("2025-09-08");
    let payload = if s.claim {
        json!({
            "induction_period_id": format!("ip-{}", s.record),
            "trn": TRNS[s.trn],
            "appropriate_body_id": ABS[s.ab],
            "started_on": started_on,
            "finished_on": finished_on,
            "training_programme": ([None, Some("provider_led"), Some("school_led")])[s.programme as usize],
            "number_of_terms": s.finished.then_some(2.5),
            "outcome": (if s.finished { [None, Some("pass"), Some("fail")][s.outcome as usize] } else { None }),
            "deleted": s.deleted,
        })
    } else {
        let provider_led = s.programme != 2;
        json!({
            "registration_id": format!("r-{}", s.record),
            "trn": TRNS[s.trn],
            "school_urn": 100000 + u64::from(s.record),
            "started_on": started_on,
            "finished_on": finished_on,
            "appropriate_body_id": ABS[s.ab],
            "training_programme": if provider_led { "fip" } else { "school_led" },
            "lead_provider_id": provider_led.then_some("LP-1"),
            "deleted": s.deleted,
        })
    };
    json!({
        "message_id": mid(n),
        "message_type": if s.claim { "ab_claim" } else { "school_registration" },
        "schema_version": 1,
        "occurred_at": occurred_at,
        "origin": if s.migrated { "migration" } else { "live" },
        "payload": payload,
    })
}

fn inputs(specs: &[Spec]) -> Vec<Input> {
    specs
        .iter()
        .enumerate()
        .map(|(n, s)| {
            decode(&serde_json::to_vec(&message(n as u64, s)).unwrap(), NOW)
                .expect("generated messages are valid")
        })
        .collect()
}

/// Applies inputs and returns each teacher's reconciliation, its last emitted status (`closed`
/// if nothing was ever emitted), and the versions emitted per teacher in emission order.
fn replay(ledger: &mut Ledger, inputs: &[Input]) -> BTreeMap<Trn, Vec<u64>> {
    let mut versions: BTreeMap<Trn, Vec<u64>> = BTreeMap::new();
    for input in inputs {
        for outcome in ledger
            .apply(input.snapshot.clone(), input.cause.clone(), NOW)
            .outcomes
        {
            versions
                .entry(outcome.trn.clone())
                .or_default()
                .push(outcome.version);
        }
    }
    versions
}

fn finals(ledger: &Ledger) -> BTreeMap<String, (Reconciliation, Status)> {
    TRNS.iter()
        .map(|t| {
            let trn = Trn::parse(t).unwrap();
            let emitted = ledger
                .last_outcome(&trn)
                .map_or(Status::Closed, |o| o.reconciliation.status);
            (t.to_string(), (ledger.reconcile(&trn), emitted))
        })
        .collect()
}

/// A permutation of the indices `0..n` plus some repeated indices.
fn arrival(n: usize) -> impl Strategy<Value = Vec<usize>> {
    (
        Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
        prop::collection::vec((0..n, 0..=n), 0..n),
    )
        .prop_map(|(mut order, dups)| {
            for (which, at) in dups {
                let at = at.min(order.len());
                order.insert(at, which);
            }
            order
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn final_status_is_independent_of_order_and_duplicates(
        (specs, order) in prop::collection::vec(spec(), 1..24).prop_flat_map(|s| { let n = s.len(); (Just(s), arrival(n)) })
    ) {
        let inputs = inputs(&specs);
        let mut in_order = Ledger::new();
        replay(&mut in_order, &inputs);
        let shuffled: Vec<Input> = order.iter().map(|&i| inputs[i].clone()).collect();
        let mut other = Ledger::new();
        replay(&mut other, &shuffled);
        let expected = finals(&in_order);
        let got = finals(&other);
        for (trn, (reconciliation, emitted)) in &expected {
            let (other_reconciliation, other_emitted) = &got[trn];
            prop_assert_eq!(reconciliation, other_reconciliation);
            prop_assert_eq!(emitted, other_emitted);
            prop_assert_eq!(reconciliation.status, *emitted, "the last emitted status is the reconciled one");
        }
    }

    #[test]
    fn versions_are_gap_free_from_one(
        (specs, order) in prop::collection::vec(spec(), 1..24).prop_flat_map(|s| { let n = s.len(); (Just(s), arrival(n)) })
    ) {
        let inputs = inputs(&specs);
        let shuffled: Vec<Input> = order.iter().map(|&i| inputs[i].clone()).collect();
        let mut ledger = Ledger::new();
        for (_, versions) in replay(&mut ledger, &shuffled) {
            let expected: Vec<u64> = (1..=versions.len() as u64).collect();
            prop_assert_eq!(versions, expected);
        }
    }

    #[test]
    fn a_duplicate_or_stale_snapshot_emits_nothing(specs in prop::collection::vec(spec(), 1..24), pick in any::<prop::sample::Index>()) {
        let inputs = inputs(&specs);
        let mut ledger = Ledger::new();
        replay(&mut ledger, &inputs);
        let again = &inputs[pick.index(inputs.len())];
        let applied = ledger.apply(again.snapshot.clone(), again.cause.clone(), NOW);
        prop_assert!(matches!(applied.admission, Admission::AlreadyHeld | Admission::Stale));
        prop_assert!(applied.outcomes.is_empty());
    }

    #[test]
    fn an_older_snapshot_arriving_late_emits_nothing(specs in prop::collection::vec(spec(), 1..24), pick in any::<prop::sample::Index>()) {
        let inputs = inputs(&specs);
        let mut ledger = Ledger::new();
        replay(&mut ledger, &inputs);
        // The same record, an hour before anything in the set, with every field changed.
        let original = &specs[pick.index(specs.len())];
        let mut older = original.clone();
        older.ab = (older.ab + 1) % ABS.len();
        older.trn = (older.trn + 1) % TRNS.len();
        let mut value = message(10_000, &older);
        value["occurred_at"] = json!("2025-09-10T08:00:00Z");
        let stale = decode(&serde_json::to_vec(&value).unwrap(), NOW).unwrap();
        let before = finals(&ledger);
        let applied = ledger.apply(stale.snapshot, stale.cause, NOW);
        prop_assert_eq!(applied.admission, Admission::Stale);
        prop_assert!(applied.outcomes.is_empty());
        prop_assert_eq!(before, finals(&ledger));
    }

    #[test]
    fn migrated_snapshots_reconcile_exactly_like_live_ones(
        (specs, order) in prop::collection::vec(spec(), 1..24).prop_flat_map(|s| { let n = s.len(); (Just(s), arrival(n)) })
    ) {
        // The same facts, all live: the same statuses, reasons, discrepancies and resolved
        // values; only the origins differ, and each record carries its own snapshot's.
        let shuffled: Vec<Spec> = order.iter().map(|&i| specs[i].clone()).collect();
        let all_live: Vec<Spec> = shuffled.iter().cloned().map(|mut s| { s.migrated = false; s }).collect();
        let mut mixed = Ledger::new();
        replay(&mut mixed, &inputs(&shuffled));
        let mut live = Ledger::new();
        replay(&mut live, &inputs(&all_live));
        let (mixed, live) = (finals(&mixed), finals(&live));
        for (trn, (reconciliation, emitted)) in &mixed {
            let (live_reconciliation, live_emitted) = &live[trn];
            prop_assert_eq!(emitted, live_emitted);
            prop_assert_eq!(reconciliation.status, live_reconciliation.status);
            prop_assert_eq!(reconciliation.reason, live_reconciliation.reason);
            prop_assert_eq!(&reconciliation.discrepancies, &live_reconciliation.discrepancies);
            prop_assert_eq!(&reconciliation.resolved, &live_reconciliation.resolved);
            let mut strip = reconciliation.clone();
            if let Some(p) = strip.school_registration.as_mut() { p.origin = Origin::Live; }
            if let Some(c) = strip.induction_period.as_mut() { c.origin = Origin::Live; }
            prop_assert_eq!(&strip, live_reconciliation);
        }
    }
}
