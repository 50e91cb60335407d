//! Going live (CONTRACT.md section 5, "Migrated data", "Resync" and "Audit"), through the
//! binary as an operator runs it: a migrated ECF1 backlog loaded with `publish --origin
//! migration` while live messages flow; `resync` to a consumer that joins late while live
//! traffic flows; `verify` and `verify --emit` on a consistent, a tampered and a busy database.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use common::app::{TestApp, header};
use common::workload::{Generated, generate};
use common::{assert_matches, cli, ecf1, free_port, http_get};
use induction_reconciler::broker::{Broker, json_properties};
use induction_reconciler::config::Settings;
use induction_reconciler::domain::{Ledger, Trn};
use induction_reconciler::messages::{OutcomeMessage, ReasonCode, decode};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;

/// Runs the binary to completion (killed if it outlives `limit`, or if the test fails first).
async fn run(settings: &Settings, args: &[&str], limit: Duration) -> std::process::Output {
    let mut command = tokio::process::Command::from(cli(settings, args));
    command
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    tokio::time::timeout(limit, command.output())
        .await
        .unwrap_or_else(|_| panic!("{args:?} did not finish within {limit:?}"))
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Publishes generated live messages with their routing keys.
async fn publish_live(app: &TestApp, stream: &[Generated]) {
    for m in stream {
        let id = serde_json::from_slice::<Value>(&m.body)
            .ok()
            .and_then(|v| v["message_id"].as_str().map(str::to_owned))
            .unwrap_or_default();
        app.publish_raw(
            m.routing_key,
            &m.body,
            json_properties(&id, FieldTable::default()),
        )
        .await;
    }
}

/// The messages' final state in memory, as `simulate` computes it, and the number of distinct
/// message ids accepted.
fn simulate<'a>(bodies: impl IntoIterator<Item = &'a [u8]>) -> (Ledger, usize) {
    let now = time::OffsetDateTime::now_utc();
    let mut ledger = Ledger::new();
    let mut accepted = HashSet::new();
    for body in bodies {
        if let Ok(input) = decode(body, now)
            && accepted.insert(input.message_id())
        {
            ledger.apply(input.snapshot, input.cause, now);
        }
    }
    (ledger, accepted.len())
}

/// Every teacher's stored last outcome.
async fn stored(app: &TestApp) -> HashMap<String, OutcomeMessage> {
    let mut conn = app.store.pool().acquire().await.unwrap();
    common::stored_last_outcomes(&mut conn).await
}

/// A consumer's state after applying `outcomes` as CONTRACT.md tells it to: de-duplicate on
/// `outcome_id`, drop a version not above the last applied.
fn consume(outcomes: &[Value]) -> BTreeMap<String, Value> {
    let mut seen = HashSet::new();
    let mut state: BTreeMap<String, Value> = BTreeMap::new();
    for o in outcomes {
        if !seen.insert(o["outcome_id"].as_str().unwrap().to_owned()) {
            continue;
        }
        let trn = o["trn"].as_str().unwrap().to_owned();
        let version = o["version"].as_u64().unwrap();
        if state
            .get(&trn)
            .is_none_or(|held| held["version"].as_u64().unwrap() < version)
        {
            state.insert(trn, o.clone());
        }
    }
    state
}

/// The message with `"origin": "migration"` set, as an independent check of the loader.
fn stamped(line: &[u8]) -> Vec<u8> {
    match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(mut m)) => {
            m.insert("origin".into(), "migration".into());
            serde_json::to_vec(&m).unwrap()
        }
        _ => line.to_vec(),
    }
}

