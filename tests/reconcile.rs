//! The decision table, every tie-break, record moves and deletions, and the emission rule, driven
//! through decoded messages and the in-memory ledger.

mod common;

use common::{NOW, bytes, claim, registration, set};
use induction_reconciler::domain::{
    Admission, Discrepancy, Ledger, Outcome, Programme, Reason, Source, Status, Trn,
};
use induction_reconciler::messages::decode;
use serde_json::{Value, json};
use time::Duration;

const T: &str = "1234567";

fn trn(text: &str) -> Trn {
    Trn::parse(text).unwrap()
}

/// Applies messages in order; returns the outcomes each emitted.
fn run(ledger: &mut Ledger, messages: &[Value]) -> Vec<Vec<Outcome>> {
    messages
        .iter()
        .map(|m| {
            let input = decode(&bytes(m), NOW).expect("valid test message");
            ledger.apply(input.snapshot, input.cause, NOW).outcomes
        })
        .collect()
}

fn last(messages: &[Value]) -> Outcome {
    let mut ledger = Ledger::new();
    run(&mut ledger, messages);
    ledger
        .last_outcome(&trn(T))
        .cloned()
        .expect("an outcome was emitted")
}

fn with_ab(message: Value, ab: &str) -> Value {
    set(message, "payload.appropriate_body_id", json!(ab))
}

fn school_led(message: Value) -> Value {
    set(
        set(message, "payload.training_programme", json!("school_led")),
        "payload.lead_provider_id",
        json!(null),
    )
}

fn finished(message: Value, on: &str, outcome: Option<&str>) -> Value {
    let m = set(
        set(message, "payload.finished_on", json!(on)),
        "payload.number_of_terms",
        json!(3),
    );
    set(m, "payload.outcome", json!(outcome))
}

fn at(message: Value, occurred_at: &str) -> Value {
    set(message, "occurred_at", json!(occurred_at))
}

#[test]
fn row_completed_induction_decides() {
    let outcome = last(&[
        with_ab(registration(1, "r1", T), "AB-SCHOOL"),
        finished(
            with_ab(claim(2, "ip1", T), "AB-2"),
            "2025-09-05",
            Some("pass"),
        ),
        with_ab(claim(3, "ip2", T), "AB-3"),
    ]);
    let r = &outcome.reconciliation;
    assert_eq!(
        (r.status, r.reason),
        (Status::Confirmed, Reason::InductionCompleted)
    );
    assert!(r.discrepancies.is_empty());
    assert_eq!(
        r.induction_period
            .as_ref()
            .unwrap()
            .induction_period_id
            .as_str(),
        "ip1"
    );
    assert_eq!(
        r.resolved.appropriate_body_id.as_ref().unwrap().as_str(),
        "AB-2"
    );
    assert_eq!(
        r.resolved.appropriate_body_source,
        Some(Source::AppropriateBody)
    );
    assert_eq!(
        r.school_registration
            .as_ref()
            .unwrap()
            .registration_id
            .as_str(),
        "r1"
    );
}

#[test]
fn row_fail_also_completes() {
    let outcome = last(&[finished(claim(2, "ip1", T), "2025-09-05", Some("fail"))]);
    assert_eq!(outcome.reconciliation.reason, Reason::InductionCompleted);
    assert!(outcome.reconciliation.school_registration.is_none());
}

#[test]
fn row_claim_matches_registration() {
    let outcome = last(&[registration(1, "r1", T), claim(2, "ip1", T)]);
    let r = &outcome.reconciliation;
    assert_eq!(
        (r.status, r.reason),
        (Status::Confirmed, Reason::ClaimMatchesRegistration)
    );
    assert_eq!(r.resolved.training_programme, Some(Programme::ProviderLed));
    assert_eq!(
        r.resolved.training_programme_source,
        Some(Source::School),
        "the claim reports no programme"
    );
    assert_eq!(
        r.resolved.lead_provider_id.as_ref().unwrap().as_str(),
        "LP-1"
    );
    let same = last(&[
        registration(1, "r1", T),
        set(
            claim(2, "ip1", T),
            "payload.training_programme",
            json!("provider_led"),
        ),
    ]);
    assert_eq!(same.reconciliation.reason, Reason::ClaimMatchesRegistration);
    assert_eq!(
        same.reconciliation.resolved.training_programme_source,
        Some(Source::AppropriateBody)
    );
}

