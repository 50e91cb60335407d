//! A second client, from another ecosystem: the Node.js example in `examples/node-client`
//! (npm `amqplib`, pinned by its lockfile) against a real worker on the shared broker.
//!
//! - Its producer publishes a generated stream of registrations and claims (with a few invalid
//!   messages, which the worker parks) as two broker users, one per producing team, with the
//!   properties the AsyncAPI document requires; the worker allows exactly those users.
//! - Its consumer, on its own quorum queue bound before the stream starts, ends with every
//!   teacher's reconciliation equal to what `induction-reconciler simulate` gives for the same
//!   lines (see `comparable` for why versions are not compared).
//! - A resync of every teacher into that queue is all duplicates: the state does not change.
//! - A consumer that lost its state is resynced first and then handed the whole published
//!   history late: the last outcome of each teacher is a duplicate, every earlier one is a
//!   stale version, and its state equals the first consumer's.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::app::{PATIENCE, TestApp};
use common::rabbit::BrokerUser;
use common::tools::{node, stdout_of};
use common::{BIN, cli};
use induction_reconciler::broker::{Broker, json_properties};
use induction_reconciler::messages::decode;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use secrecy::SecretString;
use serde_json::Value;

const CLIENT: &str = "examples/node-client";

/// The reconciliation an outcome reports: what a consumer acts on. Versions, causes and ids
/// are left out: the worker applies different teachers in parallel lanes, and with several lanes
/// its intermediate outcomes can differ from `simulate`'s (measured in ARCHITECTURE decision 21;
/// most likely where one record is reported under two teachers). CONTRACT.md orders versions
/// per TRN only; the final reconciliation of every teacher is the same.
fn comparable(outcome: &Value) -> Value {
    let mut v = serde_json::Map::new();
    for field in [
        "trn",
        "status",
        "reason",
        "discrepancies",
        "overdue",
        "resolved",
        "school_registration",
        "induction_period",
    ] {
        v.insert(field.into(), outcome[field].clone());
    }
    v.insert(
        "in_provisional_spell".into(),
        (!outcome["provisional_since"].is_null()).into(),
    );
    Value::Object(v)
}

/// The last outcome per TRN of `induction-reconciler simulate` over `lines`, as `comparable`.
fn simulated(lines: &Path) -> BTreeMap<String, Value> {
    let stdout = stdout_of(Command::new(BIN).arg("simulate").arg(lines));
    let mut last = BTreeMap::new();
    for line in stdout.lines() {
        let v: Value = serde_json::from_str(line).expect("simulate prints JSON lines");
        if v.get("parked").is_none() {
            last.insert(v["trn"].as_str().unwrap().to_owned(), comparable(&v));
        }
    }
    last
}

/// Every teacher in either state has the same reconciliation in both; a teacher with no
/// outcome in one is `closed` in the other (a first outcome that would be `closed` is not
/// emitted).
fn assert_same_state(
    got: &BTreeMap<String, Value>,
    expected: &BTreeMap<String, Value>,
    label: &str,
) {
    let trns: std::collections::BTreeSet<&String> = got.keys().chain(expected.keys()).collect();
    for trn in trns {
        match (got.get(trn), expected.get(trn)) {
            (Some(g), Some(e)) => assert_eq!(g, e, "{label}: teacher {trn}"),
            (Some(only), None) | (None, Some(only)) => {
                assert_eq!(
                    only["status"], "closed",
                    "{label}: teacher {trn} only on one side"
                )
            }
            (None, None) => unreachable!(),
        }
    }
}

/// One run of the Node consumer; its counts from the JSON line it prints.
struct Counts {
    applied: u64,
    duplicate: u64,
    stale: u64,
    rejected: u64,
    teachers: u64,
}

/// The Node consumer on `queue`, as the shared broker's `guest`; it always ends by itself, even
/// if the test has gone wrong.
fn consumer_command(exchange: &str, queue: &str) -> Command {
    let mut cmd = node(CLIENT);
    cmd.arg("consumer.mjs")
        .args(["--queue", queue, "--exchange", exchange])
        .args(["--deadline", "90000"])
        .env("AMQP_URL", common::app::amqp_url());
    cmd
}

/// Declares the consumer's queue and binds it, as a team does before asking for a resync.
fn declare(exchange: &str, queue: &str) {
    stdout_of(consumer_command(exchange, queue).arg("--declare-only"));
}

/// Runs the consumer with its state in `state` until its queue is empty.
fn consume(exchange: &str, queue: &str, state: &Path) -> Counts {
    let mut cmd = consumer_command(exchange, queue);
    cmd.arg("--state").arg(state).args(["--until-idle", "1500"]);
    let stdout = stdout_of(&mut cmd);
    let v: Value = serde_json::from_str(stdout.trim()).expect("the consumer prints its counts");
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("count {k} in {v}"));
    Counts {
        applied: n("applied"),
        duplicate: n("duplicate"),
        stale: n("stale"),
        rejected: n("rejected"),
        teachers: n("teachers"),
    }
}