async fn wait_drained(app: &TestApp, accepted: usize, limit: Duration) {
    app.wait_until_within(
        &format!(
            "select (select count(*) from inbox) >= {accepted}
                    and (select count(*) from outbox where published_at is null) = 0"
        ),
        limit,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_backlog_loaded_with_live_traffic_ends_as_simulate_says() {
    let app = TestApp::spawn().await;
    let backlog = ecf1::backlog(50_000, 12_000, 4_000_000, 7);
    assert!(backlog.lines.len() >= 50_000 && backlog.without_trn > 0);
    // Live traffic about half of the same teachers, flowing while the backlog loads.
    let live = generate(6_000, 6_000, 4_006_000, 11);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ecf1.jsonl");
    let mut contents = Vec::new();
    for line in &backlog.lines {
        contents.extend_from_slice(line);
        contents.push(b'\n');
    }
    std::fs::write(&file, contents).unwrap();

    let started = Instant::now();
    let args = ["publish", "--origin", "migration", file.to_str().unwrap()];
    let (loaded, ()) = tokio::join!(
        run(&app.settings, &args, Duration::from_secs(600)),
        publish_live(&app, &live)
    );
    let stdout = text(&loaded.stdout);
    assert!(
        loaded.status.success(),
        "{stdout}\n{}",
        text(&loaded.stderr)
    );
    assert!(
        stdout.contains(&format!("published {} messages", backlog.lines.len())),
        "{stdout}"
    );
    // Piped: no progress bar and no progress lines.
    let stderr = text(&loaded.stderr);
    assert!(
        !stderr.contains("messages published") && !stderr.contains("\"progress\""),
        "{stderr}"
    );

    let migrated: Vec<Vec<u8>> = backlog.lines.iter().map(|l| stamped(l)).collect();
    let bodies = migrated
        .iter()
        .map(Vec::as_slice)
        .chain(live.iter().map(|m| m.body.as_slice()));
    let (ledger, accepted) = simulate(bodies);
    wait_drained(&app, accepted, Duration::from_secs(600)).await;
    let drained = started.elapsed();

    // Every teacher as simulate says; migrated origins carried onto outcomes.
    let stored = stored(&app).await;
    let compared = assert_matches(&ledger, &stored, "migration");
    let migrated_records = stored
        .values()
        .filter(|m| {
            m.school_registration
                .as_ref()
                .is_some_and(|r| r.origin == induction_reconciler::messages::OriginField::Migration)
        })
        .count();
    let migrated_causes = stored
        .values()
        .filter(|m| {
            m.caused_by
                .as_ref()
                .is_some_and(|c| c.origin == induction_reconciler::messages::OriginField::Migration)
        })
        .count();
    assert!(migrated_records > 1_000 && migrated_causes > 1_000);

    // The TRN-less ECF1 participants are parked invalid_field, every one, and counted.
    let expected_parked = migrated
        .iter()
        .map(Vec::as_slice)
        .chain(live.iter().map(|m| m.body.as_slice()))
        .filter(|b| decode(b, time::OffsetDateTime::now_utc()).is_err())
        .count();
    let parked = app.take_parked(expected_parked).await;
    assert_eq!(parked.len(), expected_parked);
    let trn_less = parked
        .iter()
        .filter(|(headers, body)| {
            header(headers, "x-parked-reason").as_deref() == Some(ReasonCode::InvalidField.as_str())
                && header(headers, "x-parked-detail").as_deref() == Some("payload.trn is required")
                && text(body).contains("ECF1-IR-")
        })
        .count();
    assert_eq!(trn_less, backlog.without_trn);
    let rate = backlog.lines.len() as f64 / drained.as_secs_f64();
    eprintln!(
        "migration: {} snapshots and {} live messages, {compared} teachers compared, \
         {trn_less} TRN-less parked; all applied {:.1} s after the load began \
         ({rate:.0} backlog snapshots per second); {}",
        backlog.lines.len(),
        live.len(),
        drained.as_secs_f64(),
        stdout.trim()
    );
    app.teardown().await;
}

/// A classic queue of the test's, bound to every outcome: a consumer that joins late.
async fn late_consumer(broker: &Broker, settings: &Settings, name: &str) -> lapin::Channel {
    let channel = broker.channel().await.unwrap();
    // Read with `basic.get`, it never has a consumer to auto-delete it: the test deletes it, and
    // should the test fail first, the broker does after ten unused minutes.
    let mut expiring = FieldTable::default();
    expiring.insert("x-expires".into(), AMQPValue::LongInt(600_000));
    channel
        .queue_declare(name.into(), QueueDeclareOptions::default(), expiring)
        .await
        .unwrap();
    channel
        .queue_bind(
            name.into(),
            settings.topology.outcome_exchange.as_str().into(),
            "outcome.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
}

/// Everything in `queue` until it stays empty for a second, checking each message's
/// properties: `outcome_id` as the AMQP `message_id`, JSON, persistent.
async fn drain(channel: &lapin::Channel, queue: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut empty_since = Instant::now();
    while empty_since.elapsed() < Duration::from_secs(1) {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        match got {
            Some(message) => {
                let d = message.delivery;
                let outcome: Value = serde_json::from_slice(&d.data).unwrap();
                assert_eq!(
                    d.properties.message_id().as_ref().map(|m| m.as_str()),
                    outcome["outcome_id"].as_str()
                );
                assert_eq!(d.properties.delivery_mode(), &Some(2));
                all.push(outcome);
                empty_since = Instant::now();
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_binds_then_resyncs_ends_like_one_that_listened_from_the_start() {
    let mut app = TestApp::spawn().await;
    let before = generate(3_000, 800, 5_000_000, 21);
    publish_live(&app, &before).await;
    let (_, accepted) = simulate(before.iter().map(|m| m.body.as_slice()));
    wait_drained(&app, accepted, Duration::from_secs(120)).await;

    // The late consumer binds its queue first, then asks for a resync while traffic flows.
    let broker = Broker::connect(&app.settings.amqp.url, "late consumer")
        .await
        .unwrap();
    let queue = format!("{}.late", app.settings.topology.inbox_queue);
    let channel = late_consumer(&broker, &app.settings, &queue).await;
    let during = generate(3_000, 800, 5_000_000, 22);
    let args = ["resync", "--queue", queue.as_str()];
    let (resync, ()) = tokio::join!(
        run(&app.settings, &args, Duration::from_secs(120)),
        publish_live(&app, &during)
    );
    let stdout = text(&resync.stdout);
    assert!(resync.status.success(), "{stdout}{}", text(&resync.stderr));
    let (ledger, accepted) = simulate(
        before
            .iter()
            .chain(during.iter())
            .map(|m| m.body.as_slice()),
    );
    wait_drained(&app, accepted, Duration::from_secs(120)).await;

    let from_start = consume(&app.outcomes_until_quiet(Duration::from_secs(2)).await);
    let late_messages = drain(&channel, &queue).await;
    let late = consume(&late_messages);
    assert_eq!(late.len(), from_start.len());
    assert_eq!(late, from_start, "the late consumer's state");
    let resent: usize = stdout
        .trim()
        .strip_prefix("resent ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(resent >= 700 && late_messages.len() >= resent, "{stdout}");
    // And both equal the rules' answer.
    assert_matches(&ledger, &stored(&app).await, "resync");

    // A selection: only conflicts; every one sent is the stored outcome, byte for byte.
    let picked = format!("{}.conflicts", app.settings.topology.inbox_queue);
    let channel = late_consumer(&broker, &app.settings, &picked).await;
    channel
        .queue_unbind(
            picked.as_str().into(),
            app.settings.topology.outcome_exchange.as_str().into(),
            "outcome.#".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let out = run(
        &app.settings,
        &["resync", "--queue", &picked, "--status", "conflict"],
        Duration::from_secs(60),
    )
    .await;
    assert!(out.status.success());
    let conflicts: i64 =
        sqlx::query_scalar("select count(*) from teachers where status = 'conflict'")
            .fetch_one(app.store.pool())
            .await
            .unwrap();
    assert!(conflicts > 0);
    let got = drain(&channel, &picked).await;
    assert_eq!(got.len() as i64, conflicts);
    assert!(got.iter().all(|o| o["status"] == "conflict"));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("resent {conflicts} outcomes to the queue {picked}")
    );

    // Clear errors: a queue that does not exist, a TRN that is not one.
    let missing = run(
        &app.settings,
        &["resync", "--queue", "no-such-queue-here"],
        Duration::from_secs(60),
    )
    .await;
    assert!(!missing.status.success());
    assert!(text(&missing.stderr).contains("does not exist"));
    let bad = run(
        &app.settings,
        &["resync", "--queue", &picked, "--trn", "12345"],
        Duration::from_secs(60),
    )
    .await;
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("7 digits"));
    broker.close().await;
    common::remove_topology(&[&queue, &picked], &[]).await;
    app.teardown().await;
}

fn checked_line(out: &std::process::Output) -> (u64, u64) {
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("checked "))
        .unwrap_or_else(|| panic!("{stdout}{}", text(&out.stderr)));
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_a_record_changed_behind_the_workers_back_and_emit_corrects_it() {
    let port = free_port();
    let mut app = TestApp::spawn_with(|s| {
        s.http.enabled = true;
        s.http.listen = format!("127.0.0.1:{port}");
        s.http.gauge_refresh_seconds = 1;
    })
    .await;
    let stream = generate(2_000, 500, 6_000_000, 31);
    publish_live(&app, &stream).await;
    let (_, accepted) = simulate(stream.iter().map(|m| m.body.as_slice()));
    wait_drained(&app, accepted, Duration::from_secs(120)).await;
    let dir = tempfile::tempdir().unwrap();
    let differences = dir.path().join("differences.txt");
    let differences_arg = differences.to_str().unwrap();
    let teachers: i64 = sqlx::query_scalar(
        "select count(*) from (select trn from teachers union select trn from registrations
         union select trn from induction_periods) t",
    )
    .fetch_one(app.store.pool())
    .await
    .unwrap();

    // Consistent: clean.
    let clean = run(
        &app.settings,
        &["verify", "--differences", differences_arg],
        Duration::from_secs(120),
    )
    .await;
    assert!(clean.status.success(), "{}", text(&clean.stderr));
    assert_eq!(checked_line(&clean), (teachers as u64, 0));

    // A registration changed behind the worker's back: a confirmed teacher's school now names
    // another AB, so the rules give a conflict.
    let (trn, registration_id, version): (String, String, i64) = sqlx::query_as(
        "select t.trn, b.b->'school_registration'->>'registration_id', t.version
         from teachers t join outbox o on o.trn = t.trn and o.version = t.version,
              lateral (select convert_from(o.body, 'UTF8')::jsonb as b) as b
         where b.b->>'reason' = 'claim_matches_registration' order by t.trn limit 1",
    )
    .fetch_one(app.store.pool())
    .await
    .unwrap_or_else(|_| {
        panic!("the stream makes at least one confirmed teacher with a registration")
    });
    sqlx::query("update registrations set appropriate_body_id = 'AB-CHANGED-BEHIND' where registration_id = $1")
        .bind(&registration_id)
        .execute(app.store.pool())
        .await
        .unwrap();
    let found = run(
        &app.settings,
        &["verify", "--differences", differences_arg],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(found.status.code(), Some(1));
    assert_eq!(checked_line(&found), (teachers as u64, 1));
    assert_eq!(
        std::fs::read_to_string(&differences).unwrap(),
        format!("{trn}\n")
    );
    for output in [&found.stdout, &found.stderr] {
        assert!(!text(output).contains(&trn), "a TRN never goes to the log");
    }
    // The worker exports the last audit's result.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = http_get(port, "/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default();
        if metrics.contains("induction_reconciler_audit_differing_teachers 1") {
            break;
        }
        assert!(Instant::now() < deadline, "no audit metric: {metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // --emit writes the corrected outcome as a new version with no cause; it is published.
    app.outcomes_until_quiet(Duration::from_millis(500)).await;
    let emitted = run(
        &app.settings,
        &["verify", "--emit", "--differences", differences_arg],
        Duration::from_secs(120),
    )
    .await;
    assert!(emitted.status.success(), "{}", text(&emitted.stderr));
    assert!(text(&emitted.stdout).contains("1 corrected outcomes written"));
    let corrected = app.next_outcome().await;
    assert_eq!(corrected["trn"], trn.as_str());
    assert_eq!(corrected["version"].as_i64(), Some(version + 1));
    assert_eq!(corrected["caused_by"], Value::Null);
    assert_eq!(corrected["status"], "conflict");
    assert_eq!(
        corrected["resolved"]["appropriate_body_source"],
        "appropriate_body"
    );
    let again = run(
        &app.settings,
        &["verify", "--differences", differences_arg],
        Duration::from_secs(120),
    )
    .await;
    assert!(again.status.success());
    assert_eq!(checked_line(&again), (teachers as u64, 0));
    let explained = app.store.explain(&Trn::parse(&trn).unwrap()).await.unwrap();
    assert_eq!(explained.history.last().unwrap().event, "reconciled");
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_during_live_traffic_reports_no_false_difference() {
    let app = TestApp::spawn().await;
    let stream = generate(8_000, 1_500, 7_000_000, 41);
    let dir = tempfile::tempdir().unwrap();
    let differences = dir.path().join("differences.txt");
    let differences_arg = differences.to_str().unwrap().to_owned();
    let settings = app.settings.clone();
    let verifying = async {
        let mut runs = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while runs.len() < 3 || (Instant::now() < deadline && runs.len() < 8) {
            let out = run(
                &settings,
                &["verify", "--differences", &differences_arg],
                Duration::from_secs(120),
            )
            .await;
            runs.push((out.status.code(), checked_line(&out)));
        }
        runs
    };
    let (runs, ()) = tokio::join!(verifying, publish_live(&app, &stream));
    for (code, (checked, differing)) in &runs {
        assert_eq!((*code, *differing), (Some(0), 0), "{runs:?}");
        let _ = checked;
    }
    assert!(
        runs.iter().any(|(_, (checked, _))| *checked > 0),
        "{runs:?}"
    );
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_draws_its_progress_on_a_terminal() {
    // `script` (util-linux) gives the command a terminal, as an operator's shell would.
    let app = TestApp::spawn().await;
    let stream = generate(3_000, 1_000, 8_000_000, 51);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("messages.jsonl");
    let mut contents = Vec::new();
    for m in &stream {
        contents.extend_from_slice(&m.body);
        contents.push(b'\n');
    }
    std::fs::write(&file, contents).unwrap();
    let plain = cli(&app.settings, &[]);
    let mut command = tokio::process::Command::new("script");
    command
        .args(["-qefc"])
        .arg(format!(
            "{} publish --origin migration {}",
            common::BIN,
            file.display()
        ))
        .arg("/dev/null")
        .env_remove("RUST_LOG")
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (key, value) in plain.get_envs() {
        if let Some(value) = value {
            command.env(key, value);
        }
    }
    let out = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("publish finishes")
        .expect("script runs");
    let screen = text(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(screen.contains("messages published"), "{screen}");
    assert!(
        screen.contains("/3,000") || screen.contains("/3000"),
        "{screen}"
    );
    assert!(screen.contains("published 3000 messages in "), "{screen}");
    app.teardown().await;
}