#[test]
fn open_claim_confirms_whatever_the_dates() {
    let outcome = last(&[
        set(
            registration(1, "r1", T),
            "payload.started_on",
            json!("2027-01-01"),
        ),
        set(
            claim(2, "ip1", T),
            "payload.started_on",
            json!("2001-01-01"),
        ),
    ]);
    assert_eq!(
        outcome.reconciliation.reason,
        Reason::ClaimMatchesRegistration
    );
}

#[test]
fn row_claim_differs_on_appropriate_body() {
    let outcome = last(&[
        with_ab(registration(1, "r1", T), "AB-SCHOOL"),
        with_ab(claim(2, "ip1", T), "AB-REAL"),
    ]);
    let r = &outcome.reconciliation;
    assert_eq!(
        (r.status, r.reason),
        (Status::Conflict, Reason::ClaimDiffersFromRegistration)
    );
    assert_eq!(r.discrepancies, vec![Discrepancy::AppropriateBody]);
    assert_eq!(
        r.resolved.appropriate_body_id.as_ref().unwrap().as_str(),
        "AB-REAL"
    );
    assert_eq!(
        r.resolved.appropriate_body_source,
        Some(Source::AppropriateBody)
    );
}

#[test]
fn row_claim_differs_on_programme_and_both() {
    let programme_only = last(&[
        registration(1, "r1", T),
        set(
            claim(2, "ip1", T),
            "payload.training_programme",
            json!("school_led"),
        ),
    ]);
    let r = &programme_only.reconciliation;
    assert_eq!(r.status, Status::Conflict);
    assert_eq!(r.discrepancies, vec![Discrepancy::TrainingProgramme]);
    assert_eq!(r.resolved.training_programme, Some(Programme::SchoolLed));
    assert_eq!(
        r.resolved.training_programme_source,
        Some(Source::AppropriateBody)
    );
    assert_eq!(
        r.resolved.lead_provider_id.as_ref().unwrap().as_str(),
        "LP-1",
        "lead provider always from P"
    );

    let both = last(&[
        school_led(registration(1, "r1", T)),
        set(
            with_ab(claim(2, "ip1", T), "AB-2"),
            "payload.induction_programme",
            json!("fip"),
        ),
    ]);
    assert_eq!(
        both.reconciliation.discrepancies,
        vec![Discrepancy::AppropriateBody, Discrepancy::TrainingProgramme]
    );
    assert_eq!(both.reconciliation.resolved.lead_provider_id, None);
}

#[test]
fn row_claimed_without_registration() {
    let outcome = last(&[set(
        claim(2, "ip1", T),
        "payload.training_programme",
        json!("school_led"),
    )]);
    let r = &outcome.reconciliation;
    assert_eq!(
        (r.status, r.reason),
        (Status::Confirmed, Reason::ClaimedWithoutRegistration)
    );
    assert_eq!(
        r.resolved.training_programme_source,
        Some(Source::AppropriateBody)
    );
    assert_eq!(r.resolved.lead_provider_id, None);
    let unreported = last(&[claim(2, "ip1", T)]);
    assert_eq!(unreported.reconciliation.resolved.training_programme, None);
    assert_eq!(
        unreported.reconciliation.resolved.training_programme_source,
        None
    );
}

#[test]
fn row_awaiting_claim() {
    let outcome = last(&[registration(1, "r1", T)]);
    let r = &outcome.reconciliation;
    assert_eq!(
        (r.status, r.reason),
        (Status::Provisional, Reason::AwaitingClaim)
    );
    assert_eq!(r.resolved.appropriate_body_source, Some(Source::School));
    assert_eq!(r.resolved.training_programme_source, Some(Source::School));
    assert!(r.induction_period.is_none());
    assert_eq!(outcome.provisional_since, Some(NOW));
}

#[test]
fn row_no_open_records_after_the_ect_leaves() {
    let mut ledger = Ledger::new();
    let emitted = run(
        &mut ledger,
        &[
            registration(1, "r1", T),
            at(
                set(
                    registration(2, "r1", T),
                    "payload.finished_on",
                    json!("2025-12-01"),
                ),
                "2025-12-01T09:00:00Z",
            ),
        ],
    );
    let closed = &emitted[1][0];
    let r = &closed.reconciliation;
    assert_eq!(
        (r.status, r.reason),
        (Status::Closed, Reason::NoOpenRecords)
    );
    assert_eq!(r.resolved, Default::default());
    assert!(r.school_registration.is_none() && r.induction_period.is_none());
    assert_eq!(closed.version, 2);
    assert_eq!(closed.provisional_since, None);
}

