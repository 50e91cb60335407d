//! The worker end to end against the real PostgreSQL and RabbitMQ: the decision table through the
//! broker, duplicates, reuse, stale snapshots, parking, the outbox, competing workers and the
//! overdue sweep. Each test has its own database and its own exchanges and queues.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::app::{TestApp, header};
use common::{NOW, bytes, claim, poison_trigger_sql, registration, set};
use induction_reconciler::broker::json_properties;
use induction_reconciler::domain::{Ledger, Trn};
use induction_reconciler::messages::decode;
use induction_reconciler::store::{BatchItem, Contention, Publishing};
use lapin::BasicProperties;
use lapin::types::FieldTable;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn summary(o: &Value) -> (String, u64, String, String) {
    (
        o["trn"].as_str().unwrap().to_owned(),
        o["version"].as_u64().unwrap(),
        o["status"].as_str().unwrap().to_owned(),
        o["reason"].as_str().unwrap().to_owned(),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_of_the_decision_table_through_the_broker() {
    let mut app = TestApp::spawn().await;

    // P only, then C and P with the same AB: provisional, then confirmed.
    app.publish(&registration(1, "r1", "1000001")).await;
    let o = app.next_outcome().await;
    assert_eq!(
        summary(&o),
        (
            "1000001".into(),
            1,
            "provisional".into(),
            "awaiting_claim".into()
        )
    );
    assert_eq!(o["resolved"]["appropriate_body_source"], "school");
    assert_eq!(o["provisional_since"], o["decided_at"]);
    app.publish(&claim(2, "ip1", "1000001")).await;
    let o = app.next_outcome().await;
    assert_eq!(
        summary(&o),
        (
            "1000001".into(),
            2,
            "confirmed".into(),
            "claim_matches_registration".into()
        )
    );
    assert_eq!(o["resolved"]["appropriate_body_source"], "appropriate_body");
    assert_eq!(o["provisional_since"], Value::Null);

    // C only (a claim before its registration), then a registration with another AB: conflict.
    app.publish(&set(
        claim(3, "ip2", "1000002"),
        "payload.appropriate_body_id",
        json!("AB-2"),
    ))
    .await;
    let o = app.next_outcome().await;
    assert_eq!(
        summary(&o),
        (
            "1000002".into(),
            1,
            "confirmed".into(),
            "claimed_without_registration".into()
        )
    );
    assert_eq!(o["school_registration"], Value::Null);
    app.publish(&registration(4, "r2", "1000002")).await;
    let o = app.next_outcome().await;
    assert_eq!(
        summary(&o),
        (
            "1000002".into(),
            2,
            "conflict".into(),
            "claim_differs_from_registration".into()
        )
    );
    assert_eq!(o["discrepancies"], json!(["appropriate_body"]));
    assert_eq!(o["resolved"]["appropriate_body_id"], "AB-2");
    assert_eq!(o["resolved"]["lead_provider_id"], "LP-1");

    // K decides.
    let pass = set(
        finished(claim(5, "ip2", "1000002"), "2025-09-09", Some("pass")),
        "occurred_at",
        json!("2025-09-11T09:00:00Z"),
    );
    app.publish(&set(pass, "payload.appropriate_body_id", json!("AB-2")))
        .await;
    let o = app.next_outcome().await;
    assert_eq!(
        summary(&o),
        (
            "1000002".into(),
            3,
            "confirmed".into(),
            "induction_completed".into()
        )
    );
    assert_eq!(o["induction_period"]["outcome"], "pass");
    assert_eq!(o["induction_period"]["number_of_terms"], 3.0);

    // Neither: the ECT leaves and the claim is released.
    let left = set(
        set(
            registration(6, "r1", "1000001"),
            "payload.finished_on",
            json!("2025-12-01"),
        ),
        "occurred_at",
        json!("2025-12-01T09:00:00Z"),
    );
    app.publish(&left).await;
    let o = app.next_outcome().await;
    assert_eq!(
        summary(&o),
        (
            "1000001".into(),
            3,
            "confirmed".into(),
            "claimed_without_registration".into()
        )
    );
    let released = set(
        finished(claim(7, "ip1", "1000001"), "2025-12-01", None),
        "occurred_at",
        json!("2025-12-02T09:00:00Z"),
    );
    app.publish(&released).await;
    let o = app.next_outcome().await;
    assert_eq!(
        summary(&o),
        (
            "1000001".into(),
            4,
            "closed".into(),
            "no_open_records".into()
        )
    );
    assert_eq!(o["resolved"]["appropriate_body_id"], Value::Null);
    app.teardown().await;
}

/// A worker test that fails, with its worker running, still removes its queues, exchanges and
/// database, and no worker of it declares them again afterwards (`common::Leftovers`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_that_panics_leaves_no_queue_exchange_or_database_behind() {
    let (named, names) = tokio::sync::oneshot::channel();
    let failing = tokio::spawn(async move {
        let mut app = TestApp::spawn().await;
        app.publish(&registration(1, "r1", "1000001")).await;
        assert_eq!(app.next_outcome().await["version"], 1);
        named
            .send((app.db_name.clone(), app.settings.topology.clone()))
            .unwrap();
        panic!("this test fails on purpose, before TestApp::teardown");
    });
    let failed = failing.await.expect_err("the task panics");
    assert!(failed.is_panic());
    let (db_name, t) = names.await.expect("the app was made before the panic");
    // Long enough for a worker left running to have reconnected and declared its topology.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !common::database_exists(&db_name).await,
        "the failed test left its database behind"
    );
    let broker = induction_reconciler::broker::Broker::connect(
        &secrecy::SecretString::from(common::app::amqp_url()),
        "test-leftovers",
    )
    .await
    .unwrap();
    let queues = [&t.inbox_queue, &t.parking_queue, &t.unrouted_queue];
    let exchanges = [&t.input_exchange, &t.outcome_exchange, &t.unrouted_exchange];
    let named = (queues.iter().map(|q| (q, true))).chain(exchanges.iter().map(|e| (e, false)));
    for (name, is_queue) in named {
        let found = common::exists(&broker, name, is_queue).await;
        assert!(!found, "the failed test left {name} on the broker");
    }
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_reuse_and_stale_snapshots() {
    let mut app = TestApp::spawn().await;
    let first = registration(1, "r1", "1000001");
    app.publish(&first).await;
    assert_eq!(app.next_outcome().await["version"], 1);

    // The same bytes again: a duplicate, acknowledged, nothing emitted.
    app.publish(&first).await;
    // The same message_id with a different body: parked.
    app.publish(&set(first.clone(), "payload.school_urn", json!(222222)))
        .await;
    // An older snapshot of the record: recorded, nothing emitted.
    let older = set(
        set(
            registration(3, "r1", "1000001"),
            "occurred_at",
            json!("2025-08-01T09:00:00Z"),
        ),
        "payload.appropriate_body_id",
        json!("AB-OLD"),
    );
    app.publish(&older).await;
    // A message that does change something, to show the ones above emitted nothing.
    app.publish(&claim(4, "ip1", "1000001")).await;
    let o = app.next_outcome().await;
    assert_eq!(
        summary(&o),
        (
            "1000001".into(),
            2,
            "confirmed".into(),
            "claim_matches_registration".into()
        )
    );
    assert_eq!(o["school_registration"]["appropriate_body_id"], "AB-1");

    let parked = app.take_parked(1).await;
    assert_eq!(parked.len(), 1);
    assert_eq!(
        header(&parked[0].0, "x-parked-reason").as_deref(),
        Some("message_id_reused")
    );
    app.wait_for_inbox(3).await;
    let admissions: Vec<(String, String)> =
        sqlx::query_as("select message_id::text, admission from inbox order by message_id")
            .fetch_all(app.store.pool())
            .await
            .unwrap();
    assert_eq!(
        admissions
            .iter()
            .map(|(_, a)| a.as_str())
            .collect::<Vec<_>>(),
        ["latest", "stale", "latest"]
    );
    assert!(
        app.outcomes_until_quiet(Duration::from_millis(500))
            .await
            .is_empty()
    );
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_of_every_reason_code_is_parked_with_headers_and_the_worker_goes_on() {
    let mut app = TestApp::spawn().await;
    // A trigger that fails for one record id: a processing failure that is not an outage.
    sqlx::raw_sql(sqlx::AssertSqlSafe(poison_trigger_sql("poison")))
        .execute(app.store.pool())
        .await
        .unwrap();

    let accepted = registration(1, "r1", "1000001");
    app.publish(&accepted).await;
    assert_eq!(app.next_outcome().await["version"], 1);

    let mut too_large = bytes(&registration(2, "r2", "1000002"));
    too_large.pop();
    too_large.extend_from_slice(format!(",\"padding\":\"{}\"}}", "x".repeat(70_000)).as_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("too_large", too_large, "school.registration"),
        (
            "invalid_utf8",
            b"{\"message_type\": \"\xff\"}".to_vec(),
            "school.registration",
        ),
        ("invalid_json", b"{not json".to_vec(), "school.registration"),
        (
            "unknown_message_type",
            br#"{"message_type":"teacher_deleted"}"#.to_vec(),
            "ab.claim",
        ),
        (
            "unsupported_schema_version",
            bytes(&set(
                registration(3, "r3", "1000003"),
                "schema_version",
                json!(2),
            )),
            "school.registration",
        ),
        (
            "invalid_field",
            bytes(&set(
                registration(4, "r4", "1000004"),
                "payload.trn",
                json!("12345"),
            )),
            "school.registration",
        ),
        (
            "occurred_at_in_future",
            bytes(&set(
                registration(5, "r5", "1000005"),
                "occurred_at",
                json!("2999-01-01T00:00:00Z"),
            )),
            "school.registration",
        ),
        (
            "message_id_reused",
            bytes(&set(accepted.clone(), "payload.school_urn", json!(111111))),
            "school.registration",
        ),
        (
            "processing_failed",
            bytes(&registration(6, "poison", "1000006")),
            "school.registration",
        ),
    ];
    for (_, body, key) in &cases {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-test".into(),
            lapin::types::AMQPValue::LongString("kept".into()),
        );
        app.publish_raw(key, body, json_properties("", headers))
            .await;
    }
    // Then a good message: the worker is still going.
    app.publish(&registration(7, "r7", "1000007")).await;
    let o = app.next_outcome().await;
    assert_eq!(o["trn"], "1000007");

    let parked = app.take_parked(cases.len()).await;
    assert_eq!(parked.len(), cases.len());
    let mut by_reason: BTreeMap<String, (FieldTable, Vec<u8>)> = BTreeMap::new();
    for (headers, body) in parked {
        by_reason.insert(
            header(&headers, "x-parked-reason").unwrap(),
            (headers, body),
        );
    }
    for (reason, body, key) in &cases {
        let (headers, parked_body) = by_reason
            .get(*reason)
            .unwrap_or_else(|| panic!("{reason} was not parked"));
        assert_eq!(parked_body, body, "{reason}: parked unchanged");
        let detail = header(headers, "x-parked-detail").unwrap();
        assert!(!detail.is_empty());
        assert!(
            !detail.contains("1000006") && !detail.contains("12345"),
            "{reason}: detail echoes data: {detail}"
        );
        assert!(header(headers, "x-parked-at").is_some());
        assert_eq!(
            header(headers, "x-original-exchange").as_deref(),
            Some(app.settings.topology.input_exchange.as_str())
        );
        assert_eq!(
            header(headers, "x-original-routing-key").as_deref(),
            Some(*key)
        );
        assert_eq!(
            header(headers, "x-test").as_deref(),
            Some("kept"),
            "original headers are kept"
        );
    }
    assert!(
        header(&by_reason["invalid_field"].0, "x-parked-detail")
            .unwrap()
            .contains("payload.trn")
    );
    assert!(
        header(&by_reason["processing_failed"].0, "x-parked-detail")
            .unwrap()
            .contains("3 times")
    );
    // Parked messages are not seen: only the two good ones are in the inbox.
    let seen: i64 = sqlx::query_scalar("select count(*) from inbox")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(seen, 2);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_committed_but_not_published_goes_out_after_a_restart() {
    // The first worker commits outcomes but its relay never publishes (as if it died between
    // the commit and the publish).
    let mut app = TestApp::prepare(|_| {}).await;
    app.start_worker_with(|s| s.relay.enabled = false).await;
    app.publish(&registration(1, "r1", "1000001")).await;
    app.publish(&claim(2, "ip1", "1000001")).await;
    app.wait_until("select count(*) = 2 from outbox").await;
    app.stop_workers().await;
    assert!(
        app.outcomes_until_quiet(Duration::from_millis(500))
            .await
            .is_empty()
    );
    let pending: i64 = sqlx::query_scalar("select count(*) from outbox where published_at is null")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(pending, 2);

    app.start_worker().await;
    let versions: Vec<u64> = vec![
        app.next_outcome().await["version"].as_u64().unwrap(),
        app.next_outcome().await["version"].as_u64().unwrap(),
    ];
    assert_eq!(versions, [1, 2]);
    app.wait_until("select count(*) = 0 from outbox where published_at is null")
        .await;
    app.teardown().await;
}

/// Outcomes go out from the lane that committed them, right after the commit, in version order
/// (the outbox row keeps the lease that says so); with `relay.publish_after_commit` off, the
/// relay publishes them instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_publishes_its_outcomes_after_the_commit_and_the_relay_when_lanes_may_not() {
    let mut app = TestApp::spawn().await;
    // Once one outcome is out, the relay has its publisher, which it offers to the lanes.
    app.publish(&registration(1, "r0", "1000000")).await;
    assert_eq!(app.next_outcome().await["trn"], "1000000");
    app.publish(&registration(2, "r1", "1000001")).await;
    app.publish(&claim(3, "ip1", "1000001")).await;
    app.publish(&set(
        claim(4, "ip1", "1000001"),
        "payload.appropriate_body_id",
        json!("AB-OTHER"),
    ))
    .await;
    let mut versions = Vec::new();
    for _ in 0..3 {
        versions.push(summary(&app.next_outcome().await));
    }
    assert_eq!(
        versions
            .iter()
            .map(|v| (v.0.as_str(), v.1))
            .collect::<Vec<_>>(),
        [("1000001", 1), ("1000001", 2), ("1000001", 3)]
    );
    app.wait_until("select count(*) = 0 from outbox where published_at is null")
        .await;
    let by_lane: i64 = sqlx::query_scalar(
        "select count(*) from outbox where trn = '1000001' and lease_until is not null",
    )
    .fetch_one(app.store.pool())
    .await
    .unwrap();
    assert_eq!(by_lane, 3, "published by their lane");

    app.stop_workers().await;
    app.start_worker_with(|s| s.relay.publish_after_commit = false)
        .await;
    app.publish(&registration(5, "r2", "1000002")).await;
    assert_eq!(app.next_outcome().await["trn"], "1000002");
    app.wait_until("select count(*) = 0 from outbox where published_at is null")
        .await;
    let by_relay: i64 = sqlx::query_scalar(
        "select count(*) from outbox where trn = '1000002' and lease_until is null",
    )
    .fetch_one(app.store.pool())
    .await
    .unwrap();
    assert_eq!(by_relay, 1, "published by the relay");
    app.teardown().await;
}

/// Two lanes (or two workers) write outcomes for one teacher when a record moves between
/// teachers: the later write finds the earlier version leased to the other lane and leaves its
/// own to the relay. That outcome goes out once the lane marks its version published, even when
/// the mark cannot wake the relay (its statement ran before the later write committed, so it saw
/// nothing waiting), and not at the relay's poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_behind_another_lanes_lease_goes_out_once_that_lane_marks_without_waiting_for_the_poll()
 {
    let mut app = TestApp::prepare(|s| s.relay.poll_interval_millis = 600_000).await;
    let now = induction_reconciler::app::handler::now();
    let lease = Publishing {
        confirmed: &[],
        lease_until: Some(now + Duration::from_secs(60)),
    };
    // Lane A: the teacher's first version, leased to it (published by it, not yet marked).
    // Lane B: the teacher's second version, which must wait for the first: the relay's.
    for (message, leased) in [
        (registration(1, "r1", "1000001"), 1),
        (claim(2, "ip1", "1000001"), 0),
    ] {
        let body = bytes(&message);
        let input = decode(&body, now).expect("a valid message");
        let item = BatchItem {
            input: &input,
            digest: Sha256::digest(&body).into(),
            traceparent: None,
        };
        let (_, written) = app
            .store
            .apply_batch_publishing(&[item], now, lease.clone(), Contention::Wait)
            .await
            .unwrap();
        assert_eq!(written.leased.len(), leased);
    }
    app.start_worker().await;
    // Once an outcome of another teacher is out, the worker's relay is running: its rounds
    // leave teacher 1000001 alone, behind lane A's lease.
    app.publish(&registration(3, "r2", "1000002")).await;
    assert_eq!(app.next_outcome().await["trn"], "1000002");
    assert!(
        app.outcomes_until_quiet(Duration::from_millis(500))
            .await
            .is_empty(),
        "nothing goes out while the first version is leased"
    );
    // Lane A's mark, as it lands when it ran before lane B's write committed: no notification.
    sqlx::query("update outbox set published_at = now() where trn = '1000001' and version = 1")
        .execute(app.store.pool())
        .await
        .unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), app.next_outcome())
        .await
        .expect("the waiting version goes out within seconds, not at the 10-minute poll");
    assert_eq!(
        (second["trn"].as_str(), second["version"].as_u64()),
        (Some("1000001"), Some(2))
    );
    app.wait_until("select count(*) = 0 from outbox where published_at is null")
        .await;
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_no_queue_is_bound_for_is_kept_in_the_unrouted_queue() {
    let mut app = TestApp::prepare(|_| {}).await;
    // Remove the capture queue's binding: the outcome exchange now routes nowhere.
    app.unbind_capture().await;
    app.start_worker().await;
    app.publish(&registration(1, "r1", "1000001")).await;
    let kept = app.take_unrouted(1).await;
    assert_eq!(kept.len(), 1);
    let outcome: Value = serde_json::from_slice(&kept[0].1).unwrap();
    assert_eq!(outcome["status"], "provisional");
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_on_one_queue_end_as_one_would() {
    let mut app = TestApp::prepare(|_| {}).await;
    app.start_worker().await;
    app.start_worker().await;
    // Interleaved registrations, corrections, moves and claims for the same few teachers.
    let trns = ["2000001", "2000002", "2000003", "2000004"];
    let mut messages = Vec::new();
    for n in 0..160u64 {
        let trn = trns[(n % 4) as usize];
        let other = trns[((n / 4) % 4) as usize];
        let hour = format!("2025-09-{:02}T{:02}:00:00Z", 2 + n / 24, n % 24);
        let m = match n % 5 {
            0 => registration(n, &format!("r{}", n % 7), trn),
            1 => set(
                claim(n, &format!("ip{}", n % 6), other),
                "payload.appropriate_body_id",
                json!(if n % 2 == 0 { "AB-1" } else { "AB-2" }),
            ),
            2 => set(
                registration(n, &format!("r{}", n % 7), other),
                "payload.appropriate_body_id",
                json!("AB-2"),
            ),
            3 => set(
                claim(n, &format!("ip{}", n % 6), trn),
                "payload.deleted",
                json!(n % 3 == 0),
            ),
            _ => set(
                registration(n, &format!("r{}", n % 7), trn),
                "payload.finished_on",
                json!("2025-10-01"),
            ),
        };
        messages.push(set(m, "occurred_at", json!(hour)));
    }
    for m in &messages {
        app.publish(m).await;
    }
    app.wait_for_inbox(messages.len() as i64).await;
    app.wait_until("select count(*) = 0 from outbox where published_at is null")
        .await;

    // The same messages, in memory, in order.
    let mut ledger = Ledger::new();
    for m in &messages {
        let input = decode(&bytes(m), NOW).unwrap();
        ledger.apply(input.snapshot, input.cause, NOW);
    }
    let received = app.outcomes_until_quiet(Duration::from_millis(1000)).await;
    let mut last_seen: BTreeMap<String, u64> = BTreeMap::new();
    for o in &received {
        let trn = o["trn"].as_str().unwrap().to_owned();
        let version = o["version"].as_u64().unwrap();
        let previous = last_seen.insert(trn.clone(), version).unwrap_or(0);
        assert_eq!(
            version,
            previous + 1,
            "versions of {trn} arrive in order without gaps"
        );
    }
    for trn in trns {
        let expected = ledger.reconcile(&Trn::parse(trn).unwrap());
        let stored = app.store.explain(&Trn::parse(trn).unwrap()).await.unwrap();
        let last = stored
            .last_outcome
            .map(|m| m.to_domain().unwrap().reconciliation);
        match last {
            Some(got) => assert_eq!(got, expected, "{trn}"),
            None => assert_eq!(expected.status.as_str(), "closed", "{trn}"),
        }
    }
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overdue_sweep_emits_once_with_two_workers() {
    let mut app = TestApp::prepare(|s| {
        s.sweep.overdue_after_seconds = 2;
        s.sweep.interval_seconds = 1;
    })
    .await;
    app.start_worker().await;
    app.start_worker().await;
    app.publish(&registration(1, "r1", "1000001")).await;
    let first = app.next_outcome().await;
    assert_eq!(
        (first["version"].as_u64(), first["overdue"].as_bool()),
        (Some(1), Some(false))
    );
    let overdue = app.next_outcome().await;
    assert_eq!(overdue["version"], 2);
    assert_eq!(overdue["overdue"], true);
    assert_eq!(overdue["status"], "provisional");
    assert_eq!(overdue["caused_by"], Value::Null);
    assert_eq!(overdue["provisional_since"], first["provisional_since"]);
    // Several more sweep rounds of both workers: nothing more.
    assert!(
        app.outcomes_until_quiet(Duration::from_secs(4))
            .await
            .is_empty()
    );
    // A later outcome in the same spell keeps overdue.
    let correction = set(
        set(
            registration(2, "r1", "1000001"),
            "occurred_at",
            json!("2025-09-02T09:00:00Z"),
        ),
        "payload.appropriate_body_id",
        json!("AB-9"),
    );
    app.publish(&correction).await;
    let later = app.next_outcome().await;
    assert_eq!(
        (later["version"].as_u64(), later["overdue"].as_bool()),
        (Some(3), Some(true))
    );
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_of_the_input_is_carried_onto_its_outcomes() {
    let mut app = TestApp::spawn().await;
    let mut headers = FieldTable::default();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    headers.insert(
        "traceparent".into(),
        lapin::types::AMQPValue::LongString(traceparent.into()),
    );
    let m = registration(1, "r1", "1000001");
    app.publish_raw(
        "school.registration",
        &bytes(&m),
        BasicProperties::default().with_headers(headers),
    )
    .await;
    app.next_outcome().await;
    let stored: Option<String> = sqlx::query_scalar("select traceparent from outbox")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(stored.as_deref(), Some(traceparent));
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_workers_agree_when_a_new_record_arrives_under_different_trns() {
    // Each record's snapshots name different teachers (corrections of the TRN), and arrive at
    // once, so two workers can each see the record as new under a different teacher.
    let mut app = TestApp::prepare(|s| {
        s.amqp.concurrency = 2;
        s.amqp.batch_size = 3;
    })
    .await;
    app.start_worker().await;
    app.start_worker().await;
    let trns = ["5000001", "5000002", "5000003", "5000004", "5000005"];
    let mut messages = Vec::new();
    let mut n = 0u64;
    for record in 0..30 {
        for version in 0..4u64 {
            n += 1;
            let trn = trns[(record + version as usize * 2) % trns.len()];
            let at = format!("2025-09-02T{:02}:{:02}:00Z", version, record % 60);
            let m = if record % 2 == 0 {
                registration(n, &format!("r{record}"), trn)
            } else {
                claim(n, &format!("ip{record}"), trn)
            };
            messages.push(set(m, "occurred_at", json!(at)));
        }
    }
    // Newest first, so that late older snapshots test staleness too.
    messages.reverse();
    for m in &messages {
        app.publish(m).await;
    }
    app.wait_for_inbox(messages.len() as i64).await;
    app.wait_until("select count(*) = 0 from outbox where published_at is null")
        .await;
    let mut ledger = Ledger::new();
    for m in &messages {
        let input = decode(&bytes(m), NOW).unwrap();
        ledger.apply(input.snapshot, input.cause, NOW);
    }
    for trn in trns {
        let expected = ledger.reconcile(&Trn::parse(trn).unwrap());
        let stored = app.store.explain(&Trn::parse(trn).unwrap()).await.unwrap();
        let got = stored
            .last_outcome
            .map(|m| m.to_domain().unwrap().reconciliation);
        match got {
            Some(got) => assert_eq!(got, expected, "{trn}"),
            None => assert_eq!(expected.status.as_str(), "closed", "{trn}"),
        }
    }
    let records: i64 = sqlx::query_scalar(
        "select (select count(*) from registrations) + (select count(*) from induction_periods)",
    )
    .fetch_one(app.store.pool())
    .await
    .unwrap();
    assert_eq!(records, 30);
    app.teardown().await;
}

/// A lane waits for more deliveries only while its recent arrivals make them due: a lone
/// message on a quiet worker goes out at once, however long the linger. A fixed linger
/// (`amqp.batch_linger_adaptive = false`) waits it out.
#[tokio::test]
async fn a_quiet_lane_lingers_only_when_the_linger_is_fixed() {
    const LINGER: Duration = Duration::from_secs(3);
    for adaptive in [true, false] {
        let mut app = TestApp::prepare(|s| {
            s.amqp.batch_linger_millis = LINGER.as_millis() as u64;
            s.amqp.batch_linger_adaptive = adaptive;
        })
        .await;
        app.start_worker().await;
        let published = std::time::Instant::now();
        app.publish(&registration(1, "r-1", "1000001")).await;
        let outcome = app.next_outcome().await;
        let took = published.elapsed();
        assert_eq!(outcome["trn"], "1000001");
        if adaptive {
            assert!(took < LINGER / 2, "adaptive: {took:?}, not the linger");
        } else {
            assert!(took >= LINGER, "fixed: {took:?}, the whole linger");
        }
        app.teardown().await;
    }
}

/// A worker opens its pool's connections as it starts, not when a lane first needs one, which
/// would then wait for the opening (ARCHITECTURE decision 49). An idle worker otherwise holds
/// only the few its relay, sweep and gauges use.
#[tokio::test]
async fn a_worker_opens_its_database_connections_as_it_starts() {
    const POOL: u32 = 11;
    let mut app = TestApp::prepare(|s| s.database.max_connections = POOL).await;
    app.start_worker().await;
    app.wait_until_within(
        &format!(
            "select count(*) >= {POOL} from pg_stat_activity \
             where datname = current_database() and application_name = 'induction-reconciler'"
        ),
        Duration::from_secs(10),
    )
    .await;
    app.teardown().await;
}