fn producer(amqp_url: &str, exchange: &str, lines: &Path) -> u64 {
    let mut cmd = node(CLIENT);
    cmd.arg("producer.mjs")
        .arg(lines)
        .args(["--exchange", exchange])
        .env("AMQP_URL", amqp_url);
    let stdout = stdout_of(&mut cmd);
    let v: Value = serde_json::from_str(stdout.trim()).expect("the producer prints its count");
    v["published"].as_u64().expect("published count")
}

/// The consumer's state file: the last applied outcome per TRN, whole.
fn state_of(path: &Path) -> BTreeMap<String, Value> {
    let v: Value = serde_json::from_slice(&std::fs::read(path).expect("the state file")).unwrap();
    v["teachers"]
        .as_object()
        .expect("teachers")
        .iter()
        .map(|(trn, outcome)| (trn.clone(), outcome.clone()))
        .collect()
}

fn reconciliations(state: &BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    state
        .iter()
        .map(|(trn, outcome)| (trn.clone(), comparable(outcome)))
        .collect()
}

/// Runs a blocking step (a Node process) off the runtime's threads, where the worker runs.
async fn run_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("no panic")
}

async fn ready_count(channel: &lapin::Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the consumer's queue exists")
        .message_count()
}

/// Writes `bodies` as JSON lines.
fn write_lines(path: &Path, bodies: &[&[u8]]) {
    let mut text = Vec::new();
    for body in bodies {
        text.extend_from_slice(body);
        text.push(b'\n');
    }
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_producer_and_consumer_end_with_the_state_simulate_gives() {
    let school = BrokerUser::create("it-school");
    let ab = BrokerUser::create("it-ab");
    let (school_name, ab_name) = (school.name.clone(), ab.name.clone());
    let mut app = TestApp::spawn_with(move |s| {
        s.publishers.school_registration = vec![school_name];
        s.publishers.ab_claim = vec![ab_name];
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let t = app.settings.topology.clone();

    // The generated stream, as each producing team would send its half: the lines a producer
    // can route (the few invalid ones that are not JSON, or of an unknown type, are left out;
    // the rest of the invalid ones are sent and parked).
    let stream = common::workload::generate(600, 120, 4_300_000, 14);
    let routable: Vec<&common::workload::Generated> = stream
        .iter()
        .filter(|m| {
            serde_json::from_slice::<Value>(&m.body).is_ok_and(|v| {
                matches!(
                    v["message_type"].as_str(),
                    Some("school_registration" | "ab_claim")
                )
            })
        })
        .collect();
    let of_key = |key: &str| -> Vec<&[u8]> {
        routable
            .iter()
            .filter(|m| m.routing_key == key)
            .map(|m| m.body.as_slice())
            .collect()
    };
    let (registrations, claims) = (of_key("school.registration"), of_key("ab.claim"));
    assert!(registrations.len() > 200 && claims.len() > 100);
    let registrations_file = dir.path().join("registrations.jsonl");
    let claims_file = dir.path().join("claims.jsonl");
    write_lines(&registrations_file, &registrations);
    write_lines(&claims_file, &claims);
    // What the worker receives, in order: the school's lines, then the AB's.
    let all = [registrations.clone(), claims.clone()].concat();
    let all_file = dir.path().join("all.jsonl");
    write_lines(&all_file, &all);
    let expected = simulated(&all_file);
    assert!(expected.len() > 100, "most teachers have an outcome");

    // 1. The consumer binds its queue first, then the two producers publish.
    let queue_a = format!("{}.node-a", t.inbox_queue);
    let state_a = dir.path().join("state-a.json");
    let queue_b = format!("{}.node-b", t.inbox_queue);
    let state_b = dir.path().join("state-b.json");
    for queue in [&queue_a, &queue_b] {
        let (exchange, queue) = (t.outcome_exchange.clone(), queue.clone());
        run_blocking(move || declare(&exchange, &queue)).await;
    }
    // Queue B is for the consumer that lost its state: unbind it again, so that it only gets
    // what the test hands it below.
    let broker = Broker::connect(
        &SecretString::from(common::app::amqp_url()),
        "node client test",
    )
    .await
    .unwrap();
    let channel = broker.channel().await.unwrap();
    channel
        .queue_unbind(
            queue_b.as_str().into(),
            t.outcome_exchange.as_str().into(),
            "outcome.#".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let (url, exchange, file) = (school.url(), t.input_exchange.clone(), registrations_file);
    let sent = run_blocking(move || producer(&url, &exchange, &file)).await;
    assert_eq!(sent, registrations.len() as u64);
    let (url, exchange, file) = (ab.url(), t.input_exchange.clone(), claims_file);
    let sent = run_blocking(move || producer(&url, &exchange, &file)).await;
    assert_eq!(sent, claims.len() as u64);

    // The worker has applied every message it accepts and published everything it emitted;
    // then all of that reaches the consumer's queue.
    let now = time::OffsetDateTime::now_utc();
    let accepted: HashSet<_> = all
        .iter()
        .filter_map(|body| decode(body, now).ok().map(|input| input.message_id()))
        .collect();
    app.wait_until_within(
        &format!(
            "select (select count(*) from inbox) = {}
                and not exists (select 1 from outbox where published_at is null)",
            accepted.len()
        ),
        PATIENCE * 3,
    )
    .await;
    let emitted: i64 = sqlx::query_scalar("select count(*) from outbox")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    let emitted = emitted as usize;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while (ready_count(&channel, &queue_a).await as usize) < emitted {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {emitted} outcomes reached the Node consumer's queue",
            ready_count(&channel, &queue_a).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing was parked as from the wrong publisher: each team's user was allowed.
    let unauthorised: i64 = sqlx::query_scalar(
        "select count(*) from parked_log where reason = 'unauthorised_publisher'",
    )
    .fetch_one(app.store.pool())
    .await
    .unwrap();
    assert_eq!(unauthorised, 0, "the Node producer's user_id was accepted");

    // 2. The live stream: every outcome applied, the state as simulate gives.
    let run = |queue: &String, state: &PathBuf| {
        let (exchange, queue, state) = (t.outcome_exchange.clone(), queue.clone(), state.clone());
        run_blocking(move || consume(&exchange, &queue, &state))
    };
    let live = run(&queue_a, &state_a).await;
    assert_eq!(live.applied as usize, emitted, "every outcome applied once");
    assert_eq!((live.stale, live.rejected), (0, 0));
    let state = state_of(&state_a);
    assert_eq!(live.teachers as usize, state.len());
    let stored: i64 = sqlx::query_scalar("select count(*) from teachers")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(
        state.len() as i64,
        stored,
        "one entry per teacher with an outcome"
    );
    assert_same_state(&reconciliations(&state), &expected, "live");
    let teachers = state.len();

    // 3. A resync into the same queue: every outcome is one it has, so nothing changes.
    let resync = stdout_of(&mut cli(&app.settings, &["resync", "--queue", &queue_a]));
    assert!(
        resync.contains(&format!("resent {teachers} outcomes")),
        "{resync}"
    );
    let again = run(&queue_a, &state_a).await;
    assert_eq!(again.duplicate as usize, teachers, "all duplicates");
    assert_eq!((again.applied, again.stale), (0, 0));
    assert_eq!(state_of(&state_a), state, "unchanged");

    // 4. A consumer that lost its state: resynced, then handed every published outcome late
    //    (the whole history, as a backlog delivered after the resync).
    let history: Vec<Value> = {
        let mut seen = HashSet::new();
        app.outcomes_until_quiet(Duration::from_millis(500))
            .await
            .into_iter()
            .filter(|o| seen.insert(o["outcome_id"].as_str().unwrap().to_owned()))
            .collect()
    };
    assert_eq!(history.len(), emitted);
    let resync = stdout_of(&mut cli(&app.settings, &["resync", "--queue", &queue_b]));
    assert!(
        resync.contains(&format!("resent {teachers} outcomes")),
        "{resync}"
    );
    let publisher = broker.publisher().await.unwrap();
    for outcome in &history {
        publisher
            .publish(
                "",
                &queue_b,
                &serde_json::to_vec(outcome).unwrap(),
                json_properties(
                    outcome["outcome_id"].as_str().unwrap(),
                    FieldTable::default(),
                ),
            )
            .await
            .unwrap();
    }
    let late = run(&queue_b, &state_b).await;
    assert_eq!(late.applied as usize, teachers, "the resync applied");
    assert_eq!(
        late.duplicate as usize, teachers,
        "each teacher's last outcome again"
    );
    assert_eq!(
        late.stale as usize,
        emitted - teachers,
        "every earlier version dropped"
    );
    assert_eq!(
        state_of(&state_b),
        state,
        "the recovered state is the live one"
    );

    for queue in [&queue_a, &queue_b] {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    broker.close().await;
    app.teardown().await;
}

#[test]
fn the_node_consumer_rule_passes_its_own_unit_tests() {
    stdout_of(node(CLIENT).args(["--test", "outcomes.test.mjs"]));
}