#[test]
fn a_released_claim_leaves_the_registration_awaiting() {
    let outcome = last(&[
        registration(1, "r1", T),
        claim(2, "ip1", T),
        at(
            finished(claim(3, "ip1", T), "2025-09-05", None),
            "2025-09-11T09:00:00Z",
        ),
    ]);
    assert_eq!(outcome.reconciliation.reason, Reason::AwaitingClaim);
    assert_eq!(outcome.version, 3);
}

#[test]
fn first_outcome_that_would_be_closed_emits_nothing() {
    let mut ledger = Ledger::new();
    let emitted = run(
        &mut ledger,
        &[
            set(
                registration(1, "r1", T),
                "payload.finished_on",
                json!("2025-12-01"),
            ),
            set(registration(2, "r2", T), "payload.deleted", json!(true)),
            finished(claim(3, "ip1", T), "2025-09-05", None),
        ],
    );
    assert!(emitted.iter().all(Vec::is_empty));
    assert!(ledger.last_outcome(&trn(T)).is_none());
}

#[test]
fn tie_breaks_for_the_current_registration() {
    // Latest started_on wins.
    let o = last(&[
        set(
            registration(1, "r-late", T),
            "payload.started_on",
            json!("2025-10-01"),
        ),
        registration(2, "r-early", T),
    ]);
    assert_eq!(
        o.reconciliation
            .school_registration
            .unwrap()
            .registration_id
            .as_str(),
        "r-late"
    );
    // Same start: latest occurred_at wins.
    let o = last(&[
        at(registration(1, "r-a", T), "2025-09-02T09:00:00Z"),
        registration(2, "r-b", T),
    ]);
    assert_eq!(
        o.reconciliation
            .school_registration
            .unwrap()
            .registration_id
            .as_str(),
        "r-a"
    );
    // Same start and same instant in different offsets: the highest id, byte by byte ("a" > "Z").
    let o = last(&[
        registration(1, "Z", T),
        at(registration(2, "a", T), "2025-09-01T10:00:00+01:00"),
    ]);
    assert_eq!(
        o.reconciliation
            .school_registration
            .unwrap()
            .registration_id
            .as_str(),
        "a"
    );
    let o = last(&[
        at(registration(2, "a", T), "2025-09-01T10:00:00+01:00"),
        registration(1, "Z", T),
    ]);
    assert_eq!(
        o.reconciliation
            .school_registration
            .unwrap()
            .registration_id
            .as_str(),
        "a"
    );
    // A finished registration is never current.
    let o = last(&[
        registration(1, "r-open", T),
        set(
            set(
                registration(2, "r-left", T),
                "payload.started_on",
                json!("2025-10-01"),
            ),
            "payload.finished_on",
            json!("2025-10-02"),
        ),
    ]);
    assert_eq!(
        o.reconciliation
            .school_registration
            .unwrap()
            .registration_id
            .as_str(),
        "r-open"
    );
}

#[test]
fn tie_breaks_for_the_open_claim() {
    let o = last(&[
        with_ab(
            set(
                claim(1, "ip-late", T),
                "payload.started_on",
                json!("2025-09-05"),
            ),
            "AB-L",
        ),
        claim(2, "ip-early", T),
    ]);
    assert_eq!(
        o.reconciliation
            .induction_period
            .unwrap()
            .induction_period_id
            .as_str(),
        "ip-late"
    );
    let o = last(&[
        at(claim(1, "ip-a", T), "2025-09-11T09:00:00Z"),
        claim(2, "ip-b", T),
    ]);
    assert_eq!(
        o.reconciliation
            .induction_period
            .unwrap()
            .induction_period_id
            .as_str(),
        "ip-a"
    );
    let o = last(&[claim(1, "ip-b", T), claim(2, "ip-a", T)]);
    assert_eq!(
        o.reconciliation
            .induction_period
            .unwrap()
            .induction_period_id
            .as_str(),
        "ip-b"
    );
}

#[test]
fn tie_breaks_for_the_completed_induction() {
    let o = last(&[
        finished(claim(1, "k-late", T), "2025-09-08", Some("fail")),
        finished(claim(2, "k-early", T), "2025-09-05", Some("pass")),
    ]);
    assert_eq!(
        o.reconciliation
            .induction_period
            .unwrap()
            .induction_period_id
            .as_str(),
        "k-late"
    );
    let o = last(&[
        at(
            finished(claim(1, "k-a", T), "2025-09-05", Some("pass")),
            "2025-09-11T09:00:00Z",
        ),
        finished(claim(2, "k-b", T), "2025-09-05", Some("pass")),
    ]);
    assert_eq!(
        o.reconciliation
            .induction_period
            .unwrap()
            .induction_period_id
            .as_str(),
        "k-a"
    );
    let o = last(&[
        finished(claim(1, "k-b", T), "2025-09-05", Some("pass")),
        finished(claim(2, "k-a", T), "2025-09-05", Some("pass")),
    ]);
    assert_eq!(
        o.reconciliation
            .induction_period
            .unwrap()
            .induction_period_id
            .as_str(),
        "k-b"
    );
}

#[test]
fn later_snapshot_replaces_earlier_whatever_the_arrival_order() {
    let first = with_ab(registration(1, "r1", T), "AB-OLD");
    let correction = at(
        with_ab(registration(2, "r1", T), "AB-NEW"),
        "2025-09-02T09:00:00Z",
    );
    for order in [
        [first.clone(), correction.clone()],
        [correction.clone(), first.clone()],
    ] {
        let o = last(&order);
        assert_eq!(
            o.reconciliation
                .resolved
                .appropriate_body_id
                .unwrap()
                .as_str(),
            "AB-NEW"
        );
    }
    // Same instant: the higher message_id is later.
    let mut ledger = Ledger::new();
    let emitted = run(
        &mut ledger,
        &[
            with_ab(registration(9, "r1", T), "AB-9"),
            with_ab(registration(3, "r1", T), "AB-3"),
        ],
    );
    assert!(emitted[1].is_empty());
    assert_eq!(
        ledger
            .reconcile(&trn(T))
            .resolved
            .appropriate_body_id
            .unwrap()
            .as_str(),
        "AB-9"
    );
}

#[test]
fn stale_and_duplicate_snapshots_emit_nothing() {
    let mut ledger = Ledger::new();
    let newer = at(
        with_ab(registration(2, "r1", T), "AB-NEW"),
        "2025-09-02T09:00:00Z",
    );
    run(&mut ledger, std::slice::from_ref(&newer));
    for (message, expected) in [
        (registration(1, "r1", T), Admission::Stale),
        (newer, Admission::AlreadyHeld),
    ] {
        let input = decode(&bytes(&message), NOW).unwrap();
        let applied = ledger.apply(input.snapshot, input.cause, NOW);
        assert_eq!(applied.admission, expected);
        assert!(applied.outcomes.is_empty());
    }
}

#[test]
fn a_deleted_snapshot_cannot_be_resurrected_by_an_older_one() {
    let mut ledger = Ledger::new();
    let emitted = run(
        &mut ledger,
        &[
            registration(1, "r1", T),
            at(
                set(registration(3, "r1", T), "payload.deleted", json!(true)),
                "2025-09-03T09:00:00Z",
            ),
            at(registration(2, "r1", T), "2025-09-02T09:00:00Z"),
        ],
    );
    assert_eq!(emitted[1][0].reconciliation.status, Status::Closed);
    assert!(emitted[2].is_empty());
    assert_eq!(ledger.reconcile(&trn(T)).status, Status::Closed);
}

#[test]
fn a_deleted_claim_reverts_to_provisional() {
    let outcome = last(&[
        registration(1, "r1", T),
        claim(2, "ip1", T),
        at(
            set(claim(3, "ip1", T), "payload.deleted", json!(true)),
            "2025-09-12T09:00:00Z",
        ),
    ]);
    assert_eq!(outcome.reconciliation.reason, Reason::AwaitingClaim);
    assert_eq!(outcome.version, 3);
}

#[test]
fn a_corrected_trn_moves_the_record_and_reconciles_both_teachers() {
    let old = "1111111";
    let new = "2222222";
    let mut ledger = Ledger::new();
    let emitted = run(
        &mut ledger,
        &[
            registration(1, "r1", old),
            claim(2, "ip-new", new),
            at(registration(3, "r1", new), "2025-09-02T09:00:00Z"),
        ],
    );
    let moved: Vec<(&str, Status, u64)> = emitted[2]
        .iter()
        .map(|o| (o.trn.as_str(), o.reconciliation.status, o.version))
        .collect();
    assert_eq!(
        moved,
        vec![(old, Status::Closed, 2), (new, Status::Confirmed, 2)]
    );
    assert_eq!(
        ledger.reconcile(&trn(new)).reason,
        Reason::ClaimMatchesRegistration
    );
    // The original snapshot, replayed, is older than the record's latest and cannot move it back.
    let input = decode(&bytes(&registration(1, "r1", old)), NOW).unwrap();
    assert_eq!(
        ledger.apply(input.snapshot, input.cause, NOW).admission,
        Admission::Stale
    );
    let stale = decode(
        &bytes(&at(registration(4, "r1", old), "2025-09-01T10:00:00Z")),
        NOW,
    )
    .unwrap();
    assert_eq!(
        ledger.apply(stale.snapshot, stale.cause, NOW).admission,
        Admission::Stale
    );
    assert_eq!(ledger.reconcile(&trn(old)).status, Status::Closed);
}

#[test]
fn registration_and_claim_id_spaces_are_separate() {
    let o = last(&[registration(1, "same", T), claim(2, "same", T)]);
    assert_eq!(o.reconciliation.reason, Reason::ClaimMatchesRegistration);
}

#[test]
fn nothing_visible_changed_emits_nothing() {
    let mut ledger = Ledger::new();
    // A claim that is not the current one changes nothing a consumer sees.
    let emitted = run(
        &mut ledger,
        &[
            registration(1, "r1", T),
            claim(2, "ip1", T),
            set(
                claim(3, "ip-older", T),
                "payload.started_on",
                json!("2025-08-01"),
            ),
        ],
    );
    assert_eq!(
        emitted.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![1, 1, 0]
    );
}

#[test]
fn versions_increase_by_one_per_emission() {
    let mut ledger = Ledger::new();
    let emitted = run(
        &mut ledger,
        &[
            registration(1, "r1", T),
            with_ab(claim(2, "ip1", T), "AB-X"),
            at(claim(3, "ip1", T), "2025-09-11T09:00:00Z"),
            at(
                finished(claim(4, "ip1", T), "2025-09-11", Some("pass")),
                "2025-09-12T09:00:00Z",
            ),
        ],
    );
    let versions: Vec<u64> = emitted.iter().flatten().map(|o| o.version).collect();
    assert_eq!(versions, vec![1, 2, 3, 4]);
}

#[test]
fn provisional_spell_and_overdue_sweep() {
    let mut ledger = Ledger::new();
    let input = decode(&bytes(&registration(1, "r1", T)), NOW).unwrap();
    ledger.apply(input.snapshot, input.cause, NOW);
    let age = Duration::days(30);
    assert!(
        ledger.sweep(NOW + age, age).is_empty(),
        "not older than the age yet"
    );
    let due = ledger.sweep(NOW + age + Duration::seconds(1), age);
    assert_eq!(due.len(), 1);
    assert!(due[0].overdue);
    assert_eq!(due[0].version, 2);
    assert_eq!(due[0].caused_by, None);
    assert_eq!(due[0].provisional_since, Some(NOW));
    assert!(
        ledger.sweep(NOW + age * 2, age).is_empty(),
        "once per spell"
    );

    // A later outcome in the same spell keeps overdue; a new spell starts without it.
    let later = NOW + age * 2;
    let correction = decode(
        &bytes(&at(
            with_ab(registration(2, "r1", T), "AB-2"),
            "2025-09-02T09:00:00Z",
        )),
        later,
    )
    .unwrap();
    let same_spell = ledger
        .apply(correction.snapshot, correction.cause, later)
        .outcomes;
    assert!(same_spell[0].overdue);
    assert_eq!(same_spell[0].provisional_since, Some(NOW));
    let claimed = decode(&bytes(&with_ab(claim(3, "ip1", T), "AB-2")), later).unwrap();
    let confirmed = ledger
        .apply(claimed.snapshot, claimed.cause, later)
        .outcomes;
    assert!(!confirmed[0].overdue);
    assert_eq!(confirmed[0].provisional_since, None);
    let released = decode(
        &bytes(&at(
            finished(with_ab(claim(4, "ip1", T), "AB-2"), "2025-09-11", None),
            "2025-09-12T09:00:00Z",
        )),
        later,
    )
    .unwrap();
    let new_spell = ledger
        .apply(released.snapshot, released.cause, later)
        .outcomes;
    assert_eq!(new_spell[0].reconciliation.status, Status::Provisional);
    assert!(!new_spell[0].overdue);
    assert_eq!(new_spell[0].provisional_since, Some(later));
}
